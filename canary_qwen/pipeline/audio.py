"""Audio input for the model: any readable file or array -> 16 kHz mono float32, or a clear AudioError.

The model only accepts 16 kHz mono float32 waveforms. Everything that reaches it goes through
``to_mono_16k`` so files and raw arrays sent to clients/servers get the same checks, and every
problem surfaces as one exception type whose message names the input and what is wrong with it
(instead of a libsndfile traceback or, worse, a silently wrong transcript).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..defaults import SAMPLE_RATE
from ..errors import AudioError

MIN_DURATION_S = 0.02  # default floor: anything shorter is a broken or empty recording, not speech
_ARRAY = "<array>"  # name used in messages for in-memory audio
# Extensions libsndfile reads besides its format names (WAV, FLAC, OGG, ...). RAW is left out:
# headerless PCM needs a rate and sample type that a path alone cannot give.
_EXTENSION_ALIASES = {"aif", "aifc", "oga", "opus", "snd", "wave"}
READABLE_EXTENSIONS = {f.lower() for f in sf.available_formats() if f != "RAW"} | _EXTENSION_ALIASES


def _too_long(seconds: float, limit: float) -> str:
    return (
        f"audio is {seconds:.1f} s long, over the {limit:g} s limit; split it into shorter chunks "
        "(see canary_qwen.pipeline.windowing) or raise max_duration_s"
    )


def duration_s(samples: np.ndarray, sample_rate: float = SAMPLE_RATE) -> float:
    """Length in seconds of a waveform (frames along the first axis)."""
    return len(samples) / sample_rate


def to_mono_16k(
    samples: np.ndarray,
    sample_rate: float,
    *,
    max_duration_s: float | None = None,
    min_duration_s: float = MIN_DURATION_S,
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Validate an in-memory waveform and return it as 1-D float32 at 16 kHz.

    ``samples`` is 1-D or 2-D ``[frames, channels]``, floating point, or int16/int32 PCM (scaled
    to [-1, 1]). ``path`` only names the source in error messages.
    """

    def fail(problem: str) -> AudioError:
        return AudioError(path, problem)

    try:
        samples = np.asarray(samples)
    except (TypeError, ValueError) as e:  # e.g. ragged nested lists
        raise fail(f"not an array of samples ({e})") from None
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise fail(f"sample rate must be a number, got {sample_rate!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise fail(f"invalid sample rate {sample_rate!r} (must be a positive finite number of Hz)")

    if samples.ndim not in (1, 2):
        raise fail(f"audio must be 1-D or 2-D [frames, channels], got shape {samples.shape}")
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0] > 0:
        # More channels than frames is almost always a [channels, frames] array.
        raise fail(f"2-D audio must be [frames, channels], got shape {samples.shape}; transpose it")

    if samples.dtype == np.int16:
        x = samples.astype(np.float32) / 32768.0
    elif samples.dtype == np.int32:
        x = (samples.astype(np.float64) / 2147483648.0).astype(np.float32)  # float32 would lose bits first
    elif np.issubdtype(samples.dtype, np.floating):
        with np.errstate(over="ignore"):  # overflow to inf is reported below as non-finite samples
            x = samples.astype(np.float32, copy=False)
    else:
        raise fail(f"unsupported sample type {samples.dtype} (use float, int16 or int32 PCM)")
    if x.size == 0:  # before the downmix: the mean over 0 channels would be NaN
        raise fail("empty audio (0 samples)")

    if x.ndim == 2:
        # Averaging keeps the level of correlated channels; [:, 0] avoids any rounding for mono.
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)

    seconds = duration_s(x, rate)
    if seconds < min_duration_s:
        raise fail(
            f"audio is too short ({seconds * 1000:.1f} ms, {x.size} samples); need at least {min_duration_s * 1000:g} ms"
        )
    if max_duration_s is not None and seconds > max_duration_s:
        raise fail(_too_long(seconds, max_duration_s))
    # Checked after the float32 cast: huge float64 values overflow to inf there.
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise fail(f"audio contains {bad} NaN/inf samples")

    if rate != SAMPLE_RATE:
        x = soxr.resample(x, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(x, dtype=np.float32)


def _wav_data_shortfall(path: Path) -> int:
    """Bytes a RIFF/WAVE file's data chunk promises beyond the end of the file (0 when whole).

    libsndfile silently reads what is there from a cut-off wav; a transcript of half a file is a
    wrong answer, so a short file is reported as corrupt instead.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        size = path.stat().st_size
        while chunk := f.read(8):
            if len(chunk) < 8:
                return 0
            length = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                missing = f.tell() + length - size
                # 0xFFFFFFFF / 0 mean "unknown length" (streamed wav): nothing to compare against
                return missing if length not in (0, 0xFFFFFFFF) and missing > 0 else 0
            f.seek(length + (length & 1), 1)
    return 0


def load_audio(
    path: str | os.PathLike,
    *,
    max_duration_s: float | None = None,
    min_duration_s: float = MIN_DURATION_S,
) -> np.ndarray:
    """Read an audio file (wav, flac, ogg, ... anything libsndfile reads) as 1-D float32 at 16 kHz."""
    p = Path(path)
    if not p.exists():
        raise AudioError(path, "file not found")
    if p.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if p.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        if missing := _wav_data_shortfall(p):  # also a real OSError (permission denied) before libsndfile's
            raise AudioError(path, f"truncated wav: the data chunk is {missing} bytes longer than the file")
        with sf.SoundFile(p) as f:
            # Reject overlong files from the header, before reading hours of audio into memory.
            if max_duration_s is not None and f.samplerate > 0 and f.frames / f.samplerate > max_duration_s:
                raise AudioError(path, _too_long(f.frames / f.samplerate, max_duration_s))
            samples = f.read(dtype="float32", always_2d=True)
            sample_rate = f.samplerate
    except AudioError:
        raise
    except OSError as e:
        raise AudioError(path, f"cannot read file: {e.strerror or e}") from e
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        suffix = p.suffix.lower().lstrip(".")
        if suffix and suffix not in READABLE_EXTENSIONS:
            problem = (
                f"unsupported audio format '.{suffix}' (readable: wav, flac, ogg, mp3, aiff, ...); "
                f"convert it first, e.g. ffmpeg -i in.{suffix} -ar 16000 -ac 1 out.wav"
            )
        else:
            # libsndfile's own reason ("Format not recognised", "Malformed 'fmt ' chunk") says what is wrong.
            reason = (e.error_string if isinstance(e, sf.LibsndfileError) else str(e)).rstrip(".")
            problem = f"not a readable audio file or corrupt ({reason})"
        raise AudioError(path, problem) from e
    return to_mono_16k(samples, sample_rate, max_duration_s=max_duration_s, min_duration_s=min_duration_s, path=path)


def load_many(paths: Iterable[str | os.PathLike], **kwargs) -> list[np.ndarray | AudioError]:
    """``load_audio`` for each path, in order; failures come back as AudioError entries so a batch keeps going."""
    results: list[np.ndarray | AudioError] = []
    for path in paths:
        try:
            results.append(load_audio(path, **kwargs))
        except AudioError as e:
            results.append(e)
    return results
