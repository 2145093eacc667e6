"""LLM mode's answer throughput: answer tokens per second, local and served, at 1 and N in flight.

Local: ``FastTorchBackend.answer`` (the engine answers every dialogue of a call in one continuously batched run).
Served: ``canary-qwen serve-openai`` on the same checkpoint and precision (its engine in the server's process),
``POST /v1/chat/completions`` through the official openai client, N requests at once. Each dialogue is a question
about a ~150-word transcript; random weights never stop early, so every answer is ``--max-new-tokens`` long. One
untimed warm-up call first. Writes results.json and results.md to --out.

    python scripts/llm_bench.py --model CKPT --dtype int8 --in-flight 1 16 --max-new-tokens 64 --out docs/bench/llm
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai_server import serve_openai

from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.model.prompt import Turn, about

WORDS = (
    "the team agreed to move the release to next week because the tests on the new build were still failing and "
    "the customer asked for a short note on what changed in the billing module before they sign off on the plan"
).split()
MODEL = "canary-qwen-2.5b"


def dialogue(i: int) -> list[Turn]:
    transcript = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(150))
    return [Turn("user", about("Summarise this call in three sentences:", transcript))]


def local(model: str, dtype: str, sizes: list[int], budget: int) -> list[dict]:
    backend = FastTorchBackend(model, dtype=dtype)
    backend.answer([dialogue(0)], max_new_tokens=4)  # warm-up: kernels, first allocations
    rows = []
    for n in sizes:
        start = time.perf_counter()
        answers = backend.answer([dialogue(i) for i in range(n)], max_new_tokens=budget)
        wall = time.perf_counter() - start
        tokens = sum(len(a.token_ids) for a in answers)
        rows.append(
            {"where": "local", "in_flight": n, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}
        )
    return rows


def served(model: str, dtype: str, sizes: list[int], budget: int, log: Path) -> list[dict]:
    import openai

    args = ["--model", model, "--backend", "torch-fast", "--dtype", dtype, "--max-batch", str(max(sizes))]
    with serve_openai([*args, "--log-level", "warning"], log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=900)

        def ask(i: int, tokens: int = budget) -> int:
            messages = [{"role": t.role, "content": t.content} for t in dialogue(i)]
            answer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=tokens)
            return answer.usage.completion_tokens

        ask(0, 4)  # warm-up
        rows = []
        for n in sizes:
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                tokens = sum(pool.map(ask, range(n)))
            wall = time.perf_counter() - start
            rows.append({"where": "served", "in_flight": n, "tokens": tokens, "seconds": wall,
                         "tokens_per_s": tokens / wall})  # fmt: skip
        return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = local(args.model, args.dtype, args.in_flight, args.max_new_tokens)
    rows += served(args.model, args.dtype, args.in_flight, args.max_new_tokens, out / "server.log")
    import torch

    report = {
        "command": shlex.join(["python", "scripts/llm_bench.py", *sys.argv[1:]]),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "engine": f"torch-fast {args.dtype} on {Path(args.model).name}",
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Command: `{report['command']}`", "", f"{report['hardware']}; {report['engine']}.", "",
             "| where | in flight | answer tokens | seconds | tokens/s |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['where']} | {r['in_flight']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
