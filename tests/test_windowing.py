"""Long-audio windows: contiguous cover, length limit, cuts at quiet frames, texts joined in order."""

from __future__ import annotations

import numpy as np

from canary_qwen.backends.base import Transcription
from canary_qwen.pipeline.windowing import plan_windows, split_points


def test_windows_cover_the_clip_within_the_limit():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000 * 95).astype(np.float32)
    bounds = split_points(audio, 40.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= 40 * 16000 for start, end in bounds)


def test_cut_lands_in_the_silence():
    rng = np.random.default_rng(1)
    audio = rng.standard_normal(16000 * 50).astype(np.float32)
    audio[16000 * 39 : 16000 * 39 + 4000] = 0.0  # 250 ms of silence just before the 40 s limit
    (_, cut), _ = split_points(audio, 40.0)
    assert 16000 * 39 <= cut < 16000 * 39 + 4000


def test_short_clips_are_untouched_and_joined_in_order():
    clips = [np.ones(16000, np.float32), np.ones(16000 * 90, np.float32)]
    plan = plan_windows(clips, 40.0)
    assert plan.owner == [0, 1, 1, 1]
    results = [Transcription("a", [1]), Transcription("b", [2]), Transcription("", []), Transcription("c", [3])]
    joined = plan.join(results, 2)
    assert [(j.text, j.token_ids) for j in joined] == [("a", [1]), ("b c", [2, 3])]
    assert plan_windows(clips, None).owner == [0, 1]
