"""What OpenAI's Realtime API speaks for a transcription session (``GET /v1/realtime``, a WebSocket; the event models
of ``openai.types.realtime``), and what each part means here.

Client events: ``session.update`` (``session.type`` "transcription"; ``audio.input.format`` ``audio/pcm`` at 24 kHz,
OpenAI's default, or 16 kHz; ``audio.input.transcription`` with ``model`` the served model's name or absent,
``language`` English or absent, ``prompt`` the model's instruction; ``audio.input.turn_detection`` ``server_vad``
with ``threshold``, ``prefix_padding_ms`` and ``silence_duration_ms``, or null: the client commits),
``input_audio_buffer.append`` (``audio``: base64 of 16-bit little-endian mono PCM), ``input_audio_buffer.commit`` and
``input_audio_buffer.clear``.

Server events: ``session.created`` and ``session.updated``; ``input_audio_buffer.speech_started``,
``speech_stopped``, ``committed`` and ``cleared``; ``conversation.item.input_audio_transcription.delta`` (words the
last two re-decodes agree on), ``.completed`` (the turn's audio decoded whole: the text ``canary-qwen transcribe``
gives for those samples) and ``.failed``; ``error`` for a bad event, after which the session goes on.
"""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import dataclass, field, replace

RATES = (24000, 16000)  # audio/pcm rates taken: OpenAI's default, and the model's own
_ENGLISH = re.compile(r"^(en([-_][a-z0-9]+)?|eng|english)$", re.IGNORECASE)


@dataclass(frozen=True)
class LiveSettings:
    """Limits of live sessions: ``max_sessions`` at once (one more is refused with an error event), the uncommitted
    audio a session may hold (``max_buffer_s``), how long it may stay silent (``idle_timeout_s``: no event at all),
    the largest event (``max_message_bytes``), how often the turn so far is re-decoded for partial text
    (``partial_interval_s``) and how many new tokens a re-decode adds after the agreed ones (``partial_new_tokens``,
    where the upstream can force an answer's start)."""

    max_sessions: int = 16
    max_buffer_s: float = 120.0
    idle_timeout_s: float = 60.0
    max_message_bytes: int = 2**20
    partial_interval_s: float = 0.5
    partial_new_tokens: int = 8


class EventError(Exception):
    """A client event that cannot be applied: answered with an ``error`` event, and the session goes on."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class Vad:
    """``server_vad`` turn detection, OpenAI's fields and defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def body(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms}  # fmt: skip


@dataclass(frozen=True)
class SessionConfig:
    """A transcription session's settings: the input rate, the model's instruction (None: its default) and turn
    detection (None: the client commits each turn)."""

    rate: int = 24000
    prompt: str | None = None
    vad: Vad | None = field(default_factory=Vad)
    id: str = field(default_factory=lambda: f"sess_{uuid.uuid4().hex[:20]}")

    def body(self, served_model: str) -> dict:
        """The ``session`` object of ``session.created`` / ``session.updated``."""
        return {
            "type": "transcription",
            "id": self.id,
            "object": "realtime.transcription_session",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate},
                    "transcription": {"model": served_model, "language": "en", "prompt": self.prompt or ""},
                    "turn_detection": None if self.vad is None else self.vad.body(),
                    "noise_reduction": None,
                }
            },
            "include": [],
        }

    def updated(self, session: object, served_model: str) -> SessionConfig:
        """These settings changed as ``session.update``'s ``session`` says; an EventError names what is wrong (and
        nothing changes)."""
        if not isinstance(session, dict):
            raise EventError("session.update needs a session object", param="session")
        kind = session.get("type", "transcription")
        if kind != "transcription":
            raise EventError(
                f"session.type {kind!r}: this server runs transcription sessions only", "unsupported_value",
                "session.type",
            )  # fmt: skip
        audio = _object(session.get("audio", {}), "session.audio")
        given = _object(audio.get("input", {}), "session.audio.input")
        config = self
        if "format" in given:
            config = replace(config, rate=_rate(given["format"]))
        if "transcription" in given:
            config = replace(config, prompt=_transcription(given["transcription"], served_model))
        if "turn_detection" in given:
            config = replace(config, vad=_vad(given["turn_detection"], config.vad))
        return config


def _object(value: object, param: str) -> dict:
    if not isinstance(value, dict):
        raise EventError(f"{param} must be an object", param=param)
    return value


def _rate(value: object) -> int:
    fmt = _object(value, "session.audio.input.format")
    if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", 24000) not in RATES:
        raise EventError(
            f"audio format {fmt} is not supported: send audio/pcm (16-bit mono) at 24000 or 16000 Hz",
            "unsupported_format",
            "session.audio.input.format",
        )
    return int(fmt.get("rate", 24000))


def _transcription(value: object, served_model: str) -> str | None:
    settings = _object(value, "session.audio.input.transcription")
    model = settings.get("model")
    if model not in (None, "", served_model):
        raise EventError(
            f"transcription model {model!r} is not served here; it serves {served_model!r}", "model_not_found",
            "session.audio.input.transcription.model",
        )  # fmt: skip
    language = settings.get("language")
    if language and not _ENGLISH.match(str(language)):
        raise EventError(
            f"language {language!r} is not supported: this model transcribes English", "unsupported_language",
            "session.audio.input.transcription.language",
        )  # fmt: skip
    prompt = settings.get("prompt")
    return str(prompt) if prompt else None


def _vad(value: object, current: Vad | None) -> Vad | None:
    if value is None:
        return None
    given = _object(value, "session.audio.input.turn_detection")
    if given.get("type", "server_vad") != "server_vad":
        raise EventError(
            f"turn_detection type {given.get('type')!r} is not supported: use server_vad or null", "unsupported_value",
            "session.audio.input.turn_detection.type",
        )  # fmt: skip
    base = current or Vad()
    try:
        vad = Vad(
            threshold=float(given.get("threshold", base.threshold)),
            prefix_padding_ms=int(given.get("prefix_padding_ms", base.prefix_padding_ms)),
            silence_duration_ms=int(given.get("silence_duration_ms", base.silence_duration_ms)),
        )
    except (TypeError, ValueError):
        raise EventError("turn_detection values must be numbers", param="session.audio.input.turn_detection") from None
    if not 0 <= vad.threshold <= 1 or vad.prefix_padding_ms < 0 or not 10 <= vad.silence_duration_ms <= 10_000:
        raise EventError(
            "turn_detection: threshold 0..1, prefix_padding_ms >= 0, silence_duration_ms 10..10000",
            param="session.audio.input.turn_detection",
        )
    return vad


class Events:
    """Server events of one session, each with its own ``event_id``."""

    def __init__(self):
        self._ids = itertools.count(1)

    def __call__(self, kind: str, **fields) -> dict:
        return {"type": kind, "event_id": f"event_{next(self._ids)}", **fields}

    def error(self, message: str, code: str, param: str | None = None, event_id: str | None = None) -> dict:
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param,
                 "event_id": event_id}  # fmt: skip
        return self("error", error=error)
