"""Live transcription under load: how many sessions at once keep the partial text close behind the speech.

Starts ``canary-qwen serve-openai`` on a checkpoint (torch-fast, its engine in the server's process), then for each
session count plays that many sessions at once through ``canary-qwen client live``'s player (the official openai
client, real-time pace, 16 kHz PCM in 100 ms appends): each session's audio is speech-like utterances of 3-8 s with 1 s
pauses. Per level it reports:

- partial lag, p50 and p95: from the arrival of the last audio a re-decode covers to its hypothesis (the server's
  ``live_partial_lag_seconds`` histogram, interpolated within its buckets);
- end of speech to ``completed``, p50 and p95, as the client sees it: from sending an utterance's last sample to its
  final text (the VAD's silence wait, 500 ms, included);
- deltas and turns.

Writes results.json, results.md and lag.png to --out.

    python scripts/live_bench.py --model CKPT --dtype int8 --sessions 1 2 4 --audio-s 30 --out docs/bench/live
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from openai_server import serve_openai

from canary_qwen.bench.data import speech_like
from canary_qwen.client.live import play
from canary_qwen.defaults import SAMPLE_RATE

LAG = "canary_qwen_openai_live_partial_lag_seconds"
TARGET_LAG_S = 2.0


def session_audio(seconds: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """Utterances of 3-8 s with 1 s pauses (0.5 s before the first), about ``seconds`` long; and each utterance's
    last sample."""
    rng = np.random.default_rng(seed)
    parts, ends, total = [np.zeros(SAMPLE_RATE // 2, np.float32)], [], SAMPLE_RATE // 2
    while total < seconds * SAMPLE_RATE:
        n = int(rng.uniform(3, 8) * SAMPLE_RATE)
        parts += [speech_like(n, rng), np.zeros(SAMPLE_RATE, np.float32)]
        ends.append(total + n)
        total += n + SAMPLE_RATE
    return np.concatenate(parts), ends


def histogram(url: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts of one histogram of GET /metrics, by upper bound."""
    body = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    buckets = {}
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', body, re.MULTILINE):
        buckets[float(m.group(1))] = float(m.group(2))
    return buckets


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile of what was observed between two readings, linear within a bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return None
    target, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= target:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (target - below) / max(cumulative - below, 1e-9)
        lower, below = bound, cumulative
    return bounds[-1]


def level(url: str, sessions: int, audio_s: float) -> dict:
    audio = [session_audio(audio_s, 100 * sessions + i) for i in range(sessions)]
    before = histogram(url, LAG)
    results: list[dict] = [{} for _ in range(sessions)]

    def run(i: int) -> None:
        samples, ends = audio[i]
        arrivals: list[tuple[float, dict]] = []
        start = time.monotonic()
        played = play(f"{url}/v1", samples, on_event=lambda e: arrivals.append((time.monotonic(), e)))
        completed = [t for t, e in arrivals if e["type"].endswith("input_audio_transcription.completed")]
        results[i] = {
            "final_s": [t - (start + end / SAMPLE_RATE) for t, end in zip(completed, ends)],
            "turns": len(completed),
            "utterances": len(ends),
            "deltas": sum(e["type"].endswith("transcription.delta") for _, e in arrivals),
            "errors": played.errors,
        }

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = histogram(url, LAG)
    finals = np.array([s for r in results for s in r["final_s"]])
    return {
        "sessions": sessions,
        "audio_s": round(sum(len(a) for a, _ in audio) / SAMPLE_RATE, 1),
        "partial_lag_p50_s": quantile(before, after, 0.5),
        "partial_lag_p95_s": quantile(before, after, 0.95),
        "partials": (after.get(float("inf"), 0) - before.get(float("inf"), 0)),
        "final_p50_s": float(np.percentile(finals, 50)) if len(finals) else None,
        "final_p95_s": float(np.percentile(finals, 95)) if len(finals) else None,
        "turns": sum(r["turns"] for r in results),
        "utterances": sum(r["utterances"] for r in results),
        "deltas": sum(r["deltas"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"{report['hardware']}; {report['engine']}; partial re-decode every {report['interval_s']} s; "
        f"{report['max_new_tokens']} new tokens per decode.",
        "",
        "| sessions | audio s | partial lag p50 / p95 (s) | end of speech -> completed p50 / p95 (s) | re-decodes | "
        "deltas | turns / utterances |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["levels"]:
        lines.append(
            f"| {r['sessions']} | {r['audio_s']} | {_fmt(r['partial_lag_p50_s'])} / {_fmt(r['partial_lag_p95_s'])} | "
            f"{_fmt(r['final_p50_s'])} / {_fmt(r['final_p95_s'])} | {int(r['partials'])} | {r['deltas']} | "
            f"{r['turns']} / {r['utterances']} |"
        )
    within = [r["sessions"] for r in report["levels"] if (r["partial_lag_p95_s"] or 1e9) <= TARGET_LAG_S]
    lines += ["", f"Sessions at once with partial lag p95 <= {TARGET_LAG_S:g} s: {max(within) if within else 'none'}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [r["sessions"] for r in levels]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("partial_lag_p50_s", "p50"), ("partial_lag_p95_s", "p95")):
        ax.plot(x, [r[key] if r[key] is not None else np.nan for r in levels], marker="o", label=f"partial lag {label}")
    ax.axhline(TARGET_LAG_S, color="grey", linestyle="--", label=f"{TARGET_LAG_S:g} s")
    ax.set_xlabel("live sessions at once")
    ax.set_ylabel("seconds")
    ax.set_xticks(x)
    ax.legend()
    ax.set_title(report["engine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint (torch-fast)")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--audio-s", type=float, default=30.0, help="audio per session (default: 30)")
    p.add_argument("--partial-interval-s", type=float, default=0.5)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="budget of each decode (default: 32, about 3.5 tokens per second of an 8 s utterance: random weights "
        "never stop early, a real transcript would)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server_args = ["--model", args.model, "--backend", "torch-fast", "--dtype", args.dtype]
    server_args += ["--partial-interval-s", str(args.partial_interval_s), "--max-new-tokens", str(args.max_new_tokens)]
    server_args += ["--max-batch", str(max(args.sessions) * 2), "--log-level", "warning"]
    with serve_openai(server_args, out / "server.log") as url:
        play(f"{url}/v1", session_audio(5, 0)[0], speed=2.0)  # warm-up: kernels, first allocations
        levels = []
        for n in args.sessions:
            levels.append(level(url, n, args.audio_s))
            print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
    import torch

    report = {
        "command": shlex.join(["python", "scripts/live_bench.py", *sys.argv[1:]]),
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "engine": f"torch-fast {args.dtype} on {Path(args.model).name}",
        "interval_s": args.partial_interval_s,
        "max_new_tokens": args.max_new_tokens,
        "levels": levels,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render(report))
    plot(report, out / "lag.png")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
