"""What the OpenAI-compatible server's routes share: its settings (every limit, one frozen value) and what a route's
handler needs of the server (``Service``, which ``app.OpenAIServer`` is), so the handlers do not import the app."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..bounds import RequestBounds
from ..defaults import MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT, MAX_QUEUE, MAX_WINDOW_S
from ..pipeline.windowing import SEARCH_S
from .metrics import Metrics
from .protocol import APIError
from .realtime_protocol import LiveSettings
from .upstream import Upstream

SERVED_MODEL = "canary-qwen-2.5b"
MAX_UPLOAD_MB = 25  # vLLM's default (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB)
MAX_AUDIO_S = 1800.0  # longest upload, in seconds of audio (cut into windows of max_window_s)
TIMEOUT_S = 300.0


def default_bounds() -> RequestBounds:
    return RequestBounds(
        max_audio_s=MAX_AUDIO_S,
        max_new_tokens=MAX_NEW_TOKENS,
        max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
        max_queue=MAX_QUEUE,
        queue_timeout_s=TIMEOUT_S,
    )


@dataclass(frozen=True)
class ServerSettings:
    """``bounds``: ``max_audio_s`` the longest upload (seconds of audio), ``max_new_tokens`` /
    ``max_new_tokens_limit`` the budget per window (default / most a request may ask), ``max_queue`` the
    transcription requests handled at once, ``queue_timeout_s`` the longest wait for the upstream (0: none).
    ``max_window_s``: windows long audio is cut into (None: whole). ``max_upload_bytes``: the request body."""

    served_model: str = SERVED_MODEL
    bounds: RequestBounds = field(default_factory=default_bounds)
    max_upload_bytes: int = MAX_UPLOAD_MB * 2**20
    max_window_s: float | None = MAX_WINDOW_S
    tmp_dir: str | None = None
    decode_threads: int = 4
    live: LiveSettings = field(default_factory=LiveSettings)

    @property
    def windows_per_upload(self) -> int:
        """The most windows one upload is cut into (what the local engine may hold per request)."""
        if not self.max_window_s:
            return 1
        shortest = self.max_window_s - min(SEARCH_S, self.max_window_s / 2)  # split_points cuts no window shorter
        return math.ceil(self.bounds.audio_s / shortest) + 1


class Service(Protocol):
    """What a route's handler needs of the server (``app.OpenAIServer``)."""

    upstream: Upstream
    settings: ServerSettings
    metrics: Metrics

    def take_slot(self) -> APIError | None:
        """Count one more request in flight, or the 429 that refuses it."""
        ...

    def release(self) -> None:
        """A request counted by ``take_slot`` has ended."""
        ...

    async def transcript_of(self, samples: np.ndarray, budget: int, prompt: str | None = None) -> str:
        """The text ``canary-qwen transcribe`` gives for ``samples``."""
        ...

    async def samples_of(self, data: bytes, name: str) -> np.ndarray:
        """Audio bytes as 16 kHz mono float32, or a 400 saying what is wrong."""
        ...
