"""Run audio through any backend: load, window, sort by length, batch, join, report per file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..backends.base import Transcriber, Transcription
from ..defaults import MAX_NEW_TOKENS, MAX_WINDOW_S, SAMPLE_RATE
from ..errors import AudioError, CanaryQwenError
from .audio import load_many
from .windowing import plan_windows


@dataclass
class FileResult:
    path: str
    duration_s: float
    transcription: Transcription | None = None
    error: str | None = None

    def json(self) -> str:
        """The ``--json`` line of a transcribed file (every command that transcribes prints the same fields)."""
        assert self.transcription is not None
        row = {
            "audio": self.path,
            "text": self.transcription.text,
            "token_ids": self.transcription.token_ids,
            "duration_s": round(self.duration_s, 3),
        }
        return json.dumps(row, ensure_ascii=False)


def _transcribe_batch(backend: Transcriber, windows, prompt, **budget) -> list[Transcription | Exception]:
    """The batch's results; when the backend refuses the batch, each window alone, so one bad clip fails alone."""
    try:
        return list(backend.transcribe(windows, prompt=prompt, **budget))
    except CanaryQwenError as e:
        if len(windows) == 1:
            return [e]
        return [r for w in windows for r in _transcribe_batch(backend, [w], prompt, **budget)]


def transcribe_arrays(
    backend: Transcriber,
    audios: Sequence[np.ndarray],
    *,
    batch_size: int = 8,
    prompt: str | None = None,
    max_new_tokens: int | None = MAX_NEW_TOKENS,
    max_window_s: float | None = MAX_WINDOW_S,
    progress: bool = False,
) -> list[Transcription | Exception]:
    """Longest windows first (least padding per batch); results (or a clip's error) come back in input order.

    ``max_new_tokens`` None: the backend's own default (a server's configured budget)."""
    plan = plan_windows(audios, max_window_s)
    order = sorted(range(len(plan.windows)), key=lambda i: -len(plan.windows[i]))
    results: dict[int, Transcription | Exception] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    budget = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    for batch in tqdm(batches, desc="transcribing", unit="batch", disable=not progress or len(batches) < 2):
        out = _transcribe_batch(backend, [plan.windows[i] for i in batch], prompt, **budget)
        results.update(zip(batch, out))
    return plan.join([results[i] for i in range(len(plan.windows))], len(audios))


def transcribe_files(backend: Transcriber, paths: Sequence[str], **kwargs) -> Iterator[FileResult]:
    """One result per path, in order; unreadable files and refused clips carry their error, the rest go on."""
    loaded = load_many(paths)
    good = [i for i, a in enumerate(loaded) if not isinstance(a, AudioError)]
    audios = [a for a in loaded if not isinstance(a, AudioError)]
    texts = transcribe_arrays(backend, audios, **kwargs) if audios else []
    by_index = dict(zip(good, texts))
    for i, path in enumerate(paths):
        item = loaded[i]
        if isinstance(item, AudioError):
            yield FileResult(path=str(path), duration_s=0.0, error=str(item))
            continue
        duration = len(item) / SAMPLE_RATE
        result = by_index[i]
        if isinstance(result, Exception):
            yield FileResult(path=str(path), duration_s=duration, error=f"{path}: {result}")
        else:
            yield FileResult(path=str(path), duration_s=duration, transcription=result)
