"""The one table from the package's errors to HTTP statuses and OpenAI error types.

Every error a transcription can end with goes through :func:`api_error`: the handlers raise
:class:`~canary_qwen.openai_api.protocol.APIError` for what they check themselves (fields, upload size, too many in
flight) and let the engines' and the Triton client's own errors come here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..client.errors import (
    InferenceError,
    ModelFailedError,
    ModelNotReadyError,
    ServerBusyError,
    ServerUnreachableError,
    TritonClientError,
)
from ..errors import AudioError, BackendUnavailable, CanaryQwenError, InputError, Overloaded, RequestTimeout
from .protocol import INVALID_REQUEST, RATE_LIMIT, SERVER_ERROR, APIError

RETRY_AFTER_S = 1.0  # what Retry-After says to a refused request (busy or unavailable)


@dataclass(frozen=True)
class Mapping:
    status: int
    type: str
    code: str
    retry: bool = False  # send Retry-After
    param: str | None = None


# First match wins (subclasses before their bases).
ERRORS: tuple[tuple[type[BaseException], Mapping], ...] = (
    (Overloaded, Mapping(429, RATE_LIMIT, "too_many_requests", retry=True)),
    (ServerBusyError, Mapping(503, SERVER_ERROR, "backend_busy", retry=True)),
    (RequestTimeout, Mapping(504, SERVER_ERROR, "backend_timeout")),
    (ServerUnreachableError, Mapping(503, SERVER_ERROR, "backend_unavailable", retry=True)),
    (ModelNotReadyError, Mapping(503, SERVER_ERROR, "backend_unavailable", retry=True)),
    (BackendUnavailable, Mapping(503, SERVER_ERROR, "backend_unavailable", retry=True)),
    (AudioError, Mapping(400, INVALID_REQUEST, "invalid_audio", param="file")),
    (InputError, Mapping(400, INVALID_REQUEST, "invalid_value")),
    (ModelFailedError, Mapping(502, SERVER_ERROR, "backend_error")),  # the Triton model failed: the server's fault
    (InferenceError, Mapping(400, INVALID_REQUEST, "refused_by_model")),  # it refused the input: the caller's
    (TritonClientError, Mapping(502, SERVER_ERROR, "backend_error")),
    (CanaryQwenError, Mapping(500, SERVER_ERROR, "internal_error")),
)
_BUG = Mapping(500, SERVER_ERROR, "internal_error")


def mapping_for(error: BaseException) -> Mapping:
    """By the error's type alone."""
    for kind, mapping in ERRORS:
        if isinstance(error, kind):
            return mapping
    return _BUG


def api_error(error: BaseException) -> APIError:
    """``error`` in OpenAI's shape; an :class:`APIError` as it is. Anything not of this package is a bug: its
    message is not shown to the caller (the server's log has it)."""
    if isinstance(error, APIError):
        return error
    m = mapping_for(error)
    if m is _BUG:
        message = f"internal error ({type(error).__name__}); the server's log has the details"
    elif isinstance(error, AudioError):
        message = error.problem
    else:
        message = str(error)
    return APIError(
        m.status, message, type=m.type, param=m.param, code=m.code, retry_after_s=RETRY_AFTER_S if m.retry else None
    )
