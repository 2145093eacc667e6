"""A transcript in each ``response_format``: json, text, verbose_json, srt, vtt.

``text`` is the text as it is (no newline added, so it equals ``transcribe --json``'s text). ``srt`` and ``vtt``
carry one cue per window that has text; a cue cannot hold a blank line (it would end the cue), so inside a cue
line breaks and the blanks around them become one newline, and WebVTT's reserved ``-->`` becomes ``->``.
"""

from __future__ import annotations

import json
import re
import zlib

from .protocol import Segment, Transcript

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
SRT = "application/x-subrip; charset=utf-8"
VTT = "text/vtt; charset=utf-8"
_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: UTF-8 bytes over zlib-compressed bytes (0 for no text)."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def cue_text(text: str) -> str:
    """A window's text as one subtitle cue's payload: no blank lines, no ``-->``."""
    return _BREAKS.sub("\n", text.strip()).replace("-->", "->")


def _clock(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _cues(segments: list[Segment]) -> list[tuple[Segment, str]]:
    return [(s, t) for s in segments if (t := cue_text(s.text))]


def srt(transcript: Transcript) -> str:
    blocks = [
        f"{n}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{text}\n"
        for n, (s, text) in enumerate(_cues(transcript.segments), 1)
    ]
    return "\n".join(blocks)


def vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{text}\n" for s, text in _cues(transcript.segments)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(transcript: Transcript, response_format: str) -> tuple[str, str]:
    """(body, media type) of ``transcript`` in ``response_format`` (one of protocol.RESPONSE_FORMATS)."""
    if response_format == "json":
        return json.dumps(transcript.json(), ensure_ascii=False), JSON
    if response_format == "verbose_json":
        return json.dumps(transcript.verbose_json(), ensure_ascii=False), JSON
    if response_format == "text":
        return transcript.text, TEXT
    if response_format == "srt":
        return srt(transcript), SRT
    if response_format == "vtt":
        return vtt(transcript), VTT
    raise ValueError(f"unknown response format {response_format!r}")
