"""``canary-qwen demo``: the whole deployment on the CPU default, end to end (``canary_qwen.demo``)."""

from __future__ import annotations

import argparse

from ..demo import DEMO_SENTENCE
from ..demo import __doc__ as DEMO_DOC


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline end to end on the CPU (export, Triton, client)",
        description=DEMO_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: a random tiny checkpoint)")
    p.add_argument(
        "--work", default="work/demo", help="folder for the checkpoint, export and repository (default: work/demo)"
    )
    p.add_argument("--text", default=DEMO_SENTENCE, help="sentence espeak-ng speaks for the test clip")
    p.add_argument("--audio", default=None, help="transcribe this file instead of a synthesised clip")
    p.set_defaults(run=_run)


def _run(args) -> int:
    from ..demo import run_demo

    return run_demo(args)
