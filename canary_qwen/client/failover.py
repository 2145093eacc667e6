"""Failover between several Triton servers, written once: requests go round robin, a server that gave no answer is
tried last for a while, and a request or stream that got no answer goes to the next server."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from typing import Generic, TypeVar

from .errors import RETRYABLE, TritonClientError

S = TypeVar("S")  # a server's client
T = TypeVar("T")


class Diverged(Exception):
    """A server's stream does not continue what the servers before it delivered."""


class Resume(Generic[T]):
    """How a stream goes on at the next server after one went away mid-stream: ``start`` before each server's
    stream, ``fresh`` for each of its items (what of it was not delivered yet, None for nothing; Diverged when it
    contradicts what was), ``whole`` after it ended (False: it fell short of what was delivered), ``resumable``
    after a server went away. This one cannot resume: a stream that delivered anything fails with its server."""

    def __init__(self):
        self.delivered = False

    @property
    def resumable(self) -> bool:
        return not self.delivered

    def start(self) -> None:
        pass

    def fresh(self, item: T) -> T | None:
        self.delivered = True
        return item

    def whole(self) -> bool:
        return True


class Failover(Generic[S]):
    """``servers`` in turn: each request starts at the next one; a server that gave no answer (``RETRYABLE``) goes
    to the back of the order for ``DOWN_S`` seconds."""

    DOWN_S = 5.0

    def __init__(self, servers: Sequence[S]):
        self.servers = list(servers)
        self._next = itertools.count()
        self._down_until = [0.0] * len(self.servers)
        self._lock = threading.Lock()

    def _order(self) -> list[int]:
        n = len(self.servers)
        with self._lock:
            start = next(self._next) % n
        ring = [(start + k) % n for k in range(n)]
        now = time.monotonic()
        return [i for i in ring if self._down_until[i] <= now] + [i for i in ring if self._down_until[i] > now]

    def first_answer(self, request: Callable[[S], T]) -> T:
        """``request`` on the servers in turn until one answers; the last server's error if none does."""
        error: TritonClientError | None = None
        for i in self._order():
            try:
                result = request(self.servers[i])
            except RETRYABLE as e:
                self._down_until[i] = time.monotonic() + self.DOWN_S
                error = e
                continue
            self._down_until[i] = 0.0
            return result
        assert error is not None
        raise error

    def stream(
        self, open_stream: Callable[[S], Generator[T, None, None]], resume: Resume[T]
    ) -> Generator[T, None, None]:
        """The items of ``open_stream(server)`` from the first server that answers; when a server goes away
        mid-stream the next one's items go on as ``resume`` says."""
        error: TritonClientError | None = None
        for i in self._order():
            resume.start()
            try:
                with closing(open_stream(self.servers[i])) as items:
                    for item in items:
                        fresh = resume.fresh(item)
                        if fresh is not None:
                            yield fresh
                if not resume.whole():
                    raise Diverged
            except RETRYABLE as e:
                self._down_until[i] = time.monotonic() + self.DOWN_S
                if not resume.resumable:
                    raise
                error = e
                continue
            except Diverged:
                url = getattr(self.servers[i], "url", None)
                raise TritonClientError(
                    f"Triton at {url} streamed a different text than the server before it (are they serving the "
                    "same model?)",
                    url,
                ) from None
            self._down_until[i] = 0.0
            return
        assert error is not None
        raise error


class TextResume(Resume[tuple]):
    """(text piece, token ids, ...) streams: greedy decoding gives every server the same text and ids, so the next
    server's are delivered from where those already delivered end; one whose text does not continue them is an
    error. Fields after the ids go on as the server sent them."""

    def __init__(self):
        super().__init__()
        self.text, self.ids = "", 0  # delivered
        self.seen_text, self.seen_ids = "", 0  # of the current server

    @property
    def resumable(self) -> bool:
        return True

    def start(self) -> None:
        self.seen_text, self.seen_ids = "", 0

    def fresh(self, item: tuple) -> tuple | None:
        piece, ids, *rest = item
        self.seen_text += piece
        fresh_ids = ids[max(0, self.ids - self.seen_ids) :]
        self.seen_ids += len(ids)
        fresh = ""
        if len(self.seen_text) > len(self.text):
            if not self.seen_text.startswith(self.text):
                raise Diverged
            fresh, self.text = self.seen_text[len(self.text) :], self.seen_text
        if not (fresh or fresh_ids):
            return None
        self.ids += len(fresh_ids)
        return (fresh, fresh_ids, *rest)

    def whole(self) -> bool:
        return self.seen_text.startswith(self.text)
