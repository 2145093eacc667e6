"""Client for a Canary-Qwen Triton server (the onnx flavour, or any repository with the same interface).

``TritonClient`` sends 16 kHz mono float32 waveforms to the ``canary_qwen`` ensemble (HTTP or gRPC) and streams
text pieces from the decoupled ``canary_qwen_stream`` model (gRPC bidirectional streaming, or HTTP server-sent
events through Triton's generate_stream endpoint). It takes one server or several (``"a:8001,b:8001"``): requests go
round robin to the servers, and a request that got no answer (server unreachable or gone, busy, model broken, no
answer in time) is sent again to the next one; a stream that had already delivered pieces goes on from where it
stopped (greedy decoding gives every server the same text). ``TritonClient.call`` / ``stream_results`` reach any
other model of the server (the embeddings mode, ``canary_qwen.client.embeddings``, uses them to talk to the LLM
model directly).

The pieces, one job each: ``wire`` (addresses, request tensors, answers), ``errors`` (the errors, and the only
code that reads Triton's wording), ``server`` and ``transports`` (one server over gRPC or HTTP), ``failover`` (the
order of servers, and going on at the next), ``backend`` (the ``Transcriber`` adapter).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..decoding import token_budgets
from ..errors import UsageError
from .failover import Failover, Resume, TextResume
from .transports import server_client
from .wire import DEFAULT_MODEL, DEFAULT_STREAM_MODEL


class TritonClient:
    """Transcribe through one Triton server or several. One object may be used from many threads.

    ``url``: ``host:port`` of the HTTP endpoints (protocol "http") or gRPC ones ("grpc"), several as a list or
    comma-separated. Each request goes to the next server in turn; one that gets no answer (``errors.RETRYABLE``)
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
        self.servers = [server_client(u, protocol, model, stream_model=stream_model, timeout_s=timeout_s) for u in urls]
        self.protocol, self.model, self.stream_model = protocol, model, stream_model
        self.timeout_s = float(timeout_s)
        self.url = ",".join(s.url for s in self.servers)
        self._failover = Failover(self.servers)

    def check(self, model: str | None = None) -> None:
        """Raise ServerUnreachableError / ModelNotReadyError unless some server can serve ``model`` (default: this
        client's)."""
        self._failover.first_answer(lambda s: s.check(model))

    def call(self, model: str, arrays: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One request to any model of the servers: input arrays by name (batch dimension included) -> the
        requested outputs by name."""
        return self._failover.first_answer(lambda s: s.call(model, arrays, outputs))

    def is_decoupled(self, model: str) -> bool:
        """Whether ``model`` answers a request with a stream of responses (read once from its config)."""
        return self._failover.first_answer(lambda s: s.is_decoupled(model))

    def model_config(self, model: str) -> dict:
        """The model's configuration as Triton reports it (JSON form, the same for HTTP and gRPC)."""
        return self._failover.first_answer(lambda s: s.model_config(model))

    def infer(
        self, audio, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]:
        """One clip through this client's model: (text, token ids; the ids only ``with_ids``)."""
        return self._failover.first_answer(
            lambda s: s.infer(audio, prompt, max_new_tokens=max_new_tokens, with_ids=with_ids)
        )

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

    def stream_with_ids(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int]], None, None]:
        """(text piece, token ids) as the server produces them; joined they equal ``infer(audio, prompt,
        with_ids=True)``. If the server goes away mid-stream, the clip is sent to the next server and its text and ids
        go on from where those already delivered end (a server whose text does not continue them is an error)."""
        return self._failover.stream(lambda s: s.stream(audio, prompt, max_new_tokens=max_new_tokens), TextResume())

    def stream(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Iterator[str]:
        """Text pieces as the server produces them; joined they equal ``transcribe(audio, prompt)``."""
        pieces = self.stream_with_ids(audio, prompt, max_new_tokens=max_new_tokens)
        try:
            for piece, _ in pieces:
                if piece:
                    yield piece
        finally:
            pieces.close()

    def ask(self, turns, *, max_new_tokens: int | None = None) -> tuple[str, list[int], int | None]:
        """LLM mode (the torch-fast and vllm flavours): the answer to a text-only dialogue (``model.prompt.Turn``s
        ending with a user turn), the speech LoRA off: (text, token ids, the dialogue's tokens as the server
        counted them)."""
        return self._failover.first_answer(lambda s: s.ask(turns, max_new_tokens=max_new_tokens))

    def ask_stream(
        self, turns, *, max_new_tokens: int | None = None
    ) -> Generator[tuple[str, list[int], int | None], None, None]:
        """LLM mode: (text piece, token ids, the dialogue's tokens) of the answer as the server produces them; joined
        they equal ``ask``. A stream cut off mid-way goes on at the next server, as ``stream_with_ids`` does."""
        return self._failover.stream(lambda s: s.ask_stream(turns, max_new_tokens=max_new_tokens), TextResume())

    def stream_results(self, model: str, arrays: dict[str, np.ndarray]) -> Generator:
        """One request to a decoupled model over gRPC streaming: its results (tritonclient InferResult) as they
        come, up to the one with the final flag. Sent to another server only while nothing came back."""
        return self._failover.stream(lambda s: s.stream_results(model, arrays), Resume())

    def close(self) -> None:
        """Close every connection (do this before stopping a server: open HTTP keep-alives delay its exit)."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
