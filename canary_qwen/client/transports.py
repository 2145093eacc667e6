"""The two ways to reach a Triton server, behind ``ServerClient``: gRPC (one channel for every thread; decoupled
models over bidirectional streaming) and HTTP (a connection per thread; decoupled models through Triton's
generate_stream server-sent events)."""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator, Sequence

import numpy as np

from .errors import answer_error, http_error_text
from .server import ServerClient
from .wire import event_body, event_outputs


class GrpcServer(ServerClient):
    protocol = "grpc"

    def _new_client(self):
        return self._module.InferenceServerClient(self.url)

    def _connection_key(self):
        return None  # gRPC channels are thread-safe: one for all threads

    def _check_kwargs(self) -> dict:
        return {"client_timeout": self._check_timeout}  # gRPC calls wait forever unless given a deadline

    def _infer(self, client, model: str, inputs: list, outputs: Sequence[str]):
        requested = [self._module.InferRequestedOutput(n) for n in outputs]
        return client.infer(model, inputs, outputs=requested, client_timeout=self.timeout_s)

    def _config(self, client, model: str) -> dict:
        return client.get_model_config(model, as_json=True, **self._check_kwargs())["config"]

    def _repository_index(self, client) -> list[dict]:
        index = client.get_model_repository_index(**self._check_kwargs())
        return [{"name": m.name, "state": m.state, "reason": m.reason} for m in index.models]

    def _responses(self, model: str, arrays: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for result in self.stream_results(model, arrays):
            outputs = result.get_response().outputs
            yield {o.name: result.as_numpy(o.name) for o in outputs}

    def stream_results(self, model: str, arrays: dict[str, np.ndarray]) -> Generator:
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


class HttpServer(ServerClient):
    protocol = "http"
    retries_stale_connections = True  # geventhttpclient does not retry a POST on a connection the server closed

    def _new_client(self):
        # connection_timeout bounds connecting, network_timeout a whole request
        return self._module.InferenceServerClient(
            self.url, connection_timeout=min(self.timeout_s, 10.0), network_timeout=self.timeout_s
        )

    def _connection_key(self):
        # tritonclient's HTTP client runs on gevent, whose sockets belong to the thread that made them ("Cannot
        # switch to a different thread" otherwise); those of finished threads are closed
        return threading.current_thread()

    def _check_kwargs(self) -> dict:
        return {}  # network_timeout covers these calls

    def _infer(self, client, model: str, inputs: list, outputs: Sequence[str]):
        return client.infer(model, inputs, outputs=[self._module.InferRequestedOutput(n) for n in outputs])

    def _config(self, client, model: str) -> dict:
        return client.get_model_config(model)

    def _repository_index(self, client) -> list[dict]:
        return client.get_model_repository_index()

    def _responses(self, model: str, arrays: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Through Triton's generate_stream extension: each response comes back as one server-sent event."""
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{model}/generate_stream",
            data=event_body(arrays),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise self._answered(answer_error(http_error_text(e), self.url, model)) from None
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
                    raise self._answered(answer_error(event["error"], self.url, model))
                yield event_outputs(event)


def server_client(url: str, protocol: str = "http", *args, **kwargs) -> ServerClient:
    """The connection to one server over ``protocol`` ("http" or "grpc")."""
    from .wire import split_url

    split_url(url, protocol)  # refuses an unknown protocol with the known ones
    return (GrpcServer if protocol == "grpc" else HttpServer)(url, *args, **kwargs)
