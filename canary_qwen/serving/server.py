"""Run the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, without PyTriton.

The wheel ships Triton 2.51 with only the python backend, which is all the CPU model repository
needs. Running the binary ourselves (instead of through PyTriton's ``Triton`` class) lets us serve an
ordinary model repository: ensembles, decoupled streaming, our own config.pbtxt files.
Everything the binary needs that a plain ``pip install`` does not set up is done here: a backend
folder with the stub for this interpreter, PATH so the stub embeds *this* Python (and its
site-packages), LD_LIBRARY_PATH for the wheel's vendored libraries and for the matching libpython.

Triton 2.51 does not notice when a python model's process (its "stub") dies: the model stays "ready" and
every request to it fails. ``TritonServer.dead_stubs`` finds such processes; ``serve_forever``
(``canary_qwen.serving.supervisor``) restarts the server on the same ports then, or exits with
``DEAD_STUB_EXIT`` for a supervisor of its own to restart it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from ..errors import BackendUnavailable, CanaryQwenError, UsageError

INSTALL_HINT = "pip install nvidia-pytriton==0.7.0  (or: pip install 'canary-qwen[serve]')"
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
_instance_ids = itertools.count()
_ERROR_LINE = re.compile(r"^E\d{4} ")
# Triton's line for a model whose initialize() raised: "failed to load 'NAME' version N: Internal: REASON\n\nAt: ..."
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (?:Internal: )?(.*?)(?:\\n|\"?$)", re.M)
_BENIGN = ("CudaDriverHelper has not been initialized",)  # logged on every CPU-only start
DEAD_STUB_EXIT = 3  # serve_forever's exit code when a model's python process died
_PR_SET_PDEATHSIG = 1
STUB_BINARY = b"triton_python_backend_stub"


class TritonNotFoundError(BackendUnavailable):
    """The bundled tritonserver (nvidia-pytriton wheel) is not installed or is incomplete."""


class TritonStartError(CanaryQwenError):
    """tritonserver exited or did not become ready: the models that failed to load and why, or its log's tail."""


def load_failures(log: str) -> list[str]:
    """ "model 'NAME' did not load: REASON" for each model the log says failed to load, in order, once each."""
    found = dict.fromkeys(f"model '{m[1]}' did not load: {m[2].strip()}" for m in _LOAD_FAILURE.finditer(log))
    return list(found)


@dataclass(frozen=True)
class BundledTriton:
    """Paths inside an installed ``nvidia-pytriton`` wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver
    binary: Path  # root/bin/tritonserver
    python_backend: Path  # root/backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stubs: Path  # root/python_backend_stubs/<major.minor>/triton_python_backend_stub
    caches: Path  # root/caches (response cache plugins)
    libs: Path  # .../site-packages/nvidia_pytriton.libs (vendored shared libraries)

    def stub_for(self, version: str | None = None) -> Path:
        """The python backend stub built for ``version`` ("3.11"; default: the running interpreter)."""
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / "triton_python_backend_stub").is_file())
            raise TritonNotFoundError(
                f"nvidia-pytriton has no python backend stub for Python {version} (it has: {', '.join(have) or 'none'}); "
                "run the server from a virtualenv with one of those Python versions"
            )
        return stub


def find_bundled_triton() -> BundledTriton:
    """Locate tritonserver in the installed ``pytriton`` package (found without importing it)."""
    spec = util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(f"the Triton server is not installed: {INSTALL_HINT}")
    package = Path(list(spec.submodule_search_locations)[0])
    root = package / "tritonserver"
    triton = BundledTriton(
        root=root,
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stubs=root / "python_backend_stubs",
        caches=root / "caches",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    needed = [
        triton.binary,
        triton.python_backend / "libtriton_python.so",
        triton.python_backend / "triton_python_backend_utils.py",
        triton.stubs,
        triton.libs,
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise TritonNotFoundError(
            f"the pytriton package at {package} lacks {', '.join(missing)} (a source build or another version?): {INSTALL_HINT}"
        )
    return triton


def prepare_backend_dir(
    dest: str | os.PathLike, triton: BundledTriton | None = None, python_version: str | None = None
) -> Path:
    """Assemble ``dest/python/`` the way tritonserver expects, and return ``dest`` (for --backend-directory).

    The wheel keeps the stubs for all Python versions apart from the backend library; the backend looks
    for ``triton_python_backend_stub`` next to ``libtriton_python.so``, so the one matching the
    interpreter that will run the models is copied in.
    """
    triton = triton or find_bundled_triton()
    stub = triton.stub_for(python_version)
    dest = Path(dest)
    folder = dest / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for src in (
        triton.python_backend / "libtriton_python.so",
        triton.python_backend / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, folder / src.name)
    return dest


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


def server_env(triton: BundledTriton, base: dict | None = None) -> dict:
    """Environment for tritonserver and its python stubs.

    The venv's bin goes first on PATH: the stub embeds Python and finds its prefix (so pyvenv.cfg and the
    venv's site-packages) from the ``python3`` it sees there. LIBDIR goes on LD_LIBRARY_PATH so the stub
    loads this interpreter's libpython, not a system one of the same version.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink to the base one
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    libs = [str(triton.libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    return env


def _check_numpy() -> None:
    # The 2.51 stub silently returns empty outputs under numpy 2 (measured); warn early instead.
    try:
        major = int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if major >= 2:
        warnings.warn(
            "numpy >= 2 is installed: Triton 2.51's python backend returns empty outputs with it; install numpy<2",
            RuntimeWarning,
            stacklevel=3,
        )


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
        _check_numpy()
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
                preexec_fn=_terminate_with_parent(),
            )
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                _killpg(self.process.pid)
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
                    _killpg(proc.pid)
                    proc.wait()
            _killpg(proc.pid)  # stragglers: stubs left by a crashed or killed server share its group
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


@dataclass(frozen=True)
class Stub:
    """A python backend stub process: the process that runs one instance of a python model."""

    pid: int
    model: str
    instance: str  # Triton's instance name, e.g. llm_0_0


def python_stubs(server_pid: int) -> list[Stub]:
    """The running python stubs of the tritonserver with pid ``server_pid`` (read from /proc; [] elsewhere)."""
    stubs = []
    for pid in _children(server_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # stub argv (python_backend stub_launcher.cc): binary, model.py path, shm region, shm sizes, parent pid,
        # backend dir, ipc handle, instance name, ...
        if argv[0].endswith(STUB_BINARY) and len(argv) > 8:
            stubs.append(Stub(pid, Path(os.fsdecode(argv[1])).parent.parent.name, os.fsdecode(argv[8])))
    return stubs


def _children(pid: int) -> list[int]:
    """Running (not zombie) child processes of ``pid``."""
    kids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(entry.name))
    return kids


def _terminate_with_parent():
    """A preexec_fn that has the kernel send SIGTERM to the child when the thread that started it exits (so only
    used from the main thread: a worker thread ends long before the process). None where prctl is not available."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
