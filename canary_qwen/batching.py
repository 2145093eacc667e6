"""Run audio files through any backend: load, window, sort by length, batch, join, report per file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .audio import AudioError, load_many
from .engines.base import SAMPLE_RATE, Transcriber, Transcription
from .windowing import MAX_WINDOW_S, plan_windows


@dataclass
class FileResult:
    path: str
    duration_s: float
    transcription: Transcription | None = None
    error: str | None = None


def transcribe_arrays(
    backend: Transcriber,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 8,
    prompt: str | None = None,
    max_new_tokens: int = 128,
    max_window_s: float | None = MAX_WINDOW_S,
    progress: bool = False,
) -> list[Transcription]:
    """Longest windows first (least padding per batch); results come back in input order."""
    plan = plan_windows(audios, max_window_s)
    order = sorted(range(len(plan.windows)), key=lambda i: -len(plan.windows[i]))
    results: list[Transcription | None] = [None] * len(plan.windows)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="transcribing", unit="batch", disable=not progress or len(batches) < 2):
        out = backend.transcribe([plan.windows[i] for i in batch], prompt=prompt, max_new_tokens=max_new_tokens)
        for i, r in zip(batch, out):
            results[i] = r
    return plan.join(results, len(audios))


def transcribe_files(backend: Transcriber, paths: Sequence[str], **kwargs) -> Iterator[FileResult]:
    """One result per path, in order; unreadable files carry their error and do not stop the rest."""
    loaded = load_many(paths)
    good = [i for i, a in enumerate(loaded) if not isinstance(a, AudioError)]
    texts = transcribe_arrays(backend, [loaded[i] for i in good], **kwargs) if good else []
    by_index = dict(zip(good, texts))
    for i, path in enumerate(paths):
        item = loaded[i]
        if isinstance(item, AudioError):
            yield FileResult(path=str(path), duration_s=0.0, error=str(item))
        else:
            yield FileResult(path=str(path), duration_s=len(item) / SAMPLE_RATE, transcription=by_index[i])
