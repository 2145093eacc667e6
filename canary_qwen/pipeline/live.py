"""Live audio, model-agnostic: where speech starts and stops in a stream (``EnergyVad``), and which words of
repeated re-decodes are stable enough to show (``LocalAgreement``).

Canary-Qwen is not a streaming model: live text comes from re-decoding the audio of the turn so far at intervals
and sending only the words that the last two hypotheses agree on beyond those already sent (LocalAgreement-2, as
whisper_streaming does for Whisper). The exact text of a turn comes when it ends, from decoding its audio whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..defaults import SAMPLE_RATE

FRAME_MS = 10  # the VAD looks at 10 ms frames: every boundary it reports is a whole millisecond
FRAME = SAMPLE_RATE * FRAME_MS // 1000
# OpenAI's threshold (0..1, default 0.5) as a frame level: 0 -> -70 dBFS, 0.5 -> -45 dBFS, 1 -> -20 dBFS.
FLOOR_DB, SPAN_DB = -70.0, 50.0


@dataclass(frozen=True)
class VadEvent:
    """``kind`` "start" (speech begins at ``at``, prefix padding included) or "stop" (the turn ends at ``at``, the
    silence that ended it included); ``at`` counts samples from the start of the stream."""

    kind: str
    at: int


class EnergyVad:
    """Speech detection on 10 ms frames by their level: a frame louder than the threshold's level is speech; a turn
    starts at its first speech frame (minus ``prefix_ms``, never before the end of the last turn) and stops once
    ``silence_ms`` of frames in a row were quiet. Fed samples in any chunks, it reports the same boundaries. A turn may
    start up to ``prefix`` + one frame before the samples fed last (``reach``): keep that much audio before them."""

    def __init__(self, threshold: float = 0.5, prefix_ms: int = 300, silence_ms: int = 500, start: int = 0):
        if not 0.0 <= threshold <= 1.0 or prefix_ms < 0 or silence_ms < FRAME_MS:
            raise ValueError("threshold must be in 0..1, prefix_ms >= 0, silence_ms >= 10")
        self.level_db = FLOOR_DB + SPAN_DB * threshold
        self.prefix = prefix_ms * SAMPLE_RATE // 1000
        self.silence_frames = math.ceil(silence_ms / FRAME_MS)
        self._tail = np.zeros(0, dtype=np.float32)  # samples not yet a whole frame
        self._position = start  # the stream's samples seen in whole frames (from ``start``: a VAD made mid-stream)
        self._floor = start  # where the next turn may start (the end of the last one)
        self.speaking = False
        self._quiet = 0  # quiet frames in a row while speaking

    @property
    def reach(self) -> int:
        """How far before the end of the samples fed so far a turn that starts next may begin."""
        return self.prefix + FRAME

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        data = np.concatenate((self._tail, np.asarray(samples, dtype=np.float32)))
        whole = len(data) // FRAME * FRAME
        frames, self._tail = data[:whole].reshape(-1, FRAME), data[whole:]
        power = np.mean(frames.astype(np.float64) ** 2, axis=1)
        loud = 10 * np.log10(np.maximum(power, 1e-12)) > self.level_db
        for is_loud in loud:
            start, self._position = self._position, self._position + FRAME
            if not self.speaking and is_loud:
                self.speaking, self._quiet = True, 0
                events.append(VadEvent("start", max(self._floor, start - self.prefix)))
            elif self.speaking:
                self._quiet = 0 if is_loud else self._quiet + 1
                if self._quiet >= self.silence_frames:
                    self.speaking, self._floor = False, self._position
                    events.append(VadEvent("stop", self._position))
        return events

    def reset(self, at: int) -> None:
        """A turn ended elsewhere (the client committed) at sample ``at``: the next one starts after it."""
        self.speaking, self._quiet, self._floor = False, 0, max(self._floor, at)


class LocalAgreement:
    """LocalAgreement-2: ``update(hypothesis)`` (a sequence: words, or token ids) returns the items to show next, those
    the hypothesis and the one before agree on beyond the items shown already (``shown``); shown items are never
    taken back (when later hypotheses disagree with them, nothing more is shown until the turn's final text)."""

    def __init__(self):
        self.shown: list = []
        self._previous: list | None = None

    def update(self, hypothesis: list) -> list:
        previous, self._previous = self._previous, list(hypothesis)
        if previous is None:
            return []
        agreed = []
        for a, b in zip(previous, hypothesis):
            if a != b:
                break
            agreed.append(a)
        if len(agreed) <= len(self.shown) or agreed[: len(self.shown)] != self.shown:
            return []
        new = agreed[len(self.shown) :]
        self.shown = agreed
        return new
