"""What ``serve-openai`` costs per transcription over the engine or the Triton server it calls, one request at a time.

Local: ``serve-openai --model CKPT --backend torch-fast`` (the engine in its process). Each clip goes alone through the
official openai client (``audio.transcriptions.create``); the server's ``canary_qwen_openai_engine_busy_seconds_total``
says how long its engine worked, and the rest of the requests' time is serve-openai's (HTTP, the upload, decoding
the audio, the engine loop's hand-over) and the client's.

Triton: the torch-fast repository under ``canary-qwen serve``. Each clip goes straight to Triton (gRPC,
``TritonClient.infer``) and then through ``serve-openai --triton``, clip by clip, so that both see the machine at the
same speed: the difference is serve-openai's.

Every request asks for ``--max-new-tokens`` tokens (random weights never stop early). One untimed warm-up request
before each pass. Writes results.json and results.md to --out.

    python scripts/openai_overhead.py --model CKPT --dtype int8 --synthetic mixed:2-8:16 --out docs/bench/openai_overhead
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import soundfile as sf
from openai_server import serve_openai

from canary_qwen.bench.data import synthetic_set
from canary_qwen.client.triton import TritonClient
from canary_qwen.defaults import SAMPLE_RATE
from canary_qwen.serving.engine_flavor import generate_engine_repo
from canary_qwen.serving.server import TritonServer

MODEL = "canary-qwen-2.5b"
BUSY = re.compile(r"^canary_qwen_openai_engine_busy_seconds_total\s+(\S+)", re.M)


def engine_busy_s(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return float(BUSY.search(r.read().decode())[1])


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)


def transcribe_file(client, path: Path) -> float:
    """Seconds for one file through the openai client."""
    start = time.perf_counter()
    with open(path, "rb") as f:
        client.audio.transcriptions.create(model=MODEL, file=f, response_format="json")
    return time.perf_counter() - start


def transcribe_direct(client: TritonClient, clip, budget: int) -> float:
    start = time.perf_counter()
    client.infer(clip, max_new_tokens=budget)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint (torch-fast)")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--synthetic", default="mixed:2-8:16", help="clips, as for `canary-qwen bench`")
    p.add_argument(
        "--max-new-tokens", type=int, default=28, help="tokens per request (default: 28, 3.5 per second at 8 s)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    audio = synthetic_set(args.synthetic).audio or []
    engine = ["--model", args.model, "--backend", "torch-fast", "--dtype", args.dtype]
    budget = ["--max-new-tokens", str(args.max_new_tokens), "--log-level", "warning"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, clip in enumerate(audio):
            files.append(Path(tmp) / f"{i:02d}.wav")
            sf.write(files[-1], clip, SAMPLE_RATE, subtype="FLOAT")
        with serve_openai([*engine, "--max-batch", "4", *budget], out / "serve_openai_local.log") as url:
            client = openai_client(url)
            transcribe_file(client, files[0])  # warm-up
            before = engine_busy_s(url)
            seconds = [transcribe_file(client, f) for f in files]
            busy = engine_busy_s(url) - before
        rows.append({"path": "serve-openai, its engine in-process", "requests": len(files), "seconds": sum(seconds),
                     "engine_s": busy})  # fmt: skip
        repo = generate_engine_repo("torch-fast", args.model, Path(tmp) / "repo", max_batch=4, dtype=args.dtype)
        with TritonServer(repo, startup_timeout=1800, work_dir=Path(tmp) / "server") as triton:
            forward = ["--triton", triton.grpc_url, *budget]
            with (
                serve_openai(forward, out / "serve_openai_triton.log") as url,
                TritonClient(triton.grpc_url, "grpc", timeout_s=600) as direct,
            ):
                client = openai_client(url)
                transcribe_direct(direct, audio[0], args.max_new_tokens)  # warm-up, both ways
                transcribe_file(client, files[0])
                # Alternating, clip by clip: both paths see the machine at the same speed.
                pairs = [
                    (transcribe_direct(direct, clip, args.max_new_tokens), transcribe_file(client, path))
                    for clip, path in zip(audio, files)
                ]
    rows.append({"path": "Triton directly (gRPC)", "requests": len(pairs), "seconds": sum(d for d, _ in pairs)})
    rows.append({"path": "serve-openai --triton", "requests": len(pairs), "seconds": sum(o for _, o in pairs)})
    local, direct_s, forwarded = rows[0], rows[1]["seconds"], rows[2]["seconds"]
    summary = {
        "local_overhead_ms_per_request": 1000 * (local["seconds"] - local["engine_s"]) / local["requests"],
        "local_overhead_share": (local["seconds"] - local["engine_s"]) / local["engine_s"],
        "triton_overhead_ms_per_request": 1000 * (forwarded - direct_s) / len(files),
        "triton_overhead_share": (forwarded - direct_s) / direct_s,
    }
    report = {"command": shlex.join(["python", "scripts/openai_overhead.py", *sys.argv[1:]]), "rows": rows, **summary}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Command: `{report['command']}`",
        "",
        "| path | requests | seconds | engine busy (s) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        engine_s = f"{r['engine_s']:.2f}" if "engine_s" in r else ""
        lines.append(f"| {r['path']} | {r['requests']} | {r['seconds']:.2f} | {engine_s} |")
    lines += [
        "",
        f"serve-openai over its in-process engine: {summary['local_overhead_ms_per_request']:.0f} ms per request "
        f"({100 * summary['local_overhead_share']:.1f} % of the engine's time).",
        f"serve-openai --triton over Triton directly: {summary['triton_overhead_ms_per_request']:.0f} ms per request "
        f"({100 * summary['triton_overhead_share']:.1f} %).",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
