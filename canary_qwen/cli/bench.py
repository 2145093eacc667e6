"""``canary-qwen bench``: registered by ``canary_qwen.cli`` through :func:`add_bench_parser`."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap

from ..bench.report import METHOD
from ..defaults import MAX_NEW_TOKENS
from ..precision import Precision
from ..registry import BACKENDS

EPILOG = """\
examples:
  # NeMo vs this package's PyTorch path, FACTS anchor set (768 clips of 2-20 s), two batch sizes
  canary-qwen bench --model ckpt --backends nemo torch --synthetic mixed:2-20:768 \\
      --batch-size 64 192 --tokens-per-second 3.5 --dtype bf16 --device cuda --out bench/
  # real weights on a test set with references (WER), leaderboard settings
  canary-qwen bench --model nvidia/canary-qwen-2.5b --backends nemo onnx --export-dir export/ \\
      --manifest test.jsonl --batch-size 192 --out bench/ --docs docs/benchmarks.md
  # served against local on a CPU: the torch-fast flavour in int8 at 1, 4 and 16 requests in flight
  canary-qwen bench --model ckpt --export-dir export/ --synthetic mixed:2-8:16 --batch-size 16 \\
      --backends nemo torch-fast:int8 triton:torch-fast:int8 triton:onnx

Backends that cannot run here (not installed, no export directory, no server) are listed as
skipped with the reason; a batch size that fails (e.g. out of memory) is recorded as failed and
the benchmark goes on. The exit code is 1 when no run succeeded.
"""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _run_spec(text: str) -> str:
    from ..bench.backends import RunSpec
    from ..errors import CanaryQwenError

    try:
        RunSpec.parse(text)
    except CanaryQwenError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _synthetic_spec(text: str) -> str:
    from ..bench.data import parse_synthetic_spec

    try:
        parse_synthetic_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="measure RTFx (and WER) of NeMo and this package's backends, leaderboard method",
        description=textwrap.fill("Throughput benchmark. " + METHOD, 100),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        help="checkpoint directory or Hugging Face id (nemo, torch, torch-fast); "
        "an export directory also works for onnx",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        type=_run_spec,
        default=["nemo", "torch"],
        metavar="NAME[:DTYPE][=SOURCE]",
        help=f"backends to run, in order: {', '.join(BACKENDS)} (default: nemo torch); ':DTYPE' gives one its own "
        "precision (e.g. nemo:bf16, torch-fast:int8), '=SOURCE' its own checkpoint, export or server "
        "(e.g. onnx=export_int8/), so one run compares them; triton:FLAVOR[:DTYPE] (FLAVOR torch-fast, onnx or "
        "vllm) is served: the run writes that repository, starts the bundled Triton and sends the clips over gRPC "
        "with --batch-size requests in flight, reporting latency, the server's memory and whether its tokens equal "
        "the local entry's (e.g. triton:torch-fast:int8 beside torch-fast:int8)",
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--manifest", help="JSONL manifest: audio_filepath (relative to the manifest), duration, optional text"
    )
    data.add_argument(
        "--synthetic",
        metavar="SPEC",
        type=_synthetic_spec,
        help="in-memory seeded set: mixed:MIN-MAX:N (durations uniform in [MIN, MAX] s) or uniform:SECONDS:N",
    )
    p.add_argument(
        "--batch-size",
        nargs="+",
        type=_positive_int,
        default=[192],
        metavar="N",
        help="one or more batch sizes, each a separate run (default: 192, the leaderboard's)",
    )
    p.add_argument(
        "--tokens-per-second",
        type=_positive_float,
        default=None,
        metavar="R",
        help="token budget ceil(R x audio seconds) (3.5 for random weights, which never stop early); "
        "default: a fixed --max-new-tokens, for real weights",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=MAX_NEW_TOKENS,
        help="fixed budget without --tokens-per-second (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=Precision.choices(Precision.FP32, Precision.BF16),
        default=None,
        help="precision (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--export-dir",
        default=None,
        help="`canary-qwen export` output for onnx/trt (default: --model if it holds manifest.json)",
    )
    p.add_argument("--url", default=None, help="Triton server URL for the triton backend (default: localhost:8000)")
    p.add_argument(
        "--warmup-batches", type=int, default=1, help="untimed warm-up batches before the timed pass (default: 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set (default: 0)")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write results.json, results.md, rtfx.png, hypotheses.jsonl here"
    )
    p.add_argument("--docs", default=None, metavar="PATH", help="also render a docs page (e.g. docs/benchmarks.md)")
    p.add_argument(
        "--docs-with",
        nargs="+",
        default=[],
        metavar="DIR",
        help="earlier --out folders whose results the docs page shows after this run's",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_bench)
    return p


def command_line(args: argparse.Namespace) -> str:
    """The invocation, rebuilt from the parsed options (exact even when main() got an argv list)."""
    parts = ["canary-qwen", "bench"]
    if args.model:
        parts += ["--model", args.model]
    parts += ["--backends", *args.backends]
    parts += ["--manifest", args.manifest] if args.manifest else ["--synthetic", args.synthetic]
    parts += ["--batch-size", *map(str, args.batch_size)]
    if args.tokens_per_second is not None:
        parts += ["--tokens-per-second", f"{args.tokens_per_second:g}"]
    elif args.max_new_tokens != MAX_NEW_TOKENS:
        parts += ["--max-new-tokens", str(args.max_new_tokens)]
    for flag, value in (
        ("--dtype", args.dtype),
        ("--device", args.device),
        ("--export-dir", args.export_dir),
        ("--url", args.url),
        ("--out", args.out),
        ("--docs", args.docs),
    ):
        if value is not None:
            parts += [flag, str(value)]
    if args.warmup_batches != 1:
        parts += ["--warmup-batches", str(args.warmup_batches)]
    if args.synthetic and args.seed != 0:
        parts += ["--seed", str(args.seed)]
    if args.docs_with:
        parts += ["--docs-with", *args.docs_with]
    return shlex.join(parts)


def config_from_args(args: argparse.Namespace):
    from ..bench.runner import BenchConfig

    return BenchConfig(
        backends=list(args.backends),
        batch_sizes=list(args.batch_size),
        model=args.model,
        export_dir=args.export_dir,
        manifest=args.manifest,
        synthetic=args.synthetic,
        tokens_per_second=args.tokens_per_second,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        url=args.url,
        seed=args.seed,
        warmup_batches=args.warmup_batches,
        command=command_line(args),
    )


def run_bench(args: argparse.Namespace) -> int:
    from ..bench.report import load_results, markdown_table, write_docs, write_results
    from ..bench.runner import run_benchmark

    earlier = [load_results(d) for d in args.docs_with]  # a missing folder fails before the long run
    results = run_benchmark(config_from_args(args), progress=not args.no_progress)
    print(markdown_table(results))
    if args.out:
        paths = write_results(results, args.out)
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if args.docs:
        print(f"wrote {write_docs([results, *earlier], args.docs, portable=True)}", file=sys.stderr)
    return 0 if any(not r["skipped"] for r in results["runs"]) else 1
