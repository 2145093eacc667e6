"""What the OpenAI speech-to-text API speaks, apart from how it is served: the request's fields and what each one
means for Canary-Qwen, the response bodies, the streaming events and the error shape.

Field by field (``POST /v1/audio/transcriptions``, multipart form):

- ``file`` (required): the audio, any format libsndfile reads (wav, flac, ogg/opus, mp3, aiff, ...), any sample
  rate and channel count (resampled to 16 kHz mono). Longer than the window (40 s) it is cut at quiet points,
  each window decoded on its own and the texts joined with one space, exactly as ``canary-qwen transcribe``.
- ``model`` (required): the served model's name (``--served-model-name``); any other name is refused (404,
  ``model_not_found``): one server serves one model.
- ``response_format``: ``json`` (default), ``text``, ``verbose_json``, ``srt``, ``vtt``; others are refused (400).
- ``prompt``: the model's user instruction in place of ``Transcribe the following:``; the audio goes where
  ``<|audioplaceholder|>`` stands, or after the text (the command line's ``--prompt``). It is *not* Whisper's
  "previous text" context: text sent there becomes the instruction the model follows.
- ``language``: the model transcribes English; absent, ``en``, ``en-XX`` or ``english`` are accepted, anything
  else is refused (400, ``unsupported_language``).
- ``temperature``: decoding is greedy (as NeMo's); absent or 0 is accepted, anything else is refused (400).
- ``stream``: ``true`` sends the text as server-sent events while it is decoded (``transcript.text.delta`` events,
  then one ``transcript.text.done`` with the whole text); only with ``json`` or ``text``.
- ``timestamp_granularities[]``: ``segment`` (one segment per window) is what there is; ``word`` is refused.
- ``max_new_tokens`` (not OpenAI's; ``extra_body={"max_new_tokens": N}``): decoding budget per window, 1 up to the
  server's ``--max-new-tokens-limit`` (default: the server's ``--max-new-tokens``).
- Any other field a client sends (``include[]``, ``chunking_strategy``, ...) is ignored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

MODEL_OWNER = "nvidia"
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
STREAM_FORMATS = ("json", "text")
LANGUAGE = "english"  # what verbose_json reports (OpenAI names the language in full there)
_ENGLISH = re.compile(r"^(en([-_][a-z0-9]+)?|eng|english)$", re.IGNORECASE)
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}

# -- errors -------------------------------------------------------------------------------------------------
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"


class APIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with ``status``;
    ``retry_after_s`` adds a ``Retry-After`` header (busy or unavailable: try again later)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s
        self.close_connection = False  # answer with Connection: close (a body left unread)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"Connection": "close"} if self.close_connection else {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return headers


def invalid(message: str, param: str | None = None, code: str = "invalid_value", status: int = 400) -> APIError:
    """A 400 (or ``status``) invalid_request_error about ``param``."""
    return APIError(status, message, param=param, code=code)


def check_model(model: object, served_model: str) -> str:
    """A request's ``model``: required, and the served model's name (any other: 404 ``model_not_found``)."""
    if not isinstance(model, str) or not model.strip():
        raise invalid("'model' is required: the name of the served model (GET /v1/models)", "model", "missing")
    model = model.strip()
    if model != served_model:
        raise APIError(
            404,
            f"The model '{model}' does not exist on this server; it serves '{served_model}'",
            param="model",
            code="model_not_found",
        )
    return model


# -- the request --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranscriptionRequest:
    """The form's fields, checked (the audio itself is the upload's, read apart)."""

    model: str
    response_format: str = "json"
    prompt: str | None = None
    language: str | None = None
    temperature: float = 0.0
    stream: bool = False
    max_new_tokens: int | None = None  # None: the server's default budget

    @classmethod
    def from_form(cls, form: dict[str, str], served_model: str) -> TranscriptionRequest:
        """Check the form fields (strings by name) against what this model can do; an :class:`APIError` names the
        first field that is wrong."""
        model = check_model(form.get("model"), served_model)
        response_format = form.get("response_format", "").strip() or "json"
        if response_format not in RESPONSE_FORMATS:
            raise invalid(
                f"response_format '{response_format}' is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
                "response_format",
                "unsupported_value",
            )
        language = form.get("language", "").strip() or None
        if language is not None and not _ENGLISH.match(language):
            raise invalid(
                f"language '{language}' is not supported: this model transcribes English (send 'en' or nothing)",
                "language",
                "unsupported_language",
            )
        temperature = _number(form.get("temperature"), "temperature")
        if temperature not in (None, 0.0):
            raise invalid(
                f"temperature {temperature:g} is not supported: this model decodes greedily (send 0 or nothing)",
                "temperature",
                "unsupported_value",
            )
        stream = _boolean(form.get("stream"), "stream")
        if stream and response_format not in STREAM_FORMATS:
            raise invalid(
                f"stream=true sends text events; use response_format json or text, not {response_format}",
                "stream",
                "unsupported_value",
            )
        granularities = {g.strip() for g in form.get("timestamp_granularities[]", "").split(",") if g.strip()}
        if granularities - {"segment"}:
            raise invalid(
                "timestamp_granularities: only 'segment' is available (one segment per window of the audio)",
                "timestamp_granularities",
                "unsupported_value",
            )
        budget = _number(form.get("max_new_tokens"), "max_new_tokens")
        if budget is not None and budget != int(budget):
            raise invalid(f"max_new_tokens must be a whole number, got {budget:g}", "max_new_tokens")
        prompt = form.get("prompt")
        return cls(
            model=model,
            response_format=response_format,
            prompt=prompt if prompt and prompt.strip() else None,
            language=language,
            temperature=0.0,
            stream=stream,
            max_new_tokens=None if budget is None else int(budget),
        )


def _number(value: str | None, param: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise invalid(f"{param} must be a number, got {value!r}", param) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise invalid(f"{param} must be a finite number, got {value!r}", param)
    return number


def _boolean(value: str | None, param: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise invalid(f"{param} must be true or false, got {value!r}", param)


# -- the responses -----------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One window of the audio as OpenAI's ``TranscriptionSegment``. Greedy decoding computes no probabilities:
    ``avg_logprob`` and ``no_speech_prob`` are 0.0 (as vLLM's server sends them); ``compression_ratio`` is Whisper's
    (text bytes over their zlib-compressed bytes), so its repetition check works."""

    id: int
    seek: int  # the window's start in 10 ms mel frames
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    """A whole upload transcribed: the joined text, its duration and one segment per window."""

    text: str
    duration_s: float
    segments: list[Segment] = field(default_factory=list)

    def json(self) -> dict:
        """``response_format=json`` (OpenAI's ``Transcription``; usage in audio seconds)."""
        return {"text": self.text, "usage": {"type": "duration", "seconds": round(self.duration_s, 3)}}

    def verbose_json(self) -> dict:
        """``response_format=verbose_json`` (OpenAI's ``TranscriptionVerbose``)."""
        return {
            "task": "transcribe",
            "language": LANGUAGE,
            "duration": round(self.duration_s, 3),
            "text": self.text,
            "segments": [asdict(s) for s in self.segments],
            "usage": {"type": "duration", "seconds": round(self.duration_s, 3)},
        }


def model_card(served_model: str, created: int) -> dict:
    """One entry of ``GET /v1/models``."""
    return {"id": served_model, "object": "model", "created": created, "owned_by": MODEL_OWNER}


# -- streaming events (OpenAI's TranscriptionTextDeltaEvent / TranscriptionTextDoneEvent) --------------------
def delta_event(piece: str) -> dict:
    return {"type": "transcript.text.delta", "delta": piece}


def done_event(text: str) -> dict:
    """The last event: the whole text (OpenAI's done event counts usage in tokens only, so none is sent)."""
    return {"type": "transcript.text.done", "text": text}
