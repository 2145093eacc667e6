"""What OpenAI's chat completions API speaks, for Canary-Qwen's LLM mode: the request's fields and what each means
here, and the response bodies and stream chunks.

``POST /v1/chat/completions``, a JSON body:

- ``model`` (required): the served model's name; any other is refused (404, ``model_not_found``).
- ``messages`` (required): ``system`` (or ``developer``), ``user`` and ``assistant`` turns, ending with a user turn.
  Content is a string or a list of parts: ``{"type": "text", "text": ...}`` and, in user turns,
  ``{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav" | "mp3" | "flac" | "ogg" | ...}}``.
  Each audio part is transcribed (ASR mode, windowed as ``canary-qwen transcribe`` does) and stands as its
  transcript; a turn's parts are joined with a blank line, so a text part then an audio part is the model card's
  ``f"{prompt}\\n\\n{transcript}"``. The dialogue is then answered in LLM mode (the speech LoRA off).
- ``max_completion_tokens`` (or the older ``max_tokens``): the answer's budget, 1 up to the server's limit
  (default: the server's LLM-mode default).
- ``stream``: ``true`` sends ``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``;
  ``stream_options.include_usage`` adds a last chunk with the usage.
- ``temperature``: greedy only: absent or 0; ``n``: absent or 1. Anything else is refused (400).
- Tools, images and other fields this model cannot use are refused where they would change the answer
  (``tools``, image parts), ignored otherwise.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model.prompt import Turn
from .protocol import check_model, invalid

ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "aiff", "webm")


@dataclass(frozen=True)
class AudioPart:
    """An ``input_audio`` part: the decoded bytes and the format the client named."""

    data: bytes
    format: str


@dataclass(frozen=True)
class Message:
    """One turn as sent: its role (``developer`` read as system) and its parts, text (str) or audio."""

    role: str
    parts: list[str | AudioPart]

    @property
    def audio(self) -> list[AudioPart]:
        return [p for p in self.parts if isinstance(p, AudioPart)]


@dataclass(frozen=True)
class ChatRequest:
    """The body's fields, checked."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None  # None: the server's default
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def from_json(cls, body: object, served_model: str) -> ChatRequest:
        """Check the body against what this model can do; an :class:`APIError` names the first field that is wrong."""
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object", None, "invalid_json")
        model = check_model(body.get("model"), served_model)
        temperature = body.get("temperature")
        if temperature is not None and (not _is_number(temperature) or temperature != 0):
            raise invalid(
                f"temperature {temperature} is not supported: this model decodes greedily (send 0 or nothing)",
                "temperature",
                "unsupported_value",
            )
        n = body.get("n")
        if n is not None and n != 1:
            raise invalid(f"n={n} is not supported: greedy decoding gives one answer (send 1 or nothing)", "n",
                          "unsupported_value")  # fmt: skip
        if body.get("tools") or body.get("functions"):
            raise invalid("tools are not supported by this model", "tools", "unsupported_value")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise invalid(f"stream must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object", "stream_options")
        return cls(
            model=model,
            messages=_messages(body.get("messages")),
            max_tokens=_budget(body),
            stream=stream,
            include_usage=bool(options.get("include_usage", False)),
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _budget(body: dict) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or value != int(value):
            raise invalid(f"{name} must be a whole number, got {value!r}", name)
        return int(value)
    return None


def _messages(messages: object) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' is required: a non-empty list of turns", "messages", "missing")
    checked = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object with role and content", param)
        role = ROLE_NAMES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise invalid(
                f"{param}.role {message.get('role')!r} is not supported (system, developer, user or assistant)",
                f"{param}.role",
                "unsupported_value",
            )
        parts = _parts(message.get("content"), f"{param}.content", audio_allowed=role == "user")
        checked.append(Message(role, parts))
    if checked[-1].role != "user":
        raise invalid("the last message must be the user's (the turn to answer)", f"messages[{len(checked) - 1}]")
    return checked


def _parts(content: object, param: str, *, audio_allowed: bool) -> list[str | AudioPart]:
    if isinstance(content, str):
        parts: list[str | AudioPart] = [content]
    elif isinstance(content, list) and content:
        parts = [_part(p, f"{param}[{i}]", audio_allowed) for i, p in enumerate(content)]
    else:
        raise invalid(f"{param} must be a string or a non-empty list of parts", param, "missing")
    if not any(isinstance(p, AudioPart) or p.strip() for p in parts):
        raise invalid(f"{param} is empty: send text or audio", param, "missing")
    return parts


def _part(part: object, param: str, audio_allowed: bool) -> str | AudioPart:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part, dict) and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "input_audio" and isinstance(part, dict):
        if not audio_allowed:
            raise invalid(f"{param}: audio goes in user turns only", param, "unsupported_value")
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise invalid(f"{param}.input_audio must be an object with data (base64) and format", param)
        fmt = str(audio.get("format", "")).lower()
        if fmt not in AUDIO_FORMATS:
            raise invalid(
                f"{param}.input_audio.format {audio.get('format')!r} is not supported (one of {', '.join(AUDIO_FORMATS)})",
                f"{param}.input_audio.format",
                "unsupported_format",
            )
        try:
            data = base64.b64decode(audio["data"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{param}.input_audio.data is not valid base64", f"{param}.input_audio.data",
                          "invalid_audio") from None  # fmt: skip
        if not data:
            raise invalid(f"{param}.input_audio.data is empty", f"{param}.input_audio.data", "empty_file")
        return AudioPart(data, fmt)
    raise invalid(
        f"{param}: part type {kind!r} is not supported (text, or input_audio in user turns)", param, "unsupported_value"
    )


def turns(messages: list[Message], transcripts: Sequence[str]) -> list[Turn]:
    """The dialogue to answer: the audio parts replaced by ``transcripts`` (one each, in the order the parts come),
    a turn's parts joined with a blank line."""
    heard = iter(transcripts)
    return [
        Turn(m.role, "\n\n".join(next(heard) if isinstance(p, AudioPart) else p for p in m.parts)) for m in messages
    ]


# -- the responses -----------------------------------------------------------------------------------------
@dataclass
class Completion:
    """One answer: its id, text and token counts; ``finish_reason`` ``stop`` (eos) or ``length`` (the budget)."""

    model: str
    prompt_tokens: int = 0  # the dialogue's tokens, once the upstream has counted them
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def body(self, text: str, completion_tokens: int, finish_reason: str) -> dict:
        """``chat.completion``."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            ],
            "usage": self.usage(completion_tokens),
        }

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
        """One ``chat.completion.chunk``; the usage chunk has no choices."""
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return body
