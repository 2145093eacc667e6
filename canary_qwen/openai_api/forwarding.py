"""The upstream that forwards to running Triton servers (``TritonForwarding``): the Triton client with its failover and
timeouts, run in a thread pool so the event loop never blocks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

import numpy as np

from ..backends.base import Transcription
from ..client.errors import TritonClientError
from ..client.triton import TritonClient
from ..client.wire import DEFAULT_MODEL, DEFAULT_STREAM_MODEL
from ..engines import RequestCounts
from ..errors import BackendUnavailable
from ..model.prompt import Turn
from ..model.tokenizer import QwenTokenizer
from .upstream import hand_over

READY_CACHE_S = 1.0  # how long a readiness probe of the Triton servers is reused
_PIECE, _END, _ERROR = "piece", "end", "error"  # what the pool thread hands the event loop


class TritonForwarding:
    """Forward each window to running Triton servers (any flavour with the ``canary_qwen`` ensemble and the
    ``canary_qwen_stream`` model) through :class:`TritonClient`: round robin, failover to the next server for a
    request that got no answer, ``timeout_s`` for each request and each streamed piece. The blocking client runs
    in a pool of ``threads`` threads (a stream holds one while it lasts)."""

    def __init__(
        self,
        urls: str,
        protocol: str = "grpc",
        *,
        timeout_s: float = 120.0,
        threads: int = 64,
        model: str = DEFAULT_MODEL,
        stream_model: str = DEFAULT_STREAM_MODEL,
    ):
        self.client = TritonClient(urls, protocol, model, stream_model=stream_model, timeout_s=timeout_s)
        self.description = f"Triton {protocol}://{self.client.url} (models {model}, {stream_model})"
        self.answers = True  # the torch-fast and vllm flavours take DIALOGUE requests; the others refuse them
        self.continues = False  # requests carry a prompt's text, not the answer's first tokens
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="openai-triton")
        self._probe_pool = ThreadPoolExecutor(1, thread_name_prefix="openai-triton-health")
        self._probed: tuple[float, bool, str] = (0.0, False, "not checked yet")

    async def start(self) -> None:
        return None

    def _probe(self) -> tuple[bool, str]:
        reasons = []
        for server in self.client.servers:
            server._ready.discard(self.client.model)  # ServerClient.check remembers a ready model: ask again
            try:
                server.check(self.client.model)
                return True, f"Triton at {server.url} is ready"
            except TritonClientError as e:
                reasons.append(str(e))
        return False, "; ".join(reasons)

    async def ready(self) -> tuple[bool, str]:
        at, ok, why = self._probed
        if time.monotonic() - at > READY_CACHE_S:
            ok, why = await asyncio.get_running_loop().run_in_executor(self._probe_pool, self._probe)
            self._probed = (time.monotonic(), ok, why)
        return ok, why

    async def transcribe(self, window: np.ndarray, prompt: str | None, budget: int) -> Transcription:
        def call() -> Transcription:
            text, ids = self.client.infer(window, prompt, max_new_tokens=budget, with_ids=True)
            return Transcription(text=text, token_ids=ids)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def stream(self, window: np.ndarray, prompt: str | None, budget: int) -> AsyncGenerator[str, None]:
        stream = self._pieces(lambda: self.client.stream(window, prompt, max_new_tokens=budget))
        async with aclosing(stream) as pieces:
            async for piece in pieces:
                yield piece

    async def _pieces(self, open_stream: Callable[[], Iterator]) -> AsyncGenerator:
        """The items of the blocking stream ``open_stream()`` (run in the pool), as they come; a caller that stops
        reading closes it, which cancels the request on the server."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            items = open_stream()
            try:
                for item in items:
                    if stop.is_set():
                        return  # closing the stream (below) cancels the request on the server
                    hand_over(loop, queue, (_PIECE, item))
                hand_over(loop, queue, (_END, None))
            except BaseException as e:
                hand_over(loop, queue, (_ERROR, e))
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()

        loop.run_in_executor(self._pool, produce)
        try:
            while True:
                kind, value = await queue.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise value
                yield value
        finally:
            stop.set()

    async def answer(self, turns: list[Turn], budget: int) -> tuple[Transcription, int]:
        def call() -> tuple[Transcription, int]:
            text, ids, prompt_tokens = self.client.ask(turns, max_new_tokens=budget)
            return Transcription(text=text, token_ids=ids), prompt_tokens or 0

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def answer_pieces(self, turns: list[Turn], budget: int) -> AsyncGenerator[tuple[str, int, int], None]:
        stream = self._pieces(lambda: self.client.ask_stream(turns, max_new_tokens=budget))
        async with aclosing(stream) as pieces:
            async for piece, ids, prompt_tokens in pieces:
                yield piece, len(ids), prompt_tokens or 0

    async def continue_transcript(
        self, window: np.ndarray, prompt: str | None, start: list[int], budget: int
    ) -> Transcription:
        raise BackendUnavailable("Triton requests carry no forced answer start (continues is False)")

    @property
    def tokenizer(self) -> QwenTokenizer | None:
        return None

    def pending(self) -> int:
        return 0

    def counts(self) -> RequestCounts:
        return RequestCounts()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
