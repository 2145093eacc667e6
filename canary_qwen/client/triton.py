"""Client for a Canary-Qwen Triton server (the onnx flavour, or any repository with the same interface).

``TritonClient`` sends 16 kHz mono float32 waveforms to the ``canary_qwen`` ensemble (HTTP or gRPC)
and streams text pieces from the decoupled ``canary_qwen_stream`` model (gRPC bidirectional
streaming, or HTTP server-sent events through Triton's generate_stream endpoint). It takes one server
or several (``"a:8001,b:8001"``): requests go round robin to the servers, and a request that got no
answer (server unreachable or gone, busy, model broken, no answer in time) is sent again to the next
one; a stream that had already delivered pieces goes on from where it stopped (greedy decoding gives
every server the same text). ``ServerClient`` is the connection to one server.
``TritonBackend`` wraps it in the ``Transcriber`` interface the benchmark and ``batching`` drive.
``TritonClient.call`` / ``stream_results`` reach any other model of the server (the embeddings mode,
``canary_qwen.client.embeddings``, uses them to talk to the LLM model directly).

Errors each name the server: :class:`ServerUnreachableError`, :class:`ServerBusyError`,
:class:`RequestTimeoutError`, :class:`ModelNotReadyError` (these are retried on another server), and
:class:`InferenceError` (the model's own message, e.g. an audio clip that is empty or too long; never retried).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import TypeVar

import numpy as np

from ..backends.base import Transcription
from ..decoding import token_budgets
from ..errors import CanaryQwenError, UsageError

PROTOCOLS = ("http", "grpc")
DEFAULT_MODEL = "canary_qwen"
DEFAULT_STREAM_MODEL = "canary_qwen_stream"
INSTALL_HINT = "pip install 'tritonclient[all]'  (or: pip install 'canary-qwen[serve]')"
T = TypeVar("T")


class TritonClientError(CanaryQwenError):
    """Base class of the client's errors; ``url`` is the server's address."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url


class ServerUnreachableError(TritonClientError):
    """Nothing answers at the URL (wrong address or port, server not started, or it went away)."""


class ModelNotReadyError(TritonClientError):
    """The server answers but the model is not loaded (not in the repository, or failed to load)."""


class ServerBusyError(TritonClientError):
    """The model's request queue is full or the request waited too long in it (``triton-repo --max-queue``,
    ``--queue-timeout-s``)."""


class RequestTimeoutError(TritonClientError):
    """No answer (or no next streamed piece) within the client's timeout."""


class InferenceError(TritonClientError):
    """The server refused or failed a request; the message is the server's (the model's) own."""


# Errors after which the same request may go to another server: it was not answered.
RETRYABLE = (ServerUnreachableError, ServerBusyError, RequestTimeoutError, ModelNotReadyError)
CHECK_TIMEOUT_S = 10.0  # health and configuration calls: a server that does not answer these is not worth waiting for


def split_url(url: str, protocol: str) -> str:
    """``host:port`` from ``host:port``, ``http://host:port/`` or ``grpc://host:port``."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    address = url.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if address.lower().startswith(scheme):
            if scheme == "https://":
                raise UsageError("https is not supported by this client; use host:port of a plain HTTP endpoint")
            address = address[len(scheme) :]
    address = address.rstrip("/")
    if not address or "/" in address:
        raise UsageError(f"Triton URL must be host:port, got {url!r}")
    return address


def as_samples(audio) -> np.ndarray:
    """One waveform as a contiguous 1-D float32 array; refuses what is not already 16 kHz mono samples."""
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise UsageError(
            f"audio must be one 1-D 16 kHz mono waveform, got shape {list(a.shape)} "
            "(use canary_qwen.audio.to_mono_16k to downmix and resample)"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(
            f"audio must be float samples in [-1, 1], got {a.dtype} (use canary_qwen.audio.to_mono_16k to convert PCM)"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _modules(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        raise ImportError(f"the Triton client needs tritonclient: {INSTALL_HINT}") from e
    return module, InferenceServerException


class ServerClient:
    """The connection to one Triton server (:class:`TritonClient` spreads requests over several of these).
    One object may be used from many threads.

    ``url`` is ``host:port`` of the HTTP endpoint (protocol "http") or the gRPC one ("grpc").
    ``timeout_s`` bounds each request (and each wait for the next streamed piece).
    """

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        *,
        stream_model: str = DEFAULT_STREAM_MODEL,
        timeout_s: float = 120.0,
    ):
        self.protocol = protocol
        self.url = split_url(url, protocol)
        self.model = model
        self.stream_model = stream_model
        self.timeout_s = float(timeout_s)
        self._module, self._server_exception = _modules(protocol)
        self._clients: dict = {}  # thread (None for the shared gRPC client) -> tritonclient object
        self._lock = threading.Lock()
        self._ready: set[str] = set()
        self._decoupled: dict[str, bool] = {}
        self._closed = False
        self._check_timeout = min(self.timeout_s, CHECK_TIMEOUT_S)

    # -- connections -------------------------------------------------------------------------------
    # gRPC: one tritonclient object shared by all threads (gRPC channels are thread-safe).
    # HTTP: one per thread. tritonclient's HTTP client runs on gevent, whose sockets belong to the thread
    # that made them ("Cannot switch to a different thread" otherwise); those of finished threads are closed.
    def _new_client(self):
        if self.protocol == "http":
            # connection_timeout bounds connecting, network_timeout a whole request
            return self._module.InferenceServerClient(
                self.url,
                connection_timeout=min(self.timeout_s, 10.0),
                network_timeout=self.timeout_s,
            )
        return self._module.InferenceServerClient(self.url)

    def _conn(self):
        if self._closed:
            raise TritonClientError("this client is closed", self.url)
        key = None if self.protocol == "grpc" else threading.current_thread()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                for thread in [t for t in self._clients if t is not None and not t.is_alive()]:
                    _close_quietly(self._clients.pop(thread))
                client = self._clients[key] = self._new_client()
            return client

    def _drop(self, client) -> None:
        """Forget a connection that failed (the next request makes a new one)."""
        with self._lock:
            for key in [k for k, c in self._clients.items() if c is client]:
                del self._clients[key]
        _close_quietly(client)

    def close(self) -> None:
        """Close every connection (do this before stopping a server: open HTTP keep-alives delay its exit)."""
        self._closed = True
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            _close_quietly(client)

    def _unreachable(self, error) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"cannot reach the Triton server at {self.url} over {self.protocol} ({error}); "
            "is it running, and is this its " + ("HTTP" if self.protocol == "http" else "gRPC") + " port?",
            self.url,
        )

    def _is_timeout(self, error) -> bool:
        if isinstance(error, TimeoutError) or type(error).__name__ == "Timeout":  # socket / gevent timeouts
            return True
        return isinstance(error, self._server_exception) and "DEADLINE_EXCEEDED" in str(error.status() or "")

    def _is_connection_error(self, error) -> bool:
        if self._is_timeout(error):
            return False
        if isinstance(error, (OSError, ConnectionError)) or _stale_connection(error):
            return True
        if isinstance(error, self._server_exception):
            status = str(error.status() or "")
            return "UNAVAILABLE" in status
        return False

    def _check_kwargs(self) -> dict:
        # gRPC calls wait forever unless given a deadline; the HTTP client's network_timeout covers its calls
        return {"client_timeout": self._check_timeout} if self.protocol == "grpc" else {}

    def check(self, model: str | None = None) -> None:
        """Raise ServerUnreachableError / ModelNotReadyError unless ``model`` (default: this client's) can serve."""
        model = model or self.model
        if model in self._ready:
            return
        client = self._conn()
        try:
            live = client.is_server_live(**self._check_kwargs())
        except Exception as e:
            self._drop(client)
            raise (
                self._timed_out(model, self._check_timeout) if self._is_timeout(e) else self._unreachable(e)
            ) from None
        if not live:
            raise ServerUnreachableError(f"the Triton server at {self.url} is not live (shutting down?)", self.url)
        try:
            ready = client.is_model_ready(model, **self._check_kwargs())
        except Exception as e:
            if self._is_connection_error(e):
                self._drop(client)
                raise self._unreachable(e) from None
            ready = False
        if not ready:
            raise ModelNotReadyError(
                f"model '{model}' is not ready on the Triton server at {self.url}; {self._models_note(client)}",
                self.url,
            )
        self._ready.add(model)

    def _models_note(self, client) -> str:
        try:
            index = client.get_model_repository_index(**self._check_kwargs())
            if self.protocol == "grpc":
                index = [{"name": m.name, "state": m.state, "reason": m.reason} for m in index.models]
        except Exception:
            return "its model list could not be read"
        if not index:
            return "it serves no models"
        parts = []
        for m in index:
            state = m.get("state") or "not loaded"
            reason = f": {m['reason']}" if m.get("reason") else ""
            parts.append(f"{m.get('name')} ({state}{reason})")
        return "it has: " + ", ".join(parts)

    # -- requests ----------------------------------------------------------------------------------
    @staticmethod
    def _arrays(audio, prompt, max_new_tokens) -> dict[str, np.ndarray]:
        arrays = {"AUDIO": as_samples(audio)[None]}
        if prompt is not None:
            arrays["PROMPT"] = np.array([[str(prompt).encode("utf-8")]], dtype=object)
        if max_new_tokens is not None:
            arrays["MAX_NEW_TOKENS"] = np.array([[int(max_new_tokens)]], dtype=np.int32)
        return arrays

    def _infer_inputs(self, arrays: dict[str, np.ndarray]) -> list:
        """InferInputs by name (bf16 arrays are ml_dtypes.bfloat16, as tritonclient >= 2.71 takes them)."""
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in arrays.items():
            array = np.asarray(array)
            inp = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        return inputs

    @staticmethod
    def _parse(result, with_ids: bool) -> tuple[str, list[int]]:
        """(text, ids) from a result object or a dict of arrays."""
        get = result.__getitem__ if isinstance(result, dict) else result.as_numpy
        text = get("TEXT").reshape(-1)[0]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        ids = [int(i) for i in get("OUTPUT_IDS").reshape(-1)] if with_ids else []
        return text, ids

    def call(self, model: str, arrays: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request to any model of the server: input arrays by name (batch dimension included) ->
        the requested outputs by name."""
        inputs = self._infer_inputs(arrays)
        requested = [self._module.InferRequestedOutput(n) for n in outputs]
        self.check(model)
        for attempt in range(2):
            client = self._conn()
            try:
                if self.protocol == "grpc":
                    result = client.infer(model, inputs, outputs=requested, client_timeout=self.timeout_s)
                else:
                    result = client.infer(model, inputs, outputs=requested)
                return {n: result.as_numpy(n) for n in outputs}
            except Exception as e:
                if self._is_connection_error(e):
                    self._drop(client)
                # The server may close a kept-alive HTTP connection between requests, and geventhttpclient does
                # not retry a POST on its own; inference is idempotent, so try once more on a new connection.
                if attempt == 0 and self.protocol == "http" and _stale_connection(e):
                    continue
                raise self._request_error(e, model) from None
        raise AssertionError("unreachable")

    def is_decoupled(self, model: str) -> bool:
        """Whether ``model`` answers a request with a stream of responses (read once from its config)."""
        if model not in self._decoupled:
            policy = self.model_config(model).get("model_transaction_policy", {})
            self._decoupled[model] = bool(policy.get("decoupled", False))
        return self._decoupled[model]

    def infer(
        self, audio, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]:
        """One clip through this client's model: (text, token ids; the ids only ``with_ids``).

        A decoupled model (the trt flavour's ensemble when it streams, or ``canary_qwen_stream``) is read
        to its final response and its TEXT pieces and OUTPUT_IDS joined.
        """
        arrays = self._arrays(audio, prompt, max_new_tokens)
        if self.is_decoupled(self.model):
            return self._joined(self.model, arrays, with_ids)
        outputs = ["TEXT", "OUTPUT_IDS"] if with_ids else ["TEXT"]
        return self._parse(self.call(self.model, arrays, outputs), with_ids)

    def _joined(self, model: str, arrays: dict[str, np.ndarray], with_ids: bool) -> tuple[str, list[int]]:
        pieces: list = []
        ids: list = []
        if self.protocol == "grpc":
            for result in self.stream_results(model, arrays):
                for name, out in (("TEXT", pieces), ("OUTPUT_IDS", ids)):
                    value = result.as_numpy(name)
                    if value is not None and value.size:
                        out.extend(value.reshape(-1).tolist())
        else:
            for event in self._events_http(model, arrays):
                for name, out in (("TEXT", pieces), ("OUTPUT_IDS", ids)):
                    value = event.get(name)
                    if value not in (None, "", []):
                        out.extend(value if isinstance(value, list) else [value])
        text = "".join(p.decode("utf-8", errors="replace") if isinstance(p, bytes) else str(p) for p in pieces)
        return text.strip(), [int(i) for i in ids] if with_ids else []

    def _request_error(self, error, model: str | None = None) -> TritonClientError:
        model = model or self.model
        if self._is_timeout(error):
            return self._timed_out(model)
        message = error.message() if isinstance(error, self._server_exception) else str(error)
        if self._is_connection_error(error) and not _busy(message):
            self._ready.clear()
            return self._unreachable(error)
        if isinstance(error, self._server_exception):
            return self._refused(message, model)
        return TritonClientError(f"request to Triton at {self.url} failed: {error}", self.url)

    def _refused(self, message: str, model: str) -> TritonClientError:
        """The error for a server's error message: busy and broken-model answers are worth another server."""
        if _busy(message):  # gRPC says UNAVAILABLE, HTTP 503: the server is up but its queue is full
            return ServerBusyError(f"Triton at {self.url} ({model}) is busy: {message}; retry later", self.url)
        if "Stub process" in message and "is not healthy" in message:
            # a python model's process died; Triton 2.51 neither restarts it nor reports the model not ready
            self._ready.clear()
            return ModelNotReadyError(f"Triton at {self.url} ({model}) lost a model process: {message}", self.url)
        return InferenceError(f"Triton at {self.url} ({model}): {message}", self.url)

    def _timed_out(self, model: str, seconds: float | None = None) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"no answer from Triton at {self.url} ({model}) within {seconds or self.timeout_s:g} s "
            "(raise the timeout for long clips or a busy server)",
            self.url,
        )

    # -- streaming ---------------------------------------------------------------------------------
    def stream(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int]], None, None]:
        """(text piece, its token ids) as the server produces them; the pieces join to ``transcribe(audio, prompt)``
        and the ids to its token ids."""
        if self.protocol == "grpc":
            return self._stream_grpc(audio, prompt, max_new_tokens)
        return self._stream_http(audio, prompt, max_new_tokens)

    def _stream_grpc(self, audio, prompt, max_new_tokens) -> Generator[tuple[str, list[int]], None, None]:
        for result in self.stream_results(self.stream_model, self._arrays(audio, prompt, max_new_tokens)):
            text, ids = result.as_numpy("TEXT"), result.as_numpy("OUTPUT_IDS")
            piece = text.reshape(-1)[0] if text is not None and text.size else ""
            piece = piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else str(piece)
            yield piece, [] if ids is None else [int(i) for i in ids.reshape(-1)]

    def stream_results(self, model: str, arrays: dict[str, np.ndarray]) -> Generator:
        """One request to a decoupled model over gRPC streaming: its results (tritonclient InferResult) as they come,
        up to the one with the final flag."""
        if self.protocol != "grpc":
            raise TritonClientError(
                f"{model} is decoupled: Triton serves it over gRPC streaming (use protocol grpc)", self.url
            )
        inputs = self._infer_inputs(arrays)
        self.check(model)
        results: queue.Queue = queue.Queue()
        client = self._new_client()  # one bidirectional stream per client object: never share it
        finished = False
        try:
            try:
                client.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=None)
                client.async_stream_infer(model, inputs, enable_empty_final_response=True)
            except Exception as e:
                raise self._request_error(e, model) from None
            while True:
                try:
                    result, error = results.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise self._timed_out(model) from None
                if error is not None:
                    finished = True  # an error response ends the request: nothing left to cancel
                    raise self._request_error(error, model)
                yield result
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    return
        finally:
            try:
                # Cancel only a request still running (the caller stopped reading, or an error): cancelling a
                # finished one can leave the decoupled model unable to unload at shutdown (Triton 2.51, measured).
                client.stop_stream(cancel_requests=not finished)
            except Exception:
                pass
            client.close()

    def model_config(self, model: str) -> dict:
        """The model's configuration as Triton reports it (JSON form, the same for HTTP and gRPC)."""
        self.check(model)
        client = self._conn()
        try:
            if self.protocol == "grpc":
                return client.get_model_config(model, as_json=True, **self._check_kwargs())["config"]
            return client.get_model_config(model)
        except Exception as e:
            raise self._request_error(e, model) from None

    def _stream_http(self, audio, prompt, max_new_tokens) -> Generator[tuple[str, list[int]], None, None]:
        for event in self._events_http(self.stream_model, self._arrays(audio, prompt, max_new_tokens)):
            # a one-element tensor usually comes back as a scalar, a longer one as a list
            piece, ids = event.get("TEXT") or "", event.get("OUTPUT_IDS", [])
            piece = (piece[0] if piece else "") if isinstance(piece, list) else piece
            yield piece, [int(i) for i in (ids if isinstance(ids, list) else [ids])]

    def _events_http(self, model: str, arrays: dict[str, np.ndarray]) -> Iterator[dict]:
        """One request to a decoupled model through Triton's generate_stream extension: JSON fields become
        inputs (a list gets the batch dimension added); each response comes back as one server-sent event."""
        body = {}
        for name, array in arrays.items():  # one clip: drop the batch dimension
            value = np.asarray(array)[0]
            if value.dtype == object:
                value = value.reshape(-1)[0]
                body[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            else:
                body[name] = value.reshape(-1)[0].item() if value.size == 1 and name != "AUDIO" else value.tolist()
        self.check(model)
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{model}/generate_stream",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise self._refused(_http_error_text(e), model) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise (self._timed_out(model) if isinstance(reason, TimeoutError) else self._unreachable(reason)) from None
        with response:
            while True:
                try:
                    line = response.readline()  # the timeout bounds each wait for the next event
                except TimeoutError:
                    raise self._timed_out(model) from None
                except OSError as e:
                    raise self._unreachable(e) from None
                if not line:
                    # generate_stream ends alike when the model sent its final response and when the server died
                    # mid-stream (tests/test_triton_resilience.py): the text is whole only if the server still answers
                    self._ready.discard(model)
                    self.check(model)
                    return
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:].strip())
                if "error" in event:
                    raise self._refused(event["error"], model)
                yield event


def _busy(message: str) -> bool:
    """A model's queue is full, or the request waited in it longer than the repository allows."""
    return "Exceeds maximum queue size" in message or "Request timeout expired" in message


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:
        pass


def _stale_connection(error) -> bool:
    return isinstance(error, (ConnectionResetError, BrokenPipeError)) or type(error).__name__ == "HTTPConnectionClosed"


def _http_error_text(error: urllib.error.HTTPError) -> str:
    """The server's message from an error reply: plain JSON, or (generate_stream) one server-sent event."""
    try:
        body = error.read().strip()
        if body.startswith(b"data:"):
            body = body[5:].strip()
        return json.loads(body).get("error", str(error))
    except Exception:
        return str(error)


class _Rotation:
    """The order to try servers in: round robin, servers that just failed last (for ``DOWN_S`` seconds)."""

    DOWN_S = 5.0

    def __init__(self, n: int):
        self._next = itertools.count()
        self._down_until = [0.0] * n
        self._lock = threading.Lock()

    def order(self) -> list[int]:
        n = len(self._down_until)
        with self._lock:
            start = next(self._next) % n
        ring = [(start + k) % n for k in range(n)]
        now = time.monotonic()
        return [i for i in ring if self._down_until[i] <= now] + [i for i in ring if self._down_until[i] > now]

    def failed(self, i: int) -> None:
        self._down_until[i] = time.monotonic() + self.DOWN_S

    def answered(self, i: int) -> None:
        self._down_until[i] = 0.0


class TritonClient:
    """Transcribe through one Triton server or several. One object may be used from many threads.

    ``url``: ``host:port`` of the HTTP endpoints (protocol "http") or gRPC ones ("grpc"), several as a list or
    comma-separated. Each request goes to the next server in turn; one that gets no answer (see ``RETRYABLE``)
    is sent to the others before its error is raised. ``timeout_s`` bounds each request (and each wait for the
    next streamed piece) on each server.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        *,
        stream_model: str = DEFAULT_STREAM_MODEL,
        timeout_s: float = 120.0,
    ):
        urls = [u for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
        if not urls:
            raise UsageError(f"no Triton URL given ({url!r})")
        self.servers = [ServerClient(u, protocol, model, stream_model=stream_model, timeout_s=timeout_s) for u in urls]
        self.protocol, self.model, self.stream_model = protocol, model, stream_model
        self.timeout_s = float(timeout_s)
        self.url = ",".join(s.url for s in self.servers)
        self._rotation = _Rotation(len(self.servers))

    def _first_answer(self, request: Callable[[ServerClient], T]) -> T:
        """``request`` on the servers in turn until one answers; the last server's error if none does."""
        error: TritonClientError | None = None
        for i in self._rotation.order():
            try:
                result = request(self.servers[i])
            except RETRYABLE as e:
                self._rotation.failed(i)
                error = e
                continue
            self._rotation.answered(i)
            return result
        assert error is not None
        raise error

    def check(self, model: str | None = None) -> None:
        """Raise ServerUnreachableError / ModelNotReadyError unless some server can serve ``model`` (default: this
        client's)."""
        self._first_answer(lambda s: s.check(model))

    def call(self, model: str, arrays: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request to any model of the servers: input arrays by name (batch dimension included) ->
        the requested outputs by name."""
        return self._first_answer(lambda s: s.call(model, arrays, outputs))

    def is_decoupled(self, model: str) -> bool:
        """Whether ``model`` answers a request with a stream of responses (read once from its config)."""
        return self._first_answer(lambda s: s.is_decoupled(model))

    def model_config(self, model: str) -> dict:
        """The model's configuration as Triton reports it (JSON form, the same for HTTP and gRPC)."""
        return self._first_answer(lambda s: s.model_config(model))

    def infer(
        self, audio, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]:
        """One clip through this client's model: (text, token ids; the ids only ``with_ids``)."""
        return self._first_answer(lambda s: s.infer(audio, prompt, max_new_tokens=max_new_tokens, with_ids=with_ids))

    def infer_many(
        self, audios, prompt: str | None = None, *, max_new_tokens=None, with_ids: bool = False, concurrency: int = 8
    ) -> list:
        """``infer`` for many clips, up to ``concurrency`` requests in flight (the servers batch them).

        ``max_new_tokens``: None, one budget, or one per clip. Returns, in order, (text, ids) or the
        exception of that clip.
        """
        if concurrency < 1:
            raise UsageError("concurrency must be >= 1")
        n = len(audios)
        budgets = [None] * n if max_new_tokens is None else token_budgets(max_new_tokens, n)

        def one(i):
            try:
                return self.infer(audios[i], prompt, max_new_tokens=budgets[i], with_ids=with_ids)
            except Exception as e:
                return e

        with ThreadPoolExecutor(max(1, min(concurrency, n)), thread_name_prefix="triton-client") as pool:
            return list(pool.map(one, range(n)))

    def transcribe(self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None) -> str:
        """Text of one 16 kHz mono float32 clip (``prompt``: the user turn; None: the model's default)."""
        return self.infer(audio, prompt, max_new_tokens=max_new_tokens)[0]

    def transcribe_many(
        self,
        audios: Sequence[np.ndarray],
        prompt: str | None = None,
        *,
        concurrency: int = 8,
        max_new_tokens: int | None = None,
        return_exceptions: bool = False,
    ) -> list:
        """Texts of many clips, in order, with up to ``concurrency`` requests in flight (the servers batch them).

        With ``return_exceptions`` a failed clip's entry is its exception instead of raising the first one.
        """
        out = []
        for r in self.infer_many(audios, prompt, max_new_tokens=max_new_tokens, concurrency=concurrency):
            if isinstance(r, Exception):
                if not return_exceptions:
                    raise r
                out.append(r)
            else:
                out.append(r[0])
        return out

    def stream(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """Text pieces as the server produces them; joined they equal ``transcribe(audio, prompt)``."""
        with closing(self.stream_with_ids(audio, prompt, max_new_tokens=max_new_tokens)) as pieces:
            for piece, _ in pieces:
                if piece:
                    yield piece

    def stream_with_ids(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int]], None, None]:
        """(text piece, token ids) as the server produces them; joined they equal ``infer(audio, prompt,
        with_ids=True)``.

        If the server goes away mid-stream, the clip is sent to the next server and its text and ids go on from
        where those already delivered end (a server whose text does not continue them is an error).
        """
        delivered, delivered_ids = "", 0
        error: TritonClientError | None = None
        for i in self._rotation.order():
            text, seen_ids = "", 0
            try:
                with closing(self.servers[i].stream(audio, prompt, max_new_tokens=max_new_tokens)) as pieces:
                    for piece, ids in pieces:
                        text += piece
                        fresh_ids = ids[max(0, delivered_ids - seen_ids) :]  # greedy: the same ids on every server
                        seen_ids += len(ids)
                        fresh = ""
                        if len(text) > len(delivered):
                            if not text.startswith(delivered):
                                break
                            fresh, delivered = text[len(delivered) :], text
                        if fresh or fresh_ids:
                            delivered_ids += len(fresh_ids)
                            yield fresh, fresh_ids
                if text.startswith(delivered):
                    self._rotation.answered(i)
                    return
                raise TritonClientError(
                    f"Triton at {self.servers[i].url} streamed a different text than the server before it "
                    "(are they serving the same model?)",
                    self.servers[i].url,
                )
            except RETRYABLE as e:
                self._rotation.failed(i)
                error = e
        assert error is not None
        raise error

    def stream_results(self, model: str, arrays: dict[str, np.ndarray]) -> Iterator:
        """One request to a decoupled model over gRPC streaming: its results (tritonclient InferResult) as they
        come, up to the one with the final flag. Sent to another server only while nothing came back."""
        error: TritonClientError | None = None
        for i in self._rotation.order():
            received = False
            try:
                with closing(self.servers[i].stream_results(model, arrays)) as results:
                    for result in results:
                        received = True
                        yield result
                self._rotation.answered(i)
                return
            except RETRYABLE as e:
                self._rotation.failed(i)
                if received:
                    raise
                error = e
        assert error is not None
        raise error

    def close(self) -> None:
        """Close every connection (do this before stopping a server: open HTTP keep-alives delay its exit)."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TritonBackend:
    """The ``Transcriber`` interface over a Triton server, so ``batching`` and the benchmark can drive it.

    Each call sends its clips as concurrent single-clip requests (up to ``concurrency``); the
    server's dynamic batchers put them together. ``token_ids`` come from the ensemble's OUTPUT_IDS.
    The server is checked at construction: an unreachable server or a missing model fails here.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        *,
        concurrency: int = 8,
        timeout_s: float = 300.0,
    ):
        self.client = TritonClient(url, protocol, model, timeout_s=timeout_s)
        self.concurrency = concurrency
        self.device = f"triton {protocol}://{self.client.url}"
        try:
            self.client.check()
        except BaseException:
            self.client.close()
            raise

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        *,
        prompt: str | None = None,
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> list[Transcription]:
        """``max_new_tokens`` None: the server's configured budget."""
        if not len(audios):
            return []
        budgets = None if max_new_tokens is None else token_budgets(max_new_tokens, len(audios))
        results = self.client.infer_many(
            list(audios), prompt, max_new_tokens=budgets, with_ids=True, concurrency=self.concurrency
        )
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [Transcription(text=text, token_ids=ids) for text, ids in results]

    def close(self) -> None:
        self.client.close()
