"""The connection to one Triton server: what both protocols share (readiness, requests, joining a decoupled
model's responses, errors), over the transport each protocol implements (``transports.py``)."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np

from .errors import (
    ModelNotReadyError,
    RequestTimeoutError,
    ServerBusyError,
    ServerUnreachableError,
    TritonClientError,
    answer_error,
)
from .wire import (
    DEFAULT_MODEL,
    DEFAULT_STREAM_MODEL,
    dialogue_arrays,
    prompt_tokens,
    request_arrays,
    split_url,
    text_and_ids,
)

INSTALL_HINT = "pip install 'tritonclient[all]'  (or: pip install 'canary-qwen[serve]')"
CHECK_TIMEOUT_S = 10.0  # health and configuration calls: a server that does not answer these is not worth waiting for


class ServerClient:
    """The connection to one Triton server (``TritonClient`` spreads requests over several of these). One object may
    be used from many threads. ``timeout_s`` bounds each request (and each wait for the next streamed piece).

    A transport (``GrpcServer``, ``HttpServer``) supplies ``protocol`` (tritonclient's module of that name is
    ``_module``), ``_new_client``, ``_connection_key``, ``_check_kwargs``, ``_infer``, ``_responses`` and ``_config``."""

    protocol: str
    _module: Any  # tritonclient.grpc or tritonclient.http
    retries_stale_connections = False  # whether a request goes once more on a new connection after a stale one

    def __init__(
        self,
        url: str,
        model: str = DEFAULT_MODEL,
        *,
        stream_model: str = DEFAULT_STREAM_MODEL,
        timeout_s: float = 120.0,
    ):
        try:
            self._module = importlib.import_module(f"tritonclient.{self.protocol}")
            from tritonclient.utils import InferenceServerException
        except ImportError as e:
            raise ImportError(f"the Triton client needs tritonclient: {INSTALL_HINT}") from e
        self._server_exception = InferenceServerException
        self.url = split_url(url, self.protocol)
        self.model, self.stream_model = model, stream_model
        self.timeout_s = float(timeout_s)
        self._clients: dict = {}  # _connection_key() -> tritonclient object
        self._lock = threading.Lock()
        self._ready: set[str] = set()
        self._decoupled: dict[str, bool] = {}
        self._closed = False
        self._check_timeout = min(self.timeout_s, CHECK_TIMEOUT_S)

    # -- the transport's part ----------------------------------------------------------------------------
    def _new_client(self):
        raise NotImplementedError

    def _connection_key(self):
        raise NotImplementedError

    def _check_kwargs(self) -> dict:
        raise NotImplementedError

    def _infer(self, client, model: str, inputs: list, outputs: Sequence[str]):
        raise NotImplementedError

    def _responses(self, model: str, arrays: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """One request to a decoupled model: each response's outputs by name, up to the final one."""
        raise NotImplementedError

    def _config(self, client, model: str) -> dict:
        raise NotImplementedError

    def stream_results(self, model: str, arrays: dict[str, np.ndarray]) -> Generator:
        """One request to a decoupled model: its results (tritonclient InferResult) as they come, up to the final
        one. gRPC streaming only."""
        raise TritonClientError(
            f"{model} is decoupled: Triton serves it over gRPC streaming (use protocol grpc)", self.url
        )

    def _repository_index(self, client) -> list[dict]:
        raise NotImplementedError

    # -- connections -------------------------------------------------------------------------------
    def _conn(self):
        if self._closed:
            raise TritonClientError("this client is closed", self.url)
        key = self._connection_key()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                for thread in [t for t in self._clients if isinstance(t, threading.Thread) and not t.is_alive()]:
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

    # -- errors ------------------------------------------------------------------------------------
    def _unreachable(self, error) -> ServerUnreachableError:
        return ServerUnreachableError(
            f"cannot reach the Triton server at {self.url} over {self.protocol} ({error}); "
            "is it running, and is this its " + ("HTTP" if self.protocol == "http" else "gRPC") + " port?",
            self.url,
        )

    def _timed_out(self, model: str, seconds: float | None = None) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"no answer from Triton at {self.url} ({model}) within {seconds or self.timeout_s:g} s "
            "(raise the timeout for long clips or a busy server)",
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
            return "UNAVAILABLE" in str(error.status() or "")
        return False

    def _request_error(self, error, model: str | None = None) -> TritonClientError:
        model = model or self.model
        if self._is_timeout(error):
            return self._timed_out(model)
        message = error.message() if isinstance(error, self._server_exception) else str(error)
        answered = answer_error(message, self.url, model)
        # gRPC says UNAVAILABLE both for a server gone and for a full queue: a busy server is up
        if self._is_connection_error(error) and not isinstance(answered, ServerBusyError):
            self._ready.clear()
            return self._unreachable(error)
        if isinstance(error, self._server_exception):
            return self._answered(answered)
        return TritonClientError(f"request to Triton at {self.url} failed: {error}", self.url)

    def _answered(self, error: TritonClientError) -> TritonClientError:
        """A server's error answer; one saying a model process died makes its readiness be asked again."""
        if isinstance(error, ModelNotReadyError):
            self._ready.clear()
        return error

    # -- readiness ---------------------------------------------------------------------------------
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
            index = self._repository_index(client)
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

    def model_config(self, model: str) -> dict:
        """The model's configuration as Triton reports it (JSON form, the same for HTTP and gRPC)."""
        self.check(model)
        client = self._conn()
        try:
            return self._config(client, model)
        except Exception as e:
            raise self._request_error(e, model) from None

    def is_decoupled(self, model: str) -> bool:
        """Whether ``model`` answers a request with a stream of responses (read once from its config)."""
        if model not in self._decoupled:
            policy = self.model_config(model).get("model_transaction_policy", {})
            self._decoupled[model] = bool(policy.get("decoupled", False))
        return self._decoupled[model]

    # -- requests ----------------------------------------------------------------------------------
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

    def call(self, model: str, arrays: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request to any model of the server: input arrays by name (batch dimension included) -> the requested
        outputs by name."""
        inputs = self._infer_inputs(arrays)
        self.check(model)
        for attempt in range(2):
            client = self._conn()
            try:
                result = self._infer(client, model, inputs, outputs)
            except Exception as e:
                if self._is_connection_error(e):
                    self._drop(client)
                # a server may close a kept-alive connection between requests; inference is idempotent
                if attempt == 0 and self.retries_stale_connections and _stale_connection(e):
                    continue
                raise self._request_error(e, model) from None
            return {n: result.as_numpy(n) for n in outputs}
        raise AssertionError("unreachable")

    def infer(
        self, audio, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]:
        """One clip through this client's model: (text, token ids; the ids only ``with_ids``). A decoupled model (the
        engine flavours' ensemble, ``canary_qwen_stream``) is read to its final response, its pieces joined."""
        return self._answer(request_arrays(audio, prompt, max_new_tokens), with_ids)

    def ask(self, turns, *, max_new_tokens: int | None = None) -> tuple[str, list[int], int | None]:
        """LLM mode (the engine flavours): a text-only dialogue's answer, (text, token ids, the dialogue's tokens),
        read from the stream model (which alone sends the dialogue's length)."""
        text, ids, count = "", list[int](), None
        for piece, piece_ids, tokens in self.ask_stream(turns, max_new_tokens=max_new_tokens):
            text, ids, count = text + piece, ids + piece_ids, tokens
        return text.strip(), ids, count

    def ask_stream(
        self, turns, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int], int | None], None, None]:
        """LLM mode: the answer's (text piece, token ids, the dialogue's tokens) from the stream model, as they come."""
        self.check(self.stream_model)
        for outputs in self._responses(self.stream_model, dialogue_arrays(turns, max_new_tokens)):
            yield (*text_and_ids(outputs), prompt_tokens(outputs))

    def _answer(self, arrays: dict[str, np.ndarray], with_ids: bool) -> tuple[str, list[int]]:
        if self.is_decoupled(self.model):
            text, ids = "", list[int]()
            for piece, piece_ids in self.pieces(self.model, arrays):
                text, ids = text + piece, ids + piece_ids
            text = text.strip()
        else:
            text, ids = text_and_ids(self.call(self.model, arrays, ["TEXT", "OUTPUT_IDS"] if with_ids else ["TEXT"]))
        return text, ids if with_ids else []

    def pieces(self, model: str, arrays: dict[str, np.ndarray]) -> Generator[tuple[str, list[int]], None, None]:
        """A decoupled model's (TEXT piece, OUTPUT_IDS) responses, up to the final one."""
        self.check(model)
        for outputs in self._responses(model, arrays):
            yield text_and_ids(outputs)

    def stream(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int]], None, None]:
        """(text piece, its token ids) as the stream model produces them; the pieces join to ``infer(audio,
        prompt)``'s text and the ids to its ids."""
        return self.pieces(self.stream_model, request_arrays(audio, prompt, max_new_tokens))


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:
        pass


def _stale_connection(error) -> bool:
    return isinstance(error, (ConnectionResetError, BrokenPipeError)) or type(error).__name__ == "HTTPConnectionClosed"
