"""``canary-qwen build-engines``: the TensorRT encoder plan and the TensorRT-LLM engine of an export (GPU)."""

from __future__ import annotations

import argparse

from ..defaults import MAX_NEW_TOKENS
from ..export.tensorrt.build import __doc__ as BUILD_DOC


def add_build_engines_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "build-engines",
        help="build the TensorRT encoder plan and the TensorRT-LLM engine of an export (GPU)",
        description=BUILD_DOC.split("\n\n", 1)[1].replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="export directory (from `canary-qwen export`)")
    p.add_argument("--max-batch", type=int, default=None, help="engine max batch (default: the export's --max-batch)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help="longest transcript the LLM engine allows (default: %(default)s)",
    )
    p.add_argument(
        "--max-prompt-text-tokens",
        type=int,
        default=64,
        help="prompt tokens around the audio the LLM engine allows (default: 64)",
    )
    p.add_argument("--only", choices=("encoder", "llm"), default=None, help="build one engine only")
    p.add_argument(
        "--quantized",
        metavar="METHOD",
        help="build the LLM engine from `canary-qwen quantize --method METHOD`'s TensorRT-LLM checkpoint",
    )
    p.add_argument(
        "--timing-cache",
        default=None,
        help="TensorRT timing cache to read and update for faster rebuilds (the LLM build uses FILE.llm)",
    )
    p.set_defaults(run=_run)


def _run(args) -> int:
    from ..export.tensorrt.build import build_engines

    built = build_engines(
        args.artifacts,
        max_batch=args.max_batch,
        max_new_tokens=args.max_new_tokens,
        max_prompt_text_tokens=args.max_prompt_text_tokens,
        only=args.only,
        timing_cache=args.timing_cache,
        quantized=args.quantized,
    )
    for name, path in built.items():
        print(f"{name}: {path}")
    return 0
