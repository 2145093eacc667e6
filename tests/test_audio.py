"""Audio input: real files written with soundfile, resampling, and a clear AudioError for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from canary_qwen.defaults import SAMPLE_RATE
from canary_qwen.errors import AudioError, MissingDependencyError
from canary_qwen.pipeline import speech_clip
from canary_qwen.pipeline.audio import duration_s, load_audio, load_many, to_mono_16k
from canary_qwen.pipeline.speech_clip import ensure_espeak, synthesize_speech


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# --- good input -----------------------------------------------------------------------------------


def test_wav_16k_mono_round_trip_is_exact(tmp_path):
    x = np.random.default_rng(0).uniform(-0.9, 0.9, 12345).astype(np.float32)
    sf.write(tmp_path / "f.wav", x, SAMPLE_RATE, subtype="FLOAT")
    y = load_audio(tmp_path / "f.wav")
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, x)

    pcm = (x * 32767).astype(np.int16)
    sf.write(tmp_path / "p.wav", pcm, SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(str(tmp_path / "p.wav")), pcm.astype(np.float32) / 32768)
    assert duration_s(y) == pytest.approx(12345 / 16000)


def test_flac_44k_stereo_becomes_16k_mono_keeping_pitch(tmp_path):
    left, right = sine(440, 1.5, 44100, 0.6), sine(440, 1.5, 44100, 0.2)
    sf.write(tmp_path / "s.flac", np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    y = load_audio(tmp_path / "s.flac")
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - round(len(left) * 16000 / 44100)) <= 1
    assert peak_hz(y) == pytest.approx(440, abs=1.0)
    # Channels are averaged: (0.6 + 0.2) / 2 = 0.4 amplitude, away from the resampler's edges.
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)


def test_ogg_vorbis_is_read_and_resampled(tmp_path):
    sf.write(tmp_path / "v.ogg", sine(1000, 1.0, 22050), 22050, format="OGG", subtype="VORBIS")
    y = load_audio(tmp_path / "v.ogg")
    assert abs(len(y) - 16000) <= 1
    assert peak_hz(y) == pytest.approx(1000, abs=1.0)


def test_int_pcm_arrays_are_scaled():
    pattern = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    y = to_mono_16k(np.tile(pattern, 100), SAMPLE_RATE)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[:4], [0.0, 0.5, -1.0, 32767 / 32768])

    y32 = to_mono_16k(np.tile(pattern.astype(np.int32) << 16, 100), SAMPLE_RATE)
    np.testing.assert_allclose(y32[:4], [0.0, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-7)

    stereo = np.stack([np.full(800, 16384, np.int16), np.zeros(800, np.int16)], axis=1)
    np.testing.assert_array_equal(to_mono_16k(stereo, SAMPLE_RATE), np.full(800, 0.25, np.float32))


def test_in_memory_arrays_are_resampled():
    y = to_mono_16k(sine(300, 0.5, 8000).astype(np.float64), 8000)
    assert y.dtype == np.float32 and abs(len(y) - 8000) <= 1
    assert peak_hz(y) == pytest.approx(300, abs=2.0)


# --- bad files: each names the file and the problem ----------------------------------------------


def _write(tmp_path, name, samples, rate=SAMPLE_RATE, **kw):
    path = tmp_path / name
    sf.write(path, samples, rate, **kw)
    return path


def _text_as_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    return path


def _truncated_header(tmp_path):
    good = _write(tmp_path, "good.wav", sine(440, 0.5, SAMPLE_RATE))
    path = tmp_path / "cut.wav"
    path.write_bytes(good.read_bytes()[:20])  # RIFF header, half of the 'fmt ' chunk
    return path


def _unsupported(tmp_path):
    path = tmp_path / "voice.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))
    return path


BAD_FILES = {
    "missing": (lambda d: d / "nope.wav", {}, "not found"),
    "directory": (lambda d: d, {}, "directory"),
    "zero bytes": (lambda d: (d / "z.wav").write_bytes(b"") or d / "z.wav", {}, "empty"),
    "text renamed .wav": (_text_as_wav, {}, "not a readable audio file"),
    "truncated header": (_truncated_header, {}, "corrupt"),
    "unsupported format": (_unsupported, {}, "unsupported audio format '.m4a'"),
    "no samples": (lambda d: _write(d, "e.wav", np.zeros((0, 1), np.float32)), {}, "empty audio (0 samples)"),
    "too short": (lambda d: _write(d, "s.wav", np.zeros(160, np.float32)), {}, "too short"),
    "shorter than custom minimum": (
        lambda d: _write(d, "m.wav", np.zeros(4800, np.float32)),
        {"min_duration_s": 0.5},
        "need at least 500 ms",
    ),
    "too long": (lambda d: _write(d, "l.wav", np.zeros(32000, np.float32)), {"max_duration_s": 1.5}, "2.0 s long"),
    "nan": (lambda d: _write(d, "n.wav", np.r_[np.zeros(800), np.nan].astype(np.float32), subtype="FLOAT"), {}, "NaN"),
    "inf": (lambda d: _write(d, "i.wav", np.r_[np.zeros(800), np.inf].astype(np.float32), subtype="FLOAT"), {}, "inf"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_audio_error(tmp_path, case):
    make, kwargs, problem = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: ")
    assert problem in str(err)


def test_too_long_message_suggests_chunking(tmp_path):
    path = _write(tmp_path, "long.wav", np.zeros(3 * SAMPLE_RATE, np.float32))
    with pytest.raises(AudioError, match=r"3\.0 s long, over the 2 s limit; split it into shorter chunks"):
        load_audio(path, max_duration_s=2)
    assert len(load_audio(path, max_duration_s=3)) == 3 * SAMPLE_RATE


BAD_ARRAYS = {
    "zero rate": (np.zeros(1000, np.float32), 0, "invalid sample rate"),
    "negative rate": (np.zeros(1000, np.float32), -16000, "invalid sample rate"),
    "nan rate": (np.zeros(1000, np.float32), float("nan"), "invalid sample rate"),
    "inf rate": (np.zeros(1000, np.float32), float("inf"), "invalid sample rate"),
    "text rate": (np.zeros(1000, np.float32), "16k", "sample rate must be a number"),
    "uint8": (np.zeros(1000, np.uint8), SAMPLE_RATE, "unsupported sample type uint8"),
    "int64": (np.zeros(1000, np.int64), SAMPLE_RATE, "unsupported sample type int64"),
    "complex": (np.zeros(1000, np.complex64), SAMPLE_RATE, "unsupported sample type complex64"),
    "3-D": (np.zeros((10, 10, 10), np.float32), SAMPLE_RATE, "1-D or 2-D"),
    "channels first": (np.zeros((2, 1000), np.float32), SAMPLE_RATE, "transpose"),
    "empty": (np.zeros(0, np.float32), SAMPLE_RATE, "empty audio"),
    "zero channels": (np.zeros((1000, 0), np.float32), SAMPLE_RATE, "empty audio"),
    "too short": (np.zeros(100, np.float32), SAMPLE_RATE, "too short"),
    "nan": (np.r_[np.zeros(999), np.nan].astype(np.float32), SAMPLE_RATE, "1 NaN/inf samples"),
    "overflows float32": (np.r_[np.zeros(999), 1e300], SAMPLE_RATE, "NaN/inf"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_array_raises_audio_error(case):
    samples, rate, problem = BAD_ARRAYS[case]
    with pytest.raises(AudioError) as info:
        to_mono_16k(samples, rate)
    assert info.value.path is None
    assert str(info.value).startswith("<array>: ")
    assert problem in str(info.value)


def test_load_many_keeps_order_and_returns_errors(tmp_path):
    a = _write(tmp_path, "a.wav", sine(440, 0.5, SAMPLE_RATE))
    b = _write(tmp_path, "b.flac", sine(440, 0.25, 32000), 32000)
    bad_text, missing = _text_as_wav(tmp_path), tmp_path / "missing.wav"
    results = load_many([a, bad_text, b, missing], max_duration_s=10)
    assert [type(r) for r in results] == [np.ndarray, AudioError, np.ndarray, AudioError]
    assert len(results[0]) == 8000 and abs(len(results[2]) - 4000) <= 1
    assert results[1].path == str(bad_text) and results[3].path == str(missing)
    assert "not found" in str(results[3])


# --- espeak-ng clips -----------------------------------------------------------------------------


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(speech_clip, "ensure_espeak", lambda: None)
    with pytest.raises(MissingDependencyError, match="apt-get install espeak-ng"):
        synthesize_speech("hello", tmp_path / "x.wav")


needs_espeak = pytest.mark.skipif(ensure_espeak() is None, reason="espeak-ng not installed (apt-get install espeak-ng)")


@needs_espeak
def test_espeak_clip_is_real_16k_speech(tmp_path):
    path = synthesize_speech("-The quick brown fox jumps over the lazy dog.", tmp_path / "sub" / "fox.wav")
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio = load_audio(path)
    assert 1.5 < duration_s(audio) < 6.0  # nine words at 150 wpm is ~3.5 s
    assert np.sqrt(np.mean(audio**2)) > 0.01
    # Faster speech is shorter.
    fast = load_audio(
        synthesize_speech("The quick brown fox jumps over the lazy dog.", tmp_path / "f.wav", rate_wpm=300)
    )
    assert len(fast) < 0.8 * len(audio)


@needs_espeak
def test_espeak_bad_voice_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="espeak-ng failed for voice 'xx-nope'"):
        synthesize_speech("hello", tmp_path / "x.wav", voice="xx-nope")


def test_wav_cut_short_is_reported_as_truncated(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, np.zeros(16000, dtype=np.float32) + 0.1, 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"cut.wav: truncated wav: the data chunk is \d+ bytes longer"):
        load_audio(path)
    path.write_bytes(data)  # whole again: loads
    assert len(load_audio(path)) == 16000
