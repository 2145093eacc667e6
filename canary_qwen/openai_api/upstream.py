"""The two upstreams that answer the OpenAI-compatible server, behind one interface (``Upstream``): forwarding to Triton servers
(:class:`TritonForwarding`, the existing :class:`~canary_qwen.client.triton.TritonClient` with its failover and
timeouts) and a local engine in this process (:class:`LocalEngine`, an
:class:`~canary_qwen.engines.EngineLoop` that batches every request in flight together).

Both take one window of 16 kHz mono float32 samples at a time: ``transcribe`` answers its text and token ids,
``stream`` yields its text in pieces that join to that text. A caller that goes away (its task is cancelled, or
it stops reading a stream) stops that window's decoding: the local engine aborts it at the next step, a Triton
stream is cancelled. Both also answer LLM-mode dialogues (``answer``, ``answer_pieces``): the local engine in the same
batch as the windows (torch-fast, vllm), Triton through its engine flavours' DIALOGUE requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Protocol

import numpy as np

from ..backends.base import Transcription
from ..client.errors import TritonClientError
from ..client.triton import TritonClient
from ..client.wire import DEFAULT_MODEL, DEFAULT_STREAM_MODEL
from ..engines import EngineLoop, RequestCounts, StepEngine
from ..errors import BackendUnavailable, CanaryQwenError, InputError, RequestTimeout
from ..model.prompt import Turn, dialogue_ids
from ..model.tokenizer import QwenTokenizer
from ..serving.checks import TextStream, encode_prompt

log = logging.getLogger(__name__)
READY_CACHE_S = 1.0  # how long a readiness probe of the Triton servers is reused


class Upstream(Protocol):
    """What answers the OpenAI server's requests: Triton servers (``TritonForwarding``) or an engine in this process
    (``LocalEngine``)."""

    description: str
    answers: bool  # has LLM mode (answer, answer_pieces): chat completions
    continues: bool  # can decode a clip with the start of its answer given (continue_transcript): live partials

    async def start(self) -> None:
        """Begin loading (returns at once; ``ready`` says when it is done)."""
        ...

    async def ready(self) -> tuple[bool, str]:
        """Whether requests can be answered now, and a sentence saying what answers them (or why not)."""
        ...

    async def transcribe(self, window: np.ndarray, prompt: str | None, budget: int) -> Transcription: ...

    def stream(self, window: np.ndarray, prompt: str | None, budget: int) -> AsyncGenerator[str, None]: ...

    async def continue_transcript(
        self, window: np.ndarray, prompt: str | None, start: list[int], budget: int
    ) -> Transcription:
        """Up to ``budget`` tokens after ``start``, the answer's first tokens forced (``continues`` only)."""
        ...

    @property
    def tokenizer(self) -> QwenTokenizer | None:
        """The engine's tokenizer where it runs here (None where the work is elsewhere, or before it loaded)."""
        ...

    def pending(self) -> int:
        """Windows being decoded or waiting (0 where the work is elsewhere)."""
        ...

    def counts(self) -> RequestCounts:
        """What the engine in this process did so far (zeros where the work is elsewhere)."""
        ...

    def close(self) -> None: ...


class Answering(Upstream, Protocol):
    """An upstream with LLM mode (``answers`` True): what chat completions call."""

    async def answer(self, turns: list[Turn], budget: int) -> tuple[Transcription, int]:
        """LLM mode: the dialogue's answer whole, and the dialogue's length in tokens."""
        ...

    def answer_pieces(self, turns: list[Turn], budget: int) -> AsyncGenerator[tuple[str, int, int], None]:
        """LLM mode: (text piece, the tokens it adds, the dialogue's length in tokens); the pieces join to the
        answer's text (a piece may be empty)."""
        ...


_PIECE, _END, _ERROR = "piece", "end", "error"


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    """Hand ``item`` to the event loop's queue from another thread (nothing when the loop has closed)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the loop is closed: the server is shutting down
        pass


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
                    _put(loop, queue, (_PIECE, item))
                _put(loop, queue, (_END, None))
            except BaseException as e:
                _put(loop, queue, (_ERROR, e))
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


class _Sink:
    """One window's answer from the engine thread into the event loop (``engine.base.Sink``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = False

    def send(self, ids: list[int], finished: bool) -> None:
        if self.gone:
            raise RuntimeError("the caller has gone")  # EngineLoop stops decoding this request
        _put(self.loop, self.queue, (list(ids), finished, None))

    def fail(self, error: CanaryQwenError) -> None:
        _put(self.loop, self.queue, ([], True, error))

    def cancelled(self) -> bool:
        return self.gone


class LocalEngine:
    """A step engine in this process, owned by an :class:`EngineLoop` thread: windows of every request in flight
    are admitted between steps and decoded together. ``open_engine`` builds it (in a thread, at ``start``: the
    server answers ``/health`` with 503 while it loads); ``max_pending`` bounds the windows submitted at once
    (one more is refused: ``Overloaded``, 429). ``timeout_s`` bounds each wait for the engine (0: none).
    ``answers``: the engine has LLM mode (torch-fast, vllm); ``max_prompt_tokens``: the longest dialogue it takes."""

    NAME = "openai-engine"

    def __init__(
        self,
        open_engine: Callable[[], StepEngine],
        description: str,
        *,
        max_pending: int | None = None,
        timeout_s: float = 0.0,
        answers: bool = True,
        max_prompt_tokens: int | None = None,
    ):
        self._open = open_engine
        self.description = description
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.loop: EngineLoop | None = None
        self.answers = answers
        self.continues = True
        self.max_prompt_tokens = max_prompt_tokens
        self._state = "not started"
        self._closed = False
        self._loader: threading.Thread | None = None

    async def start(self) -> None:
        self._state = "loading"
        self._loader = threading.Thread(target=self._load, name="openai-engine-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            engine = self._open()
        except Exception as e:
            log.exception("the engine failed to load")
            self._state = f"failed to load: {e}"
            return
        if self._closed:
            engine.close()
            return
        self.loop = EngineLoop(engine, name=self.NAME, max_pending=self.max_pending)
        self._state = "ready"
        log.info("engine ready: %s", self.description)

    def wait_loaded(self, timeout: float | None = None) -> None:
        if self._loader is not None:
            self._loader.join(timeout)

    async def ready(self) -> tuple[bool, str]:
        if self.loop is not None and not self._closed:
            return True, f"{self.description} is ready"
        return False, f"{self.description}: {self._state}"

    def _engine(self) -> EngineLoop:
        if self.loop is None or self._closed:
            raise BackendUnavailable(f"{self.description} is not ready ({self._state})")
        return self.loop

    def _submit(self, prompt_ids: list[int], source: np.ndarray | None, budget: int) -> _Sink:
        sink = _Sink(asyncio.get_running_loop())
        self._engine().submit(prompt_ids, source, budget, sink)
        return sink

    async def _next(self, sink: _Sink) -> tuple[list[int], bool]:
        if self.timeout_s > 0:
            try:
                ids, finished, error = await asyncio.wait_for(sink.queue.get(), self.timeout_s)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"no answer from the engine within {self.timeout_s:g} s (the server's --timeout-s)"
                ) from None
        else:
            ids, finished, error = await sink.queue.get()
        if error is not None:
            raise error
        return ids, finished

    async def _decode(self, prompt_ids: list[int], source: np.ndarray | None, budget: int) -> Transcription:
        """One row decoded whole (``EngineLoop.submit``: a clip, or with ``source`` None a dialogue in LLM mode)."""
        sink = self._submit(prompt_ids, source, budget)
        ids: list[int] = []
        finished = False
        try:
            while not finished:
                new, finished = await self._next(sink)
                ids.extend(new)
        finally:
            sink.gone = not finished  # a cancelled caller: the engine aborts it at the next step
        return Transcription(text=self._engine().tokenizer.decode(ids).strip(), token_ids=ids)

    async def _pieces(
        self, prompt_ids: list[int], source: np.ndarray | None, budget: int
    ) -> AsyncGenerator[tuple[str, int], None]:
        """One row's text in pieces that join to its whole text, each with the tokens it adds."""
        sink = self._submit(prompt_ids, source, budget)
        text = TextStream(self._engine().tokenizer)
        finished = False
        try:
            while not finished:
                new, finished = await self._next(sink)
                for token in new:
                    piece = text.push(token)
                    yield piece, 1
            if rest := text.finish():
                yield rest, 0
        finally:
            sink.gone = True

    def _window(self, prompt: str | None) -> list[int]:
        return encode_prompt(self._engine().tokenizer, prompt)

    async def transcribe(self, window: np.ndarray, prompt: str | None, budget: int) -> Transcription:
        return await self._decode(self._window(prompt), np.asarray(window, dtype=np.float32), budget)

    async def stream(self, window: np.ndarray, prompt: str | None, budget: int) -> AsyncGenerator[str, None]:
        pieces = self._pieces(self._window(prompt), np.asarray(window, dtype=np.float32), budget)
        async with aclosing(pieces):
            async for piece, _ in pieces:
                if piece:
                    yield piece

    async def continue_transcript(
        self, window: np.ndarray, prompt: str | None, start: list[int], budget: int
    ) -> Transcription:
        return await self._decode(self._window(prompt) + list(start), np.asarray(window, dtype=np.float32), budget)

    @property
    def tokenizer(self) -> QwenTokenizer | None:
        return None if self.loop is None else self.loop.tokenizer

    def _dialogue(self, turns: list[Turn]) -> list[int]:
        """A dialogue's prompt ids, within ``max_prompt_tokens`` (an InputError otherwise)."""
        ids = dialogue_ids(self._engine().tokenizer, turns)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise InputError(
                f"the dialogue takes {len(ids)} tokens; this server takes at most {self.max_prompt_tokens}: "
                "send a shorter one"
            )
        return ids

    async def answer(self, turns: list[Turn], budget: int) -> tuple[Transcription, int]:
        ids = self._dialogue(turns)
        return await self._decode(ids, None, budget), len(ids)

    async def answer_pieces(self, turns: list[Turn], budget: int) -> AsyncGenerator[tuple[str, int, int], None]:
        ids = self._dialogue(turns)
        async with aclosing(self._pieces(ids, None, budget)) as pieces:
            async for piece, count in pieces:
                yield piece, count, len(ids)

    def pending(self) -> int:
        return self.loop.pending if self.loop is not None else 0

    def counts(self) -> RequestCounts:
        return self.loop.counts if self.loop is not None else RequestCounts()

    def close(self) -> None:
        self._closed = True
        if self.loop is not None:
            self.loop.close()
