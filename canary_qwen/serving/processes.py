"""The processes around a running ``tritonserver``: its python stubs (one per python model instance, found in
/proc), a child that dies with the thread that started it, and a process group killed outright."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
STUB_BINARY = b"triton_python_backend_stub"


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


def terminate_with_parent():
    """A preexec_fn that has the kernel send SIGTERM to the child when the thread that started it exits (so only
    used from the main thread: a worker thread ends long before the process). None where prctl is not available."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
