"""A served benchmark entry, ``triton:FLAVOR[:DTYPE]``: the flavour's model repository written for this run, the
bundled Triton serving it, and gRPC clients keeping a given number of requests in flight (the run's batch size).

What a deployment runs, measured the way the local rows are: the same clips and budgets, RTFx over the timed
pass, plus each request's latency, the server's peak memory (its whole process tree, sampled) and, for the engine
flavours, the seconds the engine itself was busy during the pass (its ``canary_qwen_engine_busy_seconds_total``
metric read before and after): the rest of the pass is the serving path's (``bench.overhead``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..backends.base import Transcription
from ..decoding import token_budgets
from ..errors import BackendUnavailable, UsageError

FLAVORS = ("torch-fast", "onnx", "vllm")  # the flavours the bundled (python-backend) Triton serves
STARTUP_TIMEOUT_S = 1800.0  # a full-size int8 engine loads and compiles its kernels before the server is ready
_RSS_EVERY_S = 0.25
_BUSY = re.compile(r"^canary_qwen_engine_busy_seconds_total\{[^}]*\}\s+(\S+)", re.M)


class ServedBackend:
    """``transcribe`` sends every clip as its own gRPC request, ``concurrency`` of them in flight at a time."""

    name = "triton"
    budget_scope = "per-clip"

    def __init__(self, flavor: str, source: str, *, device: str = "cpu", dtype: str | None = None, slots: int = 16):
        if flavor not in FLAVORS:
            raise UsageError(f"triton:{flavor}: the bundled Triton serves {', '.join(FLAVORS)}")
        from ..client.triton import TritonClient
        from ..serving.server import TritonServer

        self.flavor, self.concurrency = flavor, slots
        self.dtype = dtype or (None if flavor == "onnx" else "fp32")  # None: the export's
        self.latencies: list[float] = []
        self.engine_busy_s: float | None = None  # during the passes since ``reset`` (None: no engine metric)
        self._work = Path(tempfile.mkdtemp(prefix="canary-qwen-bench-", dir=_same_disk_as(source)))
        self.server = None
        try:
            repo = _write_repo(flavor, source, self._work / "repo", device=device, dtype=dtype, slots=slots)
            self.server = TritonServer(repo, startup_timeout=STARTUP_TIMEOUT_S, work_dir=self._work / "server")
            self.server.start()
            assert self.server.process is not None
            self._rss = _TreeRss(self.server.process.pid)
            self.client = TritonClient(self.server.grpc_url, "grpc", timeout_s=600)
        except BaseException:
            self.close()
            raise
        self.device = f"triton {flavor} on {device}"

    def transcribe(
        self, audios: Sequence[np.ndarray], *, prompt: str | None = None, max_new_tokens: int | Sequence[int] = 0
    ) -> list[Transcription]:
        budgets = token_budgets(max_new_tokens, len(audios))

        def one(i):
            start = time.perf_counter()
            text, ids = self.client.infer(audios[i], prompt, max_new_tokens=budgets[i], with_ids=True)
            self.latencies.append(time.perf_counter() - start)
            return Transcription(text=text, token_ids=ids)

        busy = self._engine_busy()
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(audios))), thread_name_prefix="bench-client") as pool:
            results = list(pool.map(one, range(len(audios))))
        self._rss.sample()  # a pass shorter than the sampling period still counts
        after = self._engine_busy()
        if busy is not None and after is not None:
            self.engine_busy_s = (self.engine_busy_s or 0.0) + after - busy
        return results

    def _engine_busy(self) -> float | None:
        """The engine's busy seconds so far, from the server's metrics (None where no model publishes them). The
        engine model publishes every 0.5 s and before each final response, so a pass's last answer is counted."""
        assert self.server is not None
        with urllib.request.urlopen(self.server.metrics_url, timeout=10) as r:
            found = _BUSY.findall(r.read().decode())
        return sum(map(float, found)) if found else None

    def reset(self) -> None:
        """Forget the warm-up's latencies, engine time and memory peak."""
        self.latencies.clear()
        self.engine_busy_s = None
        self._rss.peak = 0

    @property
    def server_peak_rss_gb(self) -> float:
        return self._rss.peak / 1e9

    def close(self) -> None:
        rss = getattr(self, "_rss", None)
        if rss is not None:
            rss.stop()
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self._work, ignore_errors=True)


def _write_repo(flavor: str, source: str, out: Path, *, device: str, dtype: str | None, slots: int) -> Path:
    if flavor == "onnx":
        if dtype is not None:
            raise UsageError("triton:onnx runs in its export's precision: leave the dtype out")
        from ..serving.onnx_flavor import generate_onnx_repo

        return generate_onnx_repo(source, out, max_batch=slots, device=device)
    from ..serving.engine_flavor import generate_engine_repo

    return generate_engine_repo(flavor, source, out, max_batch=slots, device=device, dtype=dtype)


def _same_disk_as(source: str) -> str | None:
    """Where to write the repository: the temp folder where it can hard-link ``source``'s files, else beside it
    (a full-size checkpoint would be copied across file systems otherwise)."""
    path = Path(source)
    if not path.exists():
        raise BackendUnavailable(f"{source} does not exist")
    tmp = Path(tempfile.gettempdir())
    return None if os.stat(tmp).st_dev == os.stat(path).st_dev else str(path.resolve().parent)


class _TreeRss:
    """The peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_RSS_EVERY_S):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, tree_rss_bytes(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc; 0 elsewhere)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
        rss[int(entry.name)] = int(fields[21]) * page
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)
