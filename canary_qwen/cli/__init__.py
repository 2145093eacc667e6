"""``canary-qwen``: one command line for every step, from checkpoint to served model; one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import CanaryQwenError
from . import (
    ask,
    bench,
    build_engines,
    client,
    demo,
    export,
    make_checkpoint,
    quantize,
    serve,
    transcribe,
    transcribe_corpus,
    triton_repo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-qwen",
        description="Deploy Canary-Qwen-2.5B: NeMo-exact transcription, ONNX/TensorRT export, Triton serving, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        transcribe.add_transcribe,
        transcribe_corpus.add_transcribe_corpus,
        ask.add_ask,
        make_checkpoint.add_make_checkpoint,
        export.add_export,
        quantize.add_quantize,
        build_engines.add_build_engines_parser,
        triton_repo.add_triton_repo_parser,
        serve.add_serve,
        __import__(f"{__name__}.serve_openai", fromlist=["add_serve_openai"]).add_serve_openai,
        client.add_client_parser,
        bench.add_bench_parser,
        demo.add_demo_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Progress of long steps (engine builds, benchmark skips) goes to stderr, results to stdout. Other libraries
    # say only what is wrong: their INFO lines (one per HTTP request from the openai client's httpx) are noise.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("canary_qwen").setLevel(logging.INFO)
    try:
        return args.run(args)
    except CanaryQwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
