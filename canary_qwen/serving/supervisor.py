"""``canary-qwen serve``: run tritonserver, watch it, and restart it on the same ports when it or a model process dies.

Triton 2.51 does not restart a python model's process (its "stub") when it dies, nor does it report the model
unready: every request to that model fails from then on. :func:`serve_forever` watches for that and for
tritonserver exiting, stops what is left of the server (requests still in flight get their error then, and the
ports and shared memory are freed), waits, and starts it again on the same ports. Restarts are bounded
(:class:`RestartPolicy`): at most ``max_restarts`` within any ``window_s`` seconds, the k-th of them after
``backoff_s * 2**(k-1)`` seconds (capped at ``max_backoff_s``). One fault more, or any fault with restarts off
(``--no-restart``, for supervisors that restart by themselves), and ``serve`` exits as it did before restarts
existed: ``DEAD_STUB_EXIT`` after a dead model process, 1 after tritonserver exited or did not start again, with
the reason on stderr.

Each restart is printed with its cause, and :class:`ServeStatus` keeps a small JSON file next to Triton's log
(``serve_status.json``: state, restart count, last cause and time, the recent restarts with their downtime).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UsageError
from .server import DEAD_STUB_EXIT, TritonServer, TritonStartError

STATUS_FILE = "serve_status.json"
FAULT_GRACE_S = 2.0  # a broken server's other requests get this long after SIGTERM, then the group is killed
POLL_S = 0.2
HISTORY = 20  # restarts kept in the status file


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds; the k-th restart in the window waits
    ``backoff_s * 2**(k-1)`` seconds first, at most ``max_backoff_s``."""

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self):
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise UsageError(
                "restart policy: max_restarts >= 0, window_s > 0 and backoff_s, max_backoff_s >= 0, "
                f"got {self.max_restarts}, {self.window_s}, {self.backoff_s}, {self.max_backoff_s}"
            )


class RestartBudget:
    """The faults of the last ``policy.window_s`` seconds: whether one more may be restarted, and after how long."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self._restarts: deque[float] = deque()

    def in_window(self) -> int:
        """Restarts granted within the window ending now."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self.policy.window_s:
            self._restarts.popleft()
        return len(self._restarts)

    def next_delay(self) -> float | None:
        """Grant a restart now: the seconds to wait before it, or None when the window's restarts are used up."""
        if self.in_window() >= self.policy.max_restarts:
            return None
        self._restarts.append(self._clock())
        return min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (len(self._restarts) - 1))


@dataclass(frozen=True)
class Fault:
    cause: str
    exit_code: int  # what serve exits with when this fault is not restarted
    detail: str = ""  # printed under the cause (tritonserver's log tail)


def find_fault(server: TritonServer) -> Fault | None:
    """What is wrong with a started server right now: tritonserver exited, or a model's python process died."""
    if not server.is_alive():
        code = server.process.returncode if server.process is not None else None
        how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
        return Fault(f"tritonserver exited with {how}", 1, server.log_tail())
    dead = server.dead_stubs()
    if dead:
        names = ", ".join(f"{s.instance} (pid {s.pid})" for s in dead)
        return Fault(
            f"the python process of model instance {names} died and Triton does not restart it", DEAD_STUB_EXIT
        )
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ServeStatus:
    """``serve_status.json``: what ``serve`` is doing, for people and monitors (rewritten whole on each change)."""

    def __init__(self, path: Path, **fields):
        self.path = path
        self.data: dict = {"pid": os.getpid(), "state": "starting", "restarts": 0, "last_cause": None}
        self.data.update(last_fault_at=None, history=[], **fields)
        self.write()

    def write(self, **changes) -> None:
        self.data.update(changes, updated_at=_now())
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)  # readers never see half a file

    def fault(self, cause: str) -> None:
        self.write(state="restarting", restarts=self.data["restarts"] + 1, last_cause=cause, last_fault_at=_now())

    def ready_again(self, down_s: float, **seconds: float) -> None:
        """Back up after ``down_s`` seconds (from the fault's detection); ``seconds``: where they went."""
        entry = {"at": self.data["last_fault_at"], "cause": self.data["last_cause"], "down_s": round(down_s, 2)}
        entry.update({k: round(v, 2) for k, v in seconds.items()})
        self.write(state="ready", history=[*self.data["history"], entry][-HISTORY:])


def serve_forever(
    repo_dir: str | os.PathLike,
    *,
    out=None,
    restart: bool = True,
    policy: RestartPolicy | None = None,
    **server_kwargs,
) -> int:
    """Serve ``repo_dir`` until Ctrl-C or SIGTERM (for ``canary-qwen serve``), restarting it after faults; returns
    an exit code: 0 after a requested shutdown, otherwise that of the fault that was not restarted (``Fault``).

    ``server_kwargs`` go to :class:`TritonServer`; ports left unset are picked at the first start and kept.
    A failure of the first start raises (TritonStartError) as before: nothing was served yet.
    """
    out = out or sys.stdout
    policy = policy or RestartPolicy()
    budget = RestartBudget(policy)
    stop_requested = False
    waiting = True  # starting or backing off: a signal ends the wait at once

    def on_signal(signum, frame):
        nonlocal stop_requested
        stop_requested = True
        if waiting:
            raise KeyboardInterrupt

    server = TritonServer(repo_dir, **server_kwargs)
    status = ServeStatus(
        server.work_dir / STATUS_FILE,
        log=str(server.log_path),
        max_restarts=policy.max_restarts if restart else 0,
        restart_window_s=policy.window_s,
    )
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        status.write(state="ready", http=server.http_url, grpc=server.grpc_url, metrics=server.metrics_url)
        print(
            f"Triton {server.repo_dir} ready\n  HTTP    {server.http_url}\n  gRPC    {server.grpc_url}\n"
            f"  metrics {server.metrics_url}\n  log     {server.log_path}\n  status  {status.path}\nCtrl-C to stop",
            file=out,
            flush=True,
        )
        while True:
            waiting = False
            fault = None
            while fault is None and not stop_requested:
                time.sleep(POLL_S)
                fault = find_fault(server)
            if fault is None:
                print("shutting down ...", file=out, flush=True)
                return 0
            down_since = time.monotonic()
            spent = {"stop_s": 0.0, "backoff_s": 0.0, "start_s": 0.0}
            while fault is not None:
                t = time.monotonic()
                server.stop(timeout=FAULT_GRACE_S)  # callers still waiting get their error now
                spent["stop_s"] += time.monotonic() - t
                if stop_requested:
                    return 0
                delay = budget.next_delay() if restart else None
                if delay is None:
                    why = (
                        "restarts are off (--no-restart)"
                        if not restart
                        else f"{policy.max_restarts} restarts within {policy.window_s:g} s already: giving up"
                    )
                    print(
                        f"error: {fault.cause}; {why}; the server is stopped (exit code {fault.exit_code}) so that "
                        f"a supervisor can restart it (log: {server.log_path})"
                        + (f"\n{fault.detail}" if fault.detail else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                    status.write(state="failed", last_cause=fault.cause, last_fault_at=_now())
                    return fault.exit_code
                status.fault(fault.cause)
                print(
                    f"serve: {fault.cause}; restart {budget.in_window()} of {policy.max_restarts} within "
                    f"{policy.window_s:g} s: starting Triton again on the same ports in {delay:g} s "
                    f"(log: {server.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
                waiting = True
                time.sleep(delay)
                spent["backoff_s"] += delay
                t = time.monotonic()
                try:
                    server.start()
                    fault = None
                except TritonStartError as e:
                    fault = Fault(f"tritonserver did not start again: {str(e).splitlines()[0]}", 1, str(e))
                spent["start_s"] += time.monotonic() - t
            down_s = time.monotonic() - down_since
            status.ready_again(down_s, **spent)
            print(
                f"serve: Triton ready again on the same ports after {down_s:.1f} s "
                f"(restarts so far: {status.data['restarts']})",
                file=out,
                flush=True,
            )
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        if status.data["state"] != "failed":
            status.write(state="stopped")
        for s, handler in old.items():
            signal.signal(s, handler)
