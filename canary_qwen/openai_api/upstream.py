"""What answers the OpenAI-compatible server, as one interface (``Upstream``): forwarding to Triton servers
(``forwarding.TritonForwarding``, the existing :class:`~canary_qwen.client.triton.TritonClient` with its failover and
timeouts) or a local engine in this process (``local.LocalEngine``, an :class:`~canary_qwen.engines.EngineLoop` that
batches every request in flight together).

Both take one window of 16 kHz mono float32 samples at a time: ``transcribe`` answers its text and token ids,
``stream`` yields its text in pieces that join to that text. A caller that goes away (its task is cancelled, or
it stops reading a stream) stops that window's decoding: the local engine aborts it at the next step, a Triton
stream is cancelled. Both also answer LLM-mode dialogues (``answer``, ``answer_pieces``): the local engine in the same
batch as the windows (torch-fast, vllm), Triton through its engine flavours' DIALOGUE requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Protocol

import numpy as np

from ..backends.base import Transcription
from ..engines import RequestCounts
from ..model.prompt import Turn
from ..model.tokenizer import QwenTokenizer

log = logging.getLogger(__name__)


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


def hand_over(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
    """Hand ``item`` to the event loop's queue from another thread (nothing when the loop has closed)."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the loop is closed: the server is shutting down
        pass
