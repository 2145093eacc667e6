"""`canary-qwen serve` restarts the REAL bundled tritonserver (tiny onnx export) when a model process dies or Triton
exits: in-flight callers hear at once, the server is back on the same ports and answers as the local backend
does, a server that keeps dying stops after the limit, and nothing (process, /dev/shm segment) is left behind.
The restart policy's arithmetic is tested without a server. About 60 s on 2 cores (a start ~4 s, a restart ~7 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import HAVE_TRITON, NO_TRITON, make_clip, needs_server

import canary_qwen
from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.client.triton import TritonClient
from canary_qwen.errors import UsageError
from canary_qwen.serving.onnx_flavor import generate_onnx_repo
from canary_qwen.serving.processes import python_stubs
from canary_qwen.serving.server import DEAD_STUB_EXIT
from canary_qwen.serving.supervisor import STATUS_FILE, RestartBudget, RestartPolicy

TOKEN_LIMIT = 4096  # an in-flight decode this long outlasts every wait below


# -- the policy, without a server ---------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_restart_budget_doubles_the_wait_caps_it_and_forgets_old_restarts():
    clock = Clock()
    budget = RestartBudget(RestartPolicy(max_restarts=5, window_s=300, backoff_s=1, max_backoff_s=6), clock)
    delays = []
    for _ in range(5):
        delays.append(budget.next_delay())
        clock.t += 10
    assert delays == [1, 2, 4, 6, 6]
    assert budget.next_delay() is None and budget.in_window() == 5  # the sixth within 300 s: give up
    clock.t = 1000 + 300.5  # the first restart (at 1000) left the window
    assert budget.in_window() == 4 and budget.next_delay() == 6
    clock.t += 1000
    assert budget.in_window() == 0 and budget.next_delay() == 1  # a quiet while: back to the first wait


def test_restart_budget_of_zero_never_restarts_and_bad_policies_are_refused():
    assert RestartBudget(RestartPolicy(max_restarts=0), Clock()).next_delay() is None
    with pytest.raises(UsageError):
        RestartPolicy(window_s=0)
    with pytest.raises(UsageError):
        RestartPolicy(max_restarts=-1)


# -- the real server ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    return generate_onnx_repo(
        tiny_export,
        tmp_path_factory.mktemp("restart") / "repo",
        max_batch=8,
        queue_delay_us=20000,
        bounds=RequestBounds(max_new_tokens_limit=TOKEN_LIMIT),
    )


@pytest.fixture(scope="module")
def clips():
    return [make_clip(0.5 + 0.6 * i, 700 + i) for i in range(4)]


@pytest.fixture(scope="module")
def expected(tiny_export, clips):
    return [t.text for t in OnnxBackend(tiny_export).transcribe(clips)]


class Serve:
    """`canary-qwen serve` (the real command line) in a process of its own; its output is collected as it comes."""

    def __init__(self, repo, work_dir, *args):
        if not HAVE_TRITON:
            pytest.skip(NO_TRITON)
        self.work_dir = Path(work_dir)
        code = "import sys; from canary_qwen.cli import main; sys.exit(main(sys.argv[1:]))"
        argv = [sys.executable, "-c", code, "serve", "--repo", str(repo), "--work-dir", str(work_dir), *args]
        env = {**os.environ, "PYTHONPATH": str(Path(canary_qwen.__file__).parent.parent)}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self.seen: set[int] = set()  # every tritonserver and python model process this serve has run
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")), daemon=True).start()
        self.wait_for(lambda: any(line.startswith("Ctrl-C") for line in self.out), 120, "the first start")
        self.http = self._address("HTTP")
        self.grpc = self._address("gRPC")

    def _address(self, name):
        return next(line.split()[1] for line in self.out if line.strip().startswith(name))

    def wait_for(self, condition, timeout, what, running=True):
        """Wait until ``condition()``; fail after ``timeout`` s, or at once if serve exits while it should be ``running``."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{''.join(self.out + self.err)}"
            assert not running or self.proc.poll() is None, f"serve exited before {what}:\n{''.join(self.err)}"
            time.sleep(0.1)

    def triton(self) -> int:
        """The pid of the tritonserver running now."""
        pids = _children(self.proc.pid)
        assert len(pids) == 1, pids
        self.seen.add(pids[0])
        return pids[0]

    def stubs(self) -> dict:
        stubs = {s.model: s for s in python_stubs(self.triton())}
        self.seen.update(s.pid for s in stubs.values())
        return stubs

    def status(self) -> dict:
        return json.loads((self.work_dir / STATUS_FILE).read_text())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def restarted(self, n) -> bool:
        return self.status()["restarts"] == n and self.status()["state"] == "ready" and self.ready()

    def assert_nothing_left(self):
        """After serve exited: none of its processes and none of its shared-memory segments remain."""
        assert self.proc.poll() is not None
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in self.seen if _alive(p)], "a tritonserver or python model process outlived serve"
        assert not list(Path("/dev/shm").glob(f"canary_qwen_{self.proc.pid}_*"))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in self.seen:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _in_flight(grpc, clip, kind, outcome):
    try:
        with TritonClient(grpc, "grpc", timeout_s=60) as client:
            if kind == "stream":
                "".join(client.stream(clip, max_new_tokens=TOKEN_LIMIT))
            else:
                client.transcribe(clip, max_new_tokens=TOKEN_LIMIT)
        outcome[kind] = ("answered", time.monotonic())
    except Exception as e:
        outcome[kind] = (type(e).__name__, time.monotonic())


@needs_server
def test_serve_restarts_triton_when_a_model_process_dies(repo, clips, expected, tmp_path):
    serve = Serve(repo, tmp_path / "work")
    try:
        stubs = serve.stubs()
        assert {"encoder", "llm", "canary_qwen_stream"} <= set(stubs)
        old_triton = serve.triton()
        regions = _regions(serve.proc.pid)
        assert regions
        kept = TritonClient(serve.grpc, "grpc", timeout_s=30)  # a long-lived client, used before and after
        assert kept.transcribe(clips[0]) == expected[0]

        outcome: dict = {}
        threads = [
            threading.Thread(target=_in_flight, args=(serve.grpc, clips[3], k, outcome)) for k in ("stream", "infer")
        ]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(stubs["llm"].pid, signal.SIGKILL)
        os.kill(stubs["canary_qwen_stream"].pid, signal.SIGKILL)
        for t in threads:
            t.join(30)
        for kind, (result, at) in outcome.items():  # a 4096-token decode takes far longer than this
            assert result != "answered" and at - killed < 5, (kind, result, at - killed)

        serve.wait_for(lambda: serve.restarted(1), 30 - (time.monotonic() - killed), "restart")
        assert serve.proc.poll() is None and serve.triton() != old_triton  # a new server, not restarted from outside
        status = serve.status()
        assert (status["http"], status["grpc"]) == (serve.http, serve.grpc)  # the same ports
        assert "python process of model instance" in status["last_cause"] and status["history"][0]["down_s"] < 30
        assert status["history"][0]["backoff_s"] == 1 and status["history"][0]["start_s"] > 0
        assert any("restart 1 of 5" in line and "died" in line for line in serve.err)
        again = _regions(serve.proc.pid)  # the faulted server's regions were removed, not left to pile up ...
        assert len(again) == len(regions) and not set(again) & set(regions)
        serve.stubs()

        # ... and every request from now on is answered as the local backend answers it, over both protocols
        assert kept.transcribe_many(clips, concurrency=4) == expected
        assert "".join(kept.stream(clips[1])) == expected[1]
        with TritonClient(serve.http, "http") as http:
            assert http.transcribe(clips[2]) == expected[2]
            assert "".join(http.stream(clips[3])) == expected[3]
        kept.close()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=30) == 0
        assert serve.status()["state"] == "stopped" and serve.status()["restarts"] == 1
        serve.assert_nothing_left()
    finally:
        serve.close()


@needs_server
def test_a_server_that_keeps_dying_stops_after_the_restart_limit(repo, clips, expected, tmp_path):
    serve = Serve(repo, tmp_path / "work", "--max-restarts", "2", "--restart-window-s", "120")
    try:
        os.kill(serve.triton(), signal.SIGKILL)  # tritonserver itself dies
        serve.wait_for(lambda: serve.restarted(1), 30, "restart after tritonserver died")
        assert serve.status()["last_cause"] == "tritonserver exited with signal 9"
        with TritonClient(serve.grpc, "grpc") as client:
            assert client.transcribe(clips[0]) == expected[0]

        os.kill(serve.stubs()["llm"].pid, signal.SIGKILL)
        serve.wait_for(lambda: serve.restarted(2), 30, "restart after a model process died")
        assert any(
            "restart 2 of 2" in line and "in 2 s" in line for line in serve.err
        )  # the second waits twice as long

        os.kill(serve.stubs()["llm"].pid, signal.SIGKILL)  # one fault too many within the window
        assert serve.proc.wait(timeout=30) == DEAD_STUB_EXIT
        serve.wait_for(lambda: any("giving up" in line for line in serve.err), 5, "reason", running=False)
        reason = next(line for line in serve.err if "giving up" in line)
        assert "python process of model instance llm_0_0" in reason and "2 restarts within 120 s" in reason
        assert serve.status()["state"] == "failed"
        assert not serve.ready()
        serve.assert_nothing_left()
    finally:
        serve.close()


def _regions(serve_pid) -> list[str]:
    """The names of the shared-memory segments of serve's server (each start makes new ones)."""
    return [p.name for p in Path("/dev/shm").glob(f"canary_qwen_{serve_pid}_*")]


def _stat(pid) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _stat(p.name)[1:2] == [str(pid)] and _alive(p.name)]


def _alive(pid) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"], ["X"])
