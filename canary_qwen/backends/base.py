"""The one interface every inference backend implements (torch, torch-fast, onnx, trt, triton client, NeMo)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..defaults import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS
from ..model.prompt import Turn


@dataclass
class Transcription:
    """A decoded answer, in either mode: its text and greedy token ids (eos left out)."""

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
        max_new_tokens: int | Sequence[int] = MAX_NEW_TOKENS,
    ) -> list[Transcription]: ...


class Answerer(Protocol):
    """LLM mode: answers text-only dialogues (each ending with a user turn) with the speech LoRA off; ``max_new_tokens``
    is one budget for every dialogue or one each. Backends that transcribe and answer from one set of weights."""

    name: str

    def answer(
        self, dialogues: Sequence[Sequence[Turn]], *, max_new_tokens: int | Sequence[int] = MAX_ANSWER_TOKENS
    ) -> list[Transcription]: ...


def pad_waveforms(audios: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D float32 waveforms to [B, S] + lengths [B] (int64)."""
    lengths = np.array([len(a) for a in audios], dtype=np.int64)
    batch = np.zeros((len(audios), int(lengths.max())), dtype=np.float32)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = a
    return batch, lengths
