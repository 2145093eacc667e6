"""The one interface every inference backend implements (torch, onnx, trt, triton client, NeMo)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

SAMPLE_RATE = 16000


@dataclass
class Transcription:
    text: str
    token_ids: list[int] = field(default_factory=list)


class Transcriber(Protocol):
    """Transcribes a batch of 16 kHz mono float32 waveforms.

    ``max_new_tokens`` is one budget for the whole batch or one per clip.
    ``prompt`` is the user turn; ``None`` means the model's default transcription prompt.
    """

    name: str

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        *,
        prompt: str | None = None,
        max_new_tokens: int | Sequence[int] = 128,
    ) -> list[Transcription]: ...
