"""``canary-qwen serve-openai`` as a child process for the benchmark scripts: started on a free port, ready when its
``/health`` answers, stopped on leaving."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from canary_qwen.serving.server import free_ports


@contextmanager
def serve_openai(args: Sequence[str], log: Path, ready_s: float = 900) -> Iterator[str]:
    """Run ``serve-openai ARGS --port P`` (its output in ``log``); yields its base URL (``http://127.0.0.1:P``)."""
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "canary_qwen.cli", "serve-openai", "--port", str(port), *args]
    with open(log, "wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                        break
                except Exception:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"serve-openai did not become ready; see {log}")
                time.sleep(2)
            yield url
        finally:
            server.terminate()
            server.wait(60)
