"""The upstream that runs an engine in this process (``LocalEngine``): an ``EngineLoop`` that batches every request in
flight together, transcriptions, LLM-mode answers and live re-decodes alike."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import numpy as np

from ..backends.base import Transcription
from ..bounds import RequestBounds
from ..engines import EngineLoop, RequestCounts, StepEngine
from ..errors import BackendUnavailable, CanaryQwenError, RequestTimeout
from ..model.prompt import Turn, dialogue_ids
from ..model.tokenizer import QwenTokenizer
from ..serving.checks import TextStream, encode_prompt
from .upstream import hand_over

log = logging.getLogger(__name__)


class _Sink:
    """One window's answer from the engine thread into the event loop (``engine.base.Sink``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gone = False

    def send(self, ids: list[int], finished: bool) -> None:
        if self.gone:
            raise RuntimeError("the caller has gone")  # EngineLoop stops decoding this request
        hand_over(self.loop, self.queue, (list(ids), finished, None))

    def fail(self, error: CanaryQwenError) -> None:
        hand_over(self.loop, self.queue, ([], True, error))

    def cancelled(self) -> bool:
        return self.gone


class LocalEngine:
    """A step engine in this process, owned by an :class:`EngineLoop` thread: windows of every request in flight
    are admitted between steps and decoded together. ``open_engine`` builds it (in a thread, at ``start``: the
    server answers ``/health`` with 503 while it loads); ``max_pending`` bounds the windows submitted at once
    (one more is refused: ``Overloaded``, 429). ``timeout_s`` bounds each wait for the engine (0: none).
    ``answers``: the engine has LLM mode (torch-fast, vllm); ``bounds``: the server's, whose ``check_dialogue`` every
    dialogue must pass."""

    NAME = "openai-engine"

    def __init__(
        self,
        open_engine: Callable[[], StepEngine],
        description: str,
        *,
        max_pending: int | None = None,
        timeout_s: float = 0.0,
        answers: bool = True,
        bounds: RequestBounds | None = None,
    ):
        self._open = open_engine
        self.description = description
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.loop: EngineLoop | None = None
        self.answers = answers
        self.continues = True
        self.bounds = bounds or RequestBounds()
        self._state = "not started"
        self._closed = False
        self._loader: threading.Thread | None = None

    async def start(self) -> None:
        self._state = "loading"
        self._loader = threading.Thread(target=self._load, name="openai-engine-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            loop = EngineLoop(self._open, name=self.NAME, max_pending=self.max_pending)
        except Exception as e:
            log.exception("the engine failed to load")
            self._state = f"failed to load: {e}"
            return
        if self._closed:
            loop.close()
            return
        self.loop = loop
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
        """A dialogue's prompt ids, within the bounds' ``max_prompt_tokens`` (an InputError otherwise)."""
        ids = dialogue_ids(self._engine().tokenizer, turns)
        self.bounds.check_dialogue(len(ids))
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
