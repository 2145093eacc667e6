"""One thread that makes a :class:`StepEngine`, owns it and answers every request submitted to it.

The engine is made on the thread that runs it. PyTorch's CPU kernels run on OpenMP (libgomp), which keeps a team of
worker threads for each thread that starts parallel work. Once there are more of those threads than CPUs, libgomp
stops letting idle workers spin and puts them to sleep between parallel regions: every region of every layer
then waits for a futex wake. An engine loaded on one thread (a server's main thread, a loader) and stepped on
another made a second team, and its one-row decode ran ~25 % slower on 2 cores (docs/fast-path.md).

``submit`` only checks the request's budget and hands it over; between two engine steps the thread admits
everything that arrived (one batch: the engine encodes and prefills it together), aborts the requests whose
caller has gone, steps the engine and passes each request's new tokens to its sink. An engine failure ends
every open request with the error (``EngineFailed``) and the loop goes on with the next arrivals. Errors reach
the sinks as exceptions: a refusal of the request (``InputError``), the engine's failure, ``BackendUnavailable``
when the loop stopped.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import BackendUnavailable, CanaryQwenError, EngineFailed, InputError, Overloaded
from .base import CANCELLED, FAILED, FINISHED, EngineRequest, RequestCounts, Sink, StepEngine

log = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05  # how often an idle loop looks at cancellations of requests still waiting to be admitted


class EngineLoop:
    """``max_pending``: how many requests may be submitted and unfinished at once (None: no bound); one more
    is refused with :class:`Overloaded` at once instead of waiting behind the others. ``counts``: the tokens
    generated and the requests ended so far (written under the loop's lock)."""

    def __init__(self, make_engine: Callable[[], StepEngine], *, name: str = "engine", max_pending: int | None = None):
        """Starts the thread, which calls ``make_engine``; returns when the engine is made (its error is raised)."""
        self.max_pending = max_pending
        self._arrivals: queue.Queue[tuple[EngineRequest, Sink] | None] = queue.Queue()
        self._open: dict[str, Sink] = {}
        self._pending = 0  # submitted, not yet finished (arrivals + open); guarded by _lock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = False
        self.counts = RequestCounts()
        self.name = name
        self.engine: StepEngine  # set on the thread, before it says the engine is made
        made: queue.Queue[StepEngine | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(make_engine, made), name=name, daemon=True)
        self._thread.start()
        engine = made.get()
        if isinstance(engine, BaseException):
            raise engine
        self.tokenizer = engine.tokenizer
        self.takes = engine.takes

    # -- callers -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], source: np.ndarray | None, budget: int, sink: Sink) -> str:
        """Queue one row (``EngineRequest``: a clip and its prompt, or with ``source`` None a text-only dialogue in
        LLM mode); its answer goes to ``sink``. A budget of 0 is answered at once with no tokens."""
        if budget < 0:
            raise InputError(f"a token budget must be >= 0, got {budget}")
        if self._stopping:
            raise Overloaded(f"{self.name} is shutting down")
        request_id = str(next(self._ids))
        if budget == 0:
            with self._lock:
                self.counts.ended(FINISHED)
            sink.send([], True)
            return request_id
        with self._lock:
            if self.max_pending is not None and self._pending >= self.max_pending:
                raise Overloaded(
                    f"{self.name} already holds {self._pending} requests (its limit): retry when one has finished"
                )
            self._pending += 1
        self._arrivals.put((EngineRequest(request_id, list(prompt_ids), source, int(budget)), sink))
        return request_id

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished."""
        return self._pending

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread (open requests are failed) and close the engine."""
        if self._stopping:
            return
        self._stopping = True
        self._arrivals.put(None)
        self._thread.join(timeout)
        self.engine.close()

    # -- the engine's thread --------------------------------------------------------------------------
    def _done(
        self, request_id: str, outcome: str, error: CanaryQwenError | None = None, sink: Sink | None = None
    ) -> None:
        """The request ends (open, or refused or gone before it opened: then ``sink``); ``error`` goes to its sink."""
        sink = self._open.pop(request_id, sink)
        with self._lock:
            self._pending -= 1
            self.counts.ended(outcome)
        if error is not None and sink is not None:
            _quietly(sink.fail, error)

    def _admit(self, block: bool) -> None:
        """Everything that arrived, as one batch; waits for the first one when ``block``."""
        batch: list[tuple[EngineRequest, Sink]] = []
        while True:
            try:
                item = self._arrivals.get(block=block and not batch, timeout=_IDLE_WAIT_S)
            except queue.Empty:
                break
            if item is None:
                break
            batch.append(item)
        live = []
        for request, sink in batch:
            if sink.cancelled():  # gone before it started
                self._done(request.request_id, CANCELLED, sink=sink)
            else:
                live.append((request, sink))
        if not live:
            return
        with self._busy():
            refusals = self.engine.admit([r for r, _ in live])
        for (request, sink), refused in zip(live, refusals):
            if refused is None:
                self._open[request.request_id] = sink
            else:
                self._done(request.request_id, FAILED, refused, sink)

    def _run(self, make_engine: Callable[[], StepEngine], made: queue.Queue) -> None:
        try:
            self.engine = make_engine()
        except BaseException as e:
            made.put(e)
            return
        made.put(self.engine)
        while not self._stopping:
            try:
                self._admit(block=not self.engine.busy)
                gone = [rid for rid, sink in self._open.items() if sink.cancelled()]
                if gone:
                    self.engine.abort(gone)
                    for rid in gone:
                        self._done(rid, CANCELLED)
                if not self.engine.busy:
                    continue
                with self._busy():
                    events = self.engine.step()
                with self._lock:
                    self.counts.steps += 1
                for request_id, ids, finished in events:
                    sink = self._open.get(request_id)
                    if sink is None:
                        continue
                    with self._lock:
                        self.counts.tokens += len(ids)
                    if finished:  # counted before its caller hears of it
                        self._done(request_id, FINISHED)
                        _quietly(sink.send, ids, True)
                    elif not _quietly(sink.send, ids, False):  # its caller is gone: stop decoding it
                        self.engine.abort([request_id])
                        self._done(request_id, CANCELLED)
            except Exception as e:  # the engine failed: every open request gets the error, the loop goes on
                log.exception("%s failed", self.name)
                self._fail_open(EngineFailed(f"{self.name} failed: {e}"))
        self._fail_open(BackendUnavailable(f"{self.name} stopped"))
        while True:  # requests that arrived after the last admission
            try:
                item = self._arrivals.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._done(item[0].request_id, FAILED, BackendUnavailable(f"{self.name} stopped"), item[1])

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """The engine's own work, added to ``counts.busy_s``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            took = time.perf_counter() - start
            with self._lock:
                self.counts.busy_s += took

    def _fail_open(self, error: CanaryQwenError) -> None:
        open_ids = list(self._open)
        if open_ids:
            _quietly(self.engine.abort, open_ids)
        for rid in open_ids:
            self._done(rid, FAILED, error)


def _quietly(call, *args) -> bool:
    """``call(*args)``; False when it raised (a sink whose caller is gone)."""
    try:
        call(*args)
        return True
    except Exception:
        log.debug("sink call failed", exc_info=True)
        return False
