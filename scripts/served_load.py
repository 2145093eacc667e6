"""Load test of one served flavour against its local backend: every answer checked, memory sampled.

Starts the bundled Triton on the flavour's repository (as ``canary-qwen bench`` does for ``triton:FLAVOR``),
transcribes the clips locally with the same engine for the expected texts, warms the server up with one pass
and ``--warm-up-s`` seconds of the same load (the server's memory grows to its working size there), then runs ``canary-qwen client loadtest``'s load (``concurrency`` clients, a share of them streaming) for
``duration`` seconds, every answer's text and token ids checked against the local ones (the report's mismatches).
Prints and
writes (``--out``) the load report plus the server tree's resident memory after warm-up and after the run.

    python scripts/served_load.py --model CKPT --flavor torch-fast --dtype int8 --duration 120 --out docs/bench/x
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from canary_qwen.bench.data import load_set
from canary_qwen.bench.served import ServedBackend, tree_rss_bytes
from canary_qwen.client.loadtest import format_report, run_load
from canary_qwen.defaults import SAMPLE_RATE


class BudgetedTarget:
    """The server's client, sending each clip with its own budget (the one the local answers were made with)."""

    def __init__(self, client, clips, budgets):
        self.client = client
        self.budget = {id(c): b for c, b in zip(clips, budgets)}

    def infer(self, audio, prompt=None, *, max_new_tokens=None, with_ids=False):
        return self.client.infer(audio, prompt, max_new_tokens=self.budget[id(audio)], with_ids=with_ids)

    def stream_with_ids(self, audio, prompt=None, *, max_new_tokens=None):
        return self.client.stream_with_ids(audio, prompt, max_new_tokens=self.budget[id(audio)])

    def close(self) -> None:
        self.client.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint (torch-fast) or export (onnx, vllm)")
    p.add_argument("--flavor", default="torch-fast", choices=("torch-fast", "onnx", "vllm"))
    p.add_argument("--dtype", default=None, help="torch-fast / vllm precision (default fp32)")
    p.add_argument("--synthetic", default="mixed:2-8:16", help="clips (bench's --synthetic; default mixed:2-8:16)")
    p.add_argument("--tokens-per-second", type=float, default=3.5, help="budget per clip second (default 3.5)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--warm-up-s", type=float, default=30.0, help="seconds of the same load before measuring")
    p.add_argument("--out", help="folder for load.json")
    args = p.parse_args(argv)

    data = load_set(synthetic=args.synthetic, seed=0)
    clips = data.load(list(range(len(data))))
    budgets = [math.ceil(args.tokens_per_second * len(c) / SAMPLE_RATE) for c in clips]
    from canary_qwen.registry import create_backend

    local = create_backend(args.flavor, args.model, dtype=args.dtype or "fp32")
    expected = [(t.text, t.token_ids) for t in local.transcribe(clips, max_new_tokens=budgets)]
    close = getattr(local, "close", None)
    if callable(close):
        close()
    del local

    served = ServedBackend(args.flavor, args.model, dtype=args.dtype, slots=args.concurrency)
    try:
        pid = served.server.process.pid
        start = time.monotonic()
        warm = [(t.text, t.token_ids) for t in served.transcribe(clips, max_new_tokens=budgets)]
        print(f"warm-up pass {time.monotonic() - start:.1f} s, equal to local: {warm == expected}", file=sys.stderr)
        target = BudgetedTarget(served.client, clips, budgets)
        load = dict(concurrency=args.concurrency, stream_share=args.stream_share, expected=expected)
        warm_load = run_load(target, clips, duration_s=args.warm_up_s, **load)
        rss_warm = tree_rss_bytes(pid)
        report = run_load(target, clips, duration_s=args.duration, **load)
        rss_after = tree_rss_bytes(pid)
    finally:
        served.close()
    result = {
        "flavor": args.flavor,
        "dtype": args.dtype,
        "model": args.model,
        "synthetic": args.synthetic,
        "warm_up_equal_to_local": warm == expected,
        "warm_up_load": warm_load.as_dict(),
        "server_rss_after_warm_up_gb": round(rss_warm / 1e9, 3),
        "server_rss_after_run_gb": round(rss_after / 1e9, 3),
        "error_examples": report.error_examples,
        **report.as_dict(),
    }
    print(format_report(report))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not report.errors and not warm_load.errors and warm == expected else 1


if __name__ == "__main__":
    sys.exit(main())
