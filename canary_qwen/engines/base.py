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


def token_budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One decoding budget per clip from a single budget or a per-clip list."""
    if isinstance(max_new_tokens, (int, np.integer)):
        return [int(max_new_tokens)] * n
    values = [int(v) for v in max_new_tokens]
    if len(values) != n:
        raise ValueError(f"{len(values)} token budgets for {n} clips")
    return values


def until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The generated ids before the first eos (NeMo's transcripts stop there and leave it out)."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def pad_waveforms(audios: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D float32 waveforms to [B, S] + lengths [B] (int64)."""
    lengths = np.array([len(a) for a in audios], dtype=np.int64)
    batch = np.zeros((len(audios), int(lengths.max())), dtype=np.float32)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = a
    return batch, lengths
