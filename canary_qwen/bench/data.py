"""Benchmark inputs: a JSONL manifest of audio files or a seeded synthetic set generated in memory.

Both give a :class:`BenchSet` whose clips are sorted longest first (the leaderboard's order: the
least padding per batch, and the largest batch first, so an out-of-memory shows up at once).
Manifest audio is read from disk inside the timed pass (data loading is part of the leaderboard's
measurement); synthetic audio is generated up front and only handed over in the timed pass.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..defaults import SAMPLE_RATE
from ..errors import CanaryQwenError, UsageError


class ManifestError(CanaryQwenError, ValueError):
    """A manifest that cannot be benchmarked; the message names the file and line."""


@dataclass(frozen=True)
class Clip:
    id: str
    duration: float  # seconds: the manifest's value, or the exact synthetic length
    path: str | None = None  # absolute audio path (manifest); None for in-memory synthetic clips
    text: str | None = None  # reference transcript, if any


@dataclass
class BenchSet:
    """Clips sorted longest first; ``audio`` holds the waveforms of synthetic sets (None for manifests)."""

    name: str
    clips: list[Clip]
    audio: list[np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def has_references(self) -> bool:
        return any(c.text is not None for c in self.clips)

    def load(self, indices: Sequence[int]) -> list[np.ndarray]:
        """16 kHz float32 waveforms of the given clips (read from disk for manifests)."""
        if self.audio is not None:
            return [self.audio[i] for i in indices]
        from ..pipeline.audio import load_audio

        return [load_audio(str(self.clips[i].path)) for i in indices]


def _sorted(clips: list[Clip], audio: list[np.ndarray] | None = None) -> tuple[list[Clip], list[np.ndarray] | None]:
    # Stable: equal durations keep their input order, so the order is deterministic.
    order = sorted(range(len(clips)), key=lambda i: -clips[i].duration)
    return [clips[i] for i in order], (None if audio is None else [audio[i] for i in order])


# -- manifests -------------------------------------------------------------------------------------


def read_manifest(path) -> BenchSet:
    """NeMo-style JSONL: one object per line with ``audio_filepath``, ``duration`` and optional ``text``.

    Relative audio paths are resolved against the manifest's folder. Every problem (bad JSON,
    missing keys, missing audio files) raises :class:`ManifestError` naming the line, before any
    model is loaded. A missing ``duration`` is read from the file header.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} not found")
    clips: list[Clip] = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest} line {lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            if not entry.get("audio_filepath"):
                raise ManifestError(f"{where}: no 'audio_filepath'")
            audio_path = Path(str(entry["audio_filepath"])).expanduser()
            if not audio_path.is_absolute():
                audio_path = manifest.parent / audio_path
            audio_path = audio_path.resolve()
            if not audio_path.is_file():
                raise ManifestError(f"{where}: audio file not found: {audio_path}")
            duration = entry.get("duration")
            if duration is None:
                duration = _header_duration(audio_path, where)
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                raise ManifestError(f"{where}: 'duration' must be a number of seconds, got {duration!r}") from None
            if not math.isfinite(duration) or duration < 0:
                raise ManifestError(f"{where}: 'duration' must be a non-negative number of seconds, got {duration!r}")
            text = entry.get("text")
            clips.append(
                Clip(
                    id=str(entry.get("id", audio_path.stem)),
                    duration=duration,
                    path=str(audio_path),
                    text=None if text is None else str(text),
                )
            )
    if not clips:
        raise ManifestError(f"manifest {manifest} has no entries")
    return BenchSet(name=str(manifest), clips=_sorted(clips)[0])


def _header_duration(path: Path, where: str) -> float:
    import soundfile as sf

    try:
        return sf.info(str(path)).duration
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types
        raise ManifestError(f"{where}: no 'duration' and cannot read it from {path}: {e}") from None


# -- synthetic sets --------------------------------------------------------------------------------

_SPEC_HELP = "use mixed:MIN-MAX:N (durations uniform in [MIN, MAX] s) or uniform:SECONDS:N, e.g. mixed:2-20:768"
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_synthetic_spec(spec: str) -> tuple[float, float, int]:
    """``mixed:2-20:768`` -> (2.0, 20.0, 768); ``uniform:10:64`` -> (10.0, 10.0, 64)."""
    text = spec.strip().lower()
    m = re.fullmatch(rf"mixed:{_NUMBER}-{_NUMBER}:(\d+)", text)
    if m:
        low, high, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
    else:
        m = re.fullmatch(rf"uniform:{_NUMBER}:(\d+)", text)
        if not m:
            raise UsageError(f"bad synthetic set {spec!r}: {_SPEC_HELP}")
        low = high = float(m.group(1))
        n = int(m.group(2))
    if n < 1:
        raise UsageError(f"bad synthetic set {spec!r}: need at least one clip")
    if low <= 0 or high < low:
        raise UsageError(f"bad synthetic set {spec!r}: durations must be positive and MIN <= MAX")
    return low, high, n


def speech_like(samples: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced-speech stand-in: gliding harmonics (random pitch), syllable-rate envelope, noise."""
    t = np.arange(samples, dtype=np.float64) / SAMPLE_RATE
    base, depth, rate, syllables, phase0 = rng.uniform((90, 10, 0.3, 2.5, 0), (220, 50, 1.5, 5.0, 2 * np.pi))
    f0 = base + depth * np.sin(2 * np.pi * rate * t + phase0)
    phase = np.mod(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE, 2 * np.pi).astype(np.float32)
    # Harmonics 1..5 with amplitude 1/k: sin(k p) by the Chebyshev recurrence (two transcendentals, not five).
    s1, c2 = np.sin(phase), 2 * np.cos(phase)
    prev, cur = np.zeros_like(s1), s1
    voiced = s1.copy()
    for k in range(2, 6):
        prev, cur = cur, c2 * cur - prev
        voiced += cur / k
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * syllables * t + phase0)).astype(np.float32)
    return 0.2 * voiced * envelope + 0.02 * rng.standard_normal(samples, dtype=np.float32)


def synthetic_set(spec: str, seed: int = 0) -> BenchSet:
    """``spec`` clips generated in memory, identical for the same spec and seed, sorted longest first."""
    low, high, n = parse_synthetic_spec(spec)
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(low, high, n) if high > low else np.full(n, low)
    lengths = np.maximum(np.rint(seconds * SAMPLE_RATE).astype(np.int64), 1)
    audio = [speech_like(int(s), np.random.default_rng([seed, i])) for i, s in enumerate(lengths)]
    clips = [Clip(id=f"synthetic-{i:05d}", duration=int(s) / SAMPLE_RATE) for i, s in enumerate(lengths)]
    ordered, ordered_audio = _sorted(clips, audio)
    return BenchSet(name=spec.strip(), clips=ordered, audio=ordered_audio)


def load_set(*, manifest=None, synthetic: str | None = None, seed: int = 0) -> BenchSet:
    if (manifest is None) == (synthetic is None):
        raise UsageError("give exactly one of a manifest or a synthetic set spec")
    return read_manifest(manifest) if synthetic is None else synthetic_set(synthetic, seed)
