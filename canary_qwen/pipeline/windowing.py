"""Cut clips longer than the model was trained on (40 s) into windows and join their texts.

NeMo feeds long audio to the model whole and the transcript degrades silently; here each window
is transcribed on its own. Cuts are placed at the quietest 20 ms inside the last 2 s of a window,
so words are rarely split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..backends.base import Transcription
from ..defaults import MAX_WINDOW_S, SAMPLE_RATE

SEARCH_S = 2.0
FRAME = SAMPLE_RATE // 50


def split_points(samples: np.ndarray, max_window_s: float = MAX_WINDOW_S) -> list[tuple[int, int]]:
    """[start, end) sample ranges covering the clip, each at most ``max_window_s`` long."""
    limit = int(max_window_s * SAMPLE_RATE)
    search = min(int(SEARCH_S * SAMPLE_RATE), limit // 2)
    bounds, start, n = [], 0, len(samples)
    while n - start > limit:
        lo, hi = start + limit - search, start + limit
        frames = samples[lo:hi][: (hi - lo) // FRAME * FRAME].reshape(-1, FRAME)
        cut = lo + int(np.argmin((frames.astype(np.float64) ** 2).sum(1))) * FRAME + FRAME // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


@dataclass
class WindowPlan:
    """Which windows belong to which input clip, so results can be joined back in order."""

    windows: list[np.ndarray]
    owner: list[int]

    def join(self, results: Sequence[Transcription | Exception], n_clips: int) -> list[Transcription | Exception]:
        """One result per clip: its windows' texts joined with a space, or the first window's error."""
        joined: list[Transcription | Exception] = [Transcription(text="", token_ids=[]) for _ in range(n_clips)]
        for clip, result in zip(self.owner, results):
            target = joined[clip]
            if isinstance(target, Exception):
                continue
            if isinstance(result, Exception):
                joined[clip] = result
                continue
            target.text = f"{target.text} {result.text}".strip() if result.text else target.text
            target.token_ids.extend(result.token_ids)
        return joined


def plan_windows(audios: Sequence[np.ndarray], max_window_s: float | None = MAX_WINDOW_S) -> WindowPlan:
    windows, owner = [], []
    for i, audio in enumerate(audios):
        bounds = [(0, len(audio))] if max_window_s is None else split_points(audio, max_window_s)
        for start, end in bounds:
            windows.append(audio[start:end])
            owner.append(i)
    return WindowPlan(windows, owner)
