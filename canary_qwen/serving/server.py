"""Run the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, without PyTriton.

The wheel ships Triton 2.51 with only the python backend, which is all the CPU model repository
needs. Running the binary ourselves (instead of through PyTriton's ``Triton`` class) lets us serve an
ordinary model repository: ensembles, decoupled streaming, our own config.pbtxt files.
What the binary needs that a plain ``pip install`` does not set up is ``bundled``'s job; its stub processes
are ``processes``'.

Triton 2.51 does not notice when a python model's process (its "stub") dies: the model stays "ready" and
every request to it fails. ``TritonServer.dead_stubs`` finds such processes; ``serve_forever``
(``canary_qwen.serving.supervisor``) restarts the server on the same ports then, or exits with
``DEAD_STUB_EXIT`` for a supervisor of its own to restart it.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ..errors import CanaryQwenError, UsageError
from .bundled import (
    check_numpy,
    find_bundled_triton,
    prepare_backend_dir,
    server_env,
)
from .processes import Stub, killpg, python_stubs, terminate_with_parent

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
_instance_ids = itertools.count()
_ERROR_LINE = re.compile(r"^E\d{4} ")
# Triton's line for a model whose initialize() raised: "failed to load 'NAME' version N: Internal: REASON\n\nAt: ..."
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n|\"?$)", re.M)
_BENIGN = ("CudaDriverHelper has not been initialized",)  # logged on every CPU-only start
DEAD_STUB_EXIT = 3  # serve_forever's exit code when a model's python process died


class TritonStartError(CanaryQwenError):
    """tritonserver exited or did not become ready: the models that failed to load and why, or its log's tail."""


def load_failures(log: str) -> list[str]:
    """ "model 'NAME' did not load: REASON" for each model the log says failed to load, in order, once each."""
    found = dict.fromkeys(f"model '{m[1]}' did not load: {m[2].strip()}" for m in _LOAD_FAILURE.finditer(log))
    return list(found)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (tritonserver refuses port 0, so we must choose)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)  # held open until all are picked so they differ
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """A tritonserver process serving ``repo_dir``; use as a context manager.

    Ports left as None are picked free ones. Everything binds to ``host`` (loopback by default).
    The process runs in its own process group so a Ctrl-C in the terminal reaches us, not it, and
    we can shut it down in order (SIGTERM, then SIGKILL for the whole group on timeout). Started from the
    main thread on Linux, it also gets SIGTERM when this process dies, however it dies (kill -9 included),
    and then unloads its models, frees its shared memory and exits instead of living on with the ports.
    """

    def __init__(
        self,
        repo_dir: str | os.PathLike,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_verbose: int = 0,
        model_control: str = "none",
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 120.0,
        exit_timeout: int = 10,
        work_dir: str | os.PathLike | None = None,
        backend_dir: str | os.PathLike | None = None,
    ):
        if model_control not in MODEL_CONTROL_MODES:
            raise UsageError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {model_control!r}")
        self.repo_dir = Path(repo_dir).resolve()
        if not self.repo_dir.is_dir():
            raise UsageError(f"model repository {self.repo_dir} is not a directory")
        self.triton = find_bundled_triton()
        self._ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._ports
        self.log_verbose = log_verbose
        self.model_control = model_control
        self.extra_args = list(extra_args)
        self.host = host
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="canary-qwen-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._own_backend = backend_dir is None
        self.backend_dir = Path(backend_dir) if backend_dir else self.work_dir / "backends"
        self.log_path = self.work_dir / "tritonserver.log"
        self._shm_prefix = f"canary_qwen_{os.getpid()}_{next(_instance_ids)}_"  # two servers never share shm names
        self.process: subprocess.Popen | None = None
        self._stubs: list[Stub] = []

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http`` (it takes no scheme)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        h = self.host
        return [
            str(self.triton.binary),
            f"--model-repository={self.repo_dir}",
            f"--backend-directory={self.backend_dir}",
            f"--cache-directory={self.triton.caches}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--model-control-mode={self.model_control}",
            f"--http-address={h}",
            f"--http-port={self.http_port}",
            f"--grpc-address={h}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={h}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout}",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start and wait until ``/v2/health/ready``; retry with new ports if a picked one was taken meanwhile.

        The ports of the first successful start are kept: a server stopped and started again (``serve``'s
        restarts) comes back at the same addresses, or fails to start if one of them is taken."""
        if self.process is not None:
            raise RuntimeError("server already started")
        check_numpy()
        if self._own_backend:
            prepare_backend_dir(self.backend_dir, self.triton)
        # The python stubs ignore PYTHONPATH and put their working directory (work_dir) first on sys.path: link
        # the canary_qwen this process runs there, so the models run the same code (a checkout's, say).
        package, ours = self.work_dir / "canary_qwen", Path(__file__).resolve().parent.parent
        if package.is_symlink() and package.resolve() != ours:  # a work_dir used before by another copy
            package.unlink()
        if not package.exists():
            package.symlink_to(ours, target_is_directory=True)
        auto_ports = None in self._ports
        try:
            for attempt in range(3 if auto_ports else 1):
                picked = iter(free_ports(3, self._client_host))
                self.http_port, self.grpc_port, self.metrics_port = (
                    p if p is not None else next(picked) for p in self._ports
                )
                try:
                    self._launch_and_wait()
                    self._ports = (self.http_port, self.grpc_port, self.metrics_port)
                    return self
                except TritonStartError as e:
                    if not (auto_ports and "already in use" in str(e) and attempt < 2):
                        raise
            raise AssertionError("unreachable")
        except BaseException:  # failed, timed out or Ctrl-C: leave no process and no backend copy behind
            self.stop()
            raise

    def _launch_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(self.triton),
                cwd=self.work_dir,
                start_new_session=True,
                preexec_fn=terminate_with_parent(),
            )
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                killpg(self.process.pid)
                self.process = None
                raise self._start_failure(f"tritonserver exited with code {code} during start-up")
            if _ready(url):
                self._stubs = python_stubs(self.process.pid)
                return
            if time.monotonic() > deadline:
                raise self._start_failure(f"tritonserver not ready after {self.startup_timeout:.0f} s")
            time.sleep(0.1)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def dead_stubs(self) -> list[Stub]:
        """The python model processes that died since the last call while their model is still reported ready
        (a model unloaded on purpose is not ready any more). Every request to such a model fails."""
        if self.process is None or self.process.poll() is not None:
            return []
        running = python_stubs(self.process.pid)
        gone = [s for s in self._stubs if s not in running]
        self._stubs = running
        return [s for s in gone if _ready(f"http://{self.http_url}/v2/models/{s.model}/ready")]

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default exit_timeout + 5 s), then SIGKILL the process group.

        Returns the exit code (None if never started). Idempotent. Close HTTP clients first: open
        keep-alive connections make tritonserver wait for them up to --exit-timeout-secs.
        """
        proc, self.process = self.process, None
        if proc is not None:
            timeout = self.exit_timeout + 5 if timeout is None else timeout
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    killpg(proc.pid)
                    proc.wait()
            killpg(proc.pid)  # stragglers: stubs left by a crashed or killed server share its group
            # A killed server's python stubs leave their shared-memory regions behind; nothing else uses this prefix.
            for region in Path("/dev/shm").glob(self._shm_prefix + "*"):
                region.unlink(missing_ok=True)
        if self._own_backend:
            shutil.rmtree(self.backend_dir, ignore_errors=True)  # the log stays for callers to read
        return None if proc is None else proc.returncode

    def _start_failure(self, what: str) -> TritonStartError:
        """One line with the cause where the log names the models that failed to load (the log's path after
        it), else the log's error lines and tail."""
        try:
            failures = load_failures(self.log_path.read_text(errors="replace"))
        except OSError:
            failures = []
        if failures:
            return TritonStartError(f"{'; '.join(failures)} ({what}; log: {self.log_path})")
        return TritonStartError(f"{what} (log: {self.log_path}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """Error lines of the log (the real cause scrolls out of the tail behind the shutdown chatter), then its tail."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [
            ln for ln in text if (_ERROR_LINE.match(ln) and not any(n in ln for n in _BENIGN)) or "UNAVAILABLE" in ln
        ]
        tail = text[-lines:]
        errors = [ln for ln in errors if ln not in tail]
        return "\n".join((["errors:", *errors, "last lines:"] if errors else []) + tail)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort: never leave an orphan server behind
        if getattr(self, "process", None) is not None:
            try:
                self.stop(timeout=5)
            except Exception:
                pass


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
