"""Real spoken test clips from text with the espeak-ng synthesiser (demo and tests, no downloads).

espeak-ng writes 22.05 kHz wav; the clip is passed through ``load_audio`` so it gets the same
resampling and checks as any user file, then saved as 16 kHz mono PCM16, the model's input format.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from ..defaults import SAMPLE_RATE
from ..errors import ExternalToolError, MissingDependencyError, UsageError
from .audio import load_audio

ESPEAK_REQUIREMENT = (
    "the espeak-ng program (`sudo apt-get install espeak-ng` on Debian/Ubuntu, `brew install espeak-ng` on macOS)"
)


def ensure_espeak() -> str | None:
    """Path of the espeak-ng binary, or None when it is not installed."""
    return shutil.which("espeak-ng")


def synthesize_speech(
    text: str,
    out_path: str | os.PathLike,
    *,
    voice: str = "en-us",
    rate_wpm: int = 150,
) -> Path:
    """Speak ``text`` with espeak-ng into ``out_path`` as a 16 kHz mono PCM16 wav; returns the path."""
    if not text.strip():
        raise UsageError("synthesize_speech needs non-empty text")
    exe = ensure_espeak()
    if exe is None:
        raise MissingDependencyError("espeak-ng", ESPEAK_REQUIREMENT)
    out = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        # Text goes through stdin so a sentence starting with '-' is never taken for an option.
        proc = subprocess.run(
            [exe, "-v", voice, "-s", str(int(rate_wpm)), "-w", str(raw), "--stdin"],
            input=text,
            text=True,
            capture_output=True,
            timeout=120,
        )
        if proc.returncode != 0 or not raw.exists():
            detail = proc.stderr.strip() or f"exit status {proc.returncode}"
            raise ExternalToolError(f"espeak-ng failed for voice {voice!r}: {detail}")
        audio = load_audio(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Resampling can overshoot full scale a little; clip so PCM16 conversion cannot wrap around.
    sf.write(out, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return out
