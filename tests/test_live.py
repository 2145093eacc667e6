"""The live pieces apart from any server: the VAD's turn boundaries (the same whatever the chunking, on whole
milliseconds, padding and silence as OpenAI's fields say) and LocalAgreement-2 (only agreed items, never taken back)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_clip

from canary_qwen.pipeline.live import EnergyVad, LocalAgreement

RATE = 16000


def speech_with_pauses() -> np.ndarray:
    silence = np.zeros(RATE, np.float32)
    return np.concatenate([silence, make_clip(1.5, 1), silence, make_clip(0.8, 2), silence])


@pytest.mark.parametrize("chunk", [160, 1600, 4000, 7])
def test_vad_boundaries_do_not_depend_on_chunking(chunk):
    audio = speech_with_pauses()
    vad = EnergyVad(threshold=0.5, prefix_ms=300, silence_ms=500)
    events = [e for i in range(0, len(audio), chunk) for e in vad.feed(audio[i : i + chunk])]
    whole = EnergyVad(threshold=0.5, prefix_ms=300, silence_ms=500).feed(audio)
    assert events == whole
    assert [e.kind for e in whole] == ["start", "stop", "start", "stop"]
    assert all(e.at % 16 == 0 for e in whole)  # whole milliseconds
    first_start, first_stop = whole[0].at, whole[1].at
    assert first_start == RATE - 300 * 16  # the prefix padding before the first loud frame
    assert first_stop >= RATE + int(1.5 * RATE) + 500 * 16 - 160  # the silence that ended it included


def test_vad_threshold_and_silence_length_change_the_turns():
    audio = speech_with_pauses()
    quiet = 0.1 * audio  # speech about -40 dBFS
    assert [e.kind for e in EnergyVad(threshold=0.5).feed(quiet)] == ["start", "stop", "start", "stop"]
    assert EnergyVad(threshold=1.0).feed(quiet) == []  # the level -20 dBFS: nothing is loud enough
    joined = EnergyVad(silence_ms=2000).feed(audio)  # the 1 s pause no longer ends a turn
    assert [e.kind for e in joined] == ["start"]


def test_local_agreement_shows_only_what_two_hypotheses_agree_on():
    agreement = LocalAgreement()
    assert agreement.update("the cat".split()) == []
    assert agreement.update("the cat sat".split()) == ["the", "cat"]
    assert agreement.update("the cat sat on".split()) == ["sat"]
    assert agreement.update("the dog sat on the".split()) == []  # disagrees with what was shown: nothing more
    assert agreement.shown == ["the", "cat", "sat"]
    assert agreement.update([1, 2, 3]) == [] and LocalAgreement().update([]) == []


def test_a_vad_made_mid_stream_counts_from_where_it_starts():
    audio = speech_with_pauses()
    offset = 12345 * 16  # a session's VAD replaced after this many samples (whole milliseconds)
    shifted = EnergyVad(start=offset).feed(audio)
    assert [(e.kind, e.at - offset) for e in shifted] == [(e.kind, e.at) for e in EnergyVad().feed(audio)]
