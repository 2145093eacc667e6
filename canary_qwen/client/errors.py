"""The Triton client's errors, and the one place that reads Triton's wording to tell them apart.

Each names the server. :class:`ServerUnreachableError`, :class:`ServerBusyError`, :class:`RequestTimeoutError` and
:class:`ModelNotReadyError` mean the request got no answer: it may go to another server (``RETRYABLE``).
:class:`InferenceError` is the model's own refusal of the request (an empty or too long clip, a budget over the
limit), :class:`ModelFailedError` a model that failed on it: both are answers, never retried.
"""

from __future__ import annotations

import json
import urllib.error

from ..errors import CanaryQwenError, RequestTimeout


class TritonClientError(CanaryQwenError):
    """Base class of the client's errors; ``url`` is the server's address."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class ServerUnreachableError(TritonClientError):
    """Nothing answers at the URL (wrong address or port, server not started, or it went away)."""


class ModelNotReadyError(TritonClientError):
    """The server answers but the model is not loaded (not in the repository, failed to load, or its process died)."""


class ServerBusyError(TritonClientError):
    """The model's request queue is full or the request waited too long in it (``triton-repo --max-queue``,
    ``--queue-timeout-s``)."""


class RequestTimeoutError(TritonClientError, RequestTimeout):
    """No answer (or no next streamed piece) within the client's timeout."""


class InferenceError(TritonClientError):
    """The model refused the request; the message is the model's own (what to change in the request)."""


class ModelFailedError(InferenceError):
    """The model failed on the request (a server-side error; its log has the traceback)."""


# Errors after which the same request may go to another server: it was not answered.
RETRYABLE = (ServerUnreachableError, ServerBusyError, RequestTimeoutError, ModelNotReadyError)


def answer_error(message: str, url: str, model: str) -> TritonClientError:
    """The error for a server's error answer, told apart by its wording: Triton's own for a full queue ("Exceeds
    maximum queue size", "Request timeout expired") and a dead python model process; this project's python models
    word a failure as "NAME failed: REASON" (``serving/models/responses.py``) and a refusal as anything else."""
    where = f"Triton at {url} ({model})"
    if "Exceeds maximum queue size" in message or "Request timeout expired" in message:
        return ServerBusyError(f"{where} is busy: {message}; retry later", url)
    if "Stub process" in message and "is not healthy" in message:
        # a python model's process died; Triton 2.51 neither restarts it nor reports the model not ready
        return ModelNotReadyError(f"{where} lost a model process: {message}", url)
    if " failed: " in message:
        return ModelFailedError(f"{where}: {message}", url)
    return InferenceError(f"{where}: {message}", url)


def http_error_text(error: urllib.error.HTTPError) -> str:
    """The server's message from an error reply: plain JSON, or (generate_stream) one server-sent event."""
    try:
        body = error.read().strip()
        if body.startswith(b"data:"):
            body = body[5:].strip()
        return json.loads(body).get("error", str(error))
    except Exception:
        return str(error)
