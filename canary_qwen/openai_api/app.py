"""The OpenAI-compatible speech-to-text server's handlers, on Starlette (served by uvicorn).

``POST /v1/audio/transcriptions`` reads the multipart upload as it streams in (``upload``), checks the fields
(``protocol``), decodes the audio, cuts it into the windows ``canary-qwen transcribe`` uses, has the upstream
decode every window (concurrently; the upstream batches them with the other requests in flight) and renders the
joined text (``formats``), or streams it as server-sent events. ``POST /v1/chat/completions`` answers in LLM mode
(``chat``); ``GET /v1/realtime`` runs live transcription sessions (``realtime``). ``GET /v1/models``, ``GET /health`` (200 only while the upstream can answer), ``GET /metrics``
(Prometheus).

At most ``bounds.max_queue`` requests are handled at once; one more is refused at once (429 with ``Retry-After``).
Every error is answered in OpenAI's shape (``errors``) and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from ..backends.base import Transcription
from ..bounds import RequestBounds
from ..defaults import SAMPLE_RATE
from ..errors import AudioError, InputError
from ..pipeline.audio import load_audio
from ..pipeline.windowing import WindowPlan, split_points
from .chat import ChatCompletions
from .errors import RETRY_AFTER_S, api_error
from .formats import compression_ratio, render
from .http import EventStream, error_response, first_item, gather_all, once, sse, until_disconnect
from .metrics import CLIENT_CLOSED, Metrics
from .protocol import SERVER_ERROR, APIError, Segment, Transcript, TranscriptionRequest, invalid, model_card
from .protocol import delta_event as _delta
from .protocol import done_event as _done
from .realtime import Realtime
from .service import ServerSettings
from .upload import FILE_FIELD, read_upload
from .upstream import Upstream

log = logging.getLogger(__name__)


class OpenAIServer:
    """The app (``.app``) around one upstream (Triton servers or a local engine). ``settings`` holds every limit."""

    def __init__(self, upstream: Upstream, settings: ServerSettings | None = None):
        self.upstream = upstream
        self.settings = settings or ServerSettings()
        self.metrics = Metrics(pending=upstream.pending, counts=upstream.counts)
        self.created = int(time.time())
        self._in_flight = 0
        self._decoder = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="openai-audio")
        self.app = Starlette(
            routes=[
                Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
                Route("/v1/chat/completions", ChatCompletions(self), methods=["POST"]),
                WebSocketRoute("/v1/realtime", Realtime(self)),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._bug},
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app) -> AsyncIterator[None]:
        await self.upstream.start()
        try:
            yield
        finally:
            self.upstream.close()
            self._decoder.shutdown(wait=False, cancel_futures=True)

    # -- small endpoints --------------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, code=code))

    async def _bug(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(api_error(exc))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(self.settings.served_model, self.created)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.settings.served_model:
            error = APIError(
                404, f"The model '{name}' does not exist on this server", param="model", code="model_not_found"
            )
            return error_response(error)
        return JSONResponse(model_card(name, self.created))

    async def health(self, request: Request) -> Response:
        ready, why = await self.upstream.ready()
        body = {"status": "ready" if ready else "unavailable", "detail": why, "model": self.settings.served_model}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    # -- transcriptions -------------------------------------------------------------------------------
    def take_slot(self) -> APIError | None:
        """Count one more request in flight, or the 429 that refuses it (``bounds.max_queue`` are in flight)."""
        if self._in_flight >= self.settings.bounds.max_queue:
            error = APIError(
                429,
                f"this server already handles {self._in_flight} requests (its limit, --max-in-flight): retry shortly",
                type="rate_limit_error",
                code="too_many_requests",
                retry_after_s=RETRY_AFTER_S,
            )
            self.metrics.answered(error.status)
            return error
        self._in_flight += 1
        self.metrics.in_flight.inc()
        return None

    async def transcriptions(self, request: Request) -> Response:
        start = time.perf_counter()
        refused = self.take_slot()
        if refused is not None:
            return error_response(refused)
        handed_over = False  # a stream releases its slot when it ends
        try:
            request_, samples = await self._read(request)
            windows, spans = self._windows(samples)
            audio_s = len(samples) / SAMPLE_RATE
            budget = self._budget(request_)
            if request_.stream:
                response = await self._stream(request, request_, windows, budget, start, audio_s)
                handed_over = True
                return response
            transcript = await until_disconnect(request, self._transcript(request_.prompt, windows, spans, budget))
            body, media_type = render(transcript, request_.response_format)
            self.metrics.answered(200, seconds=time.perf_counter() - start, audio_s=audio_s)
            return Response(body, media_type=media_type)
        except ClientDisconnect:
            self.metrics.answered(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            error = api_error(e)
            if error.status >= 500 and error.code == "internal_error":
                log.exception("transcription failed")
            self.metrics.answered(error.status)
            return error_response(error)
        finally:
            if not handed_over:
                self.release()

    def release(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.dec()

    async def _read(self, request: Request) -> tuple[TranscriptionRequest, np.ndarray]:
        """The checked fields and the audio (16 kHz mono float32), or an APIError saying what is wrong."""
        s = self.settings
        upload = await read_upload(request.headers, request.stream(), max_bytes=s.max_upload_bytes, tmp_dir=s.tmp_dir)
        try:
            fields = TranscriptionRequest.from_form(upload.fields, s.served_model)
            self._budget(fields)  # a field out of range is refused before the audio is decoded
            if upload.path is None:
                raise invalid("'file' is required: the audio, as a multipart file part", FILE_FIELD, "missing")
            if upload.size == 0:
                raise invalid(f"the uploaded file '{upload.filename}' is empty (0 bytes)", FILE_FIELD, "empty_file")
            ready, why = await self.upstream.ready()
            if not ready:
                raise APIError(503, why, type=SERVER_ERROR, code="backend_unavailable", retry_after_s=RETRY_AFTER_S)
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(self._decoder, _decode, upload.path, upload.filename, s.bounds)
        finally:
            upload.close()
        return fields, samples

    async def samples_of(self, data: bytes, name: str) -> np.ndarray:
        """Audio bytes (a chat message's ``input_audio`` part) as 16 kHz mono float32, or a 400 saying what is wrong."""
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder, _decode_bytes, data, name, self.settings.bounds, self.settings.tmp_dir
        )

    def _windows(self, samples: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The windows ``canary-qwen transcribe`` cuts (pipeline.windowing) and their sample spans."""
        window = self.settings.max_window_s
        spans = [(0, len(samples))] if not window else split_points(samples, window)
        return [samples[a:b] for a, b in spans], spans

    def _budget(self, request: TranscriptionRequest) -> int:
        try:
            return self.settings.bounds.budget(request.max_new_tokens)
        except InputError as e:
            raise invalid(str(e), "max_new_tokens") from None

    async def transcript_of(self, samples: np.ndarray, budget: int, prompt: str | None = None) -> str:
        """The text ``canary-qwen transcribe`` gives for ``samples`` (windowed, ``budget`` tokens each)."""
        windows, spans = self._windows(samples)
        return (await self._transcript(prompt, windows, spans, budget)).text

    async def _transcript(
        self, prompt: str | None, windows: list[np.ndarray], spans: list[tuple[int, int]], budget: int
    ) -> Transcript:
        audio_s = spans[-1][1] / SAMPLE_RATE
        results = await gather_all(self.upstream.transcribe(w, prompt, budget) for w in windows)
        # The text is joined exactly as `canary-qwen transcribe` joins its windows' texts.
        joined = WindowPlan(windows, [0] * len(windows)).join(results, 1)[0]
        assert isinstance(joined, Transcription)
        segments = [
            Segment(
                id=i,
                seek=a // (SAMPLE_RATE // 100),
                start=round(a / SAMPLE_RATE, 3),
                end=round(b / SAMPLE_RATE, 3),
                text=r.text,
                tokens=list(r.token_ids),
                compression_ratio=compression_ratio(r.text),
            )
            for i, ((a, b), r) in enumerate(zip(spans, results))
        ]
        return Transcript(text=joined.text, duration_s=audio_s, segments=segments)

    async def _pieces(self, request: TranscriptionRequest, windows: list[np.ndarray], budget: int):
        """The whole text in pieces: each window's, a space before a window's first piece when text came before
        (so the pieces join to the non-streamed text)."""
        sent = False
        for w in windows:
            first = True
            async with aclosing(self.upstream.stream(w, request.prompt, budget)) as stream:
                async for piece in stream:
                    if not piece:
                        continue
                    if first and sent:
                        piece = " " + piece
                    first, sent = False, True
                    yield piece

    async def _stream(
        self,
        request: Request,
        fields: TranscriptionRequest,
        windows: list[np.ndarray],
        budget: int,
        start: float,
        audio_s: float,
    ) -> Response:
        """Server-sent events. The first piece is awaited before the answer starts, so an upstream that cannot
        answer (Triton down, engine refusing) still gets its HTTP status; a later error is sent as an error event.
        The stream ends with the done event; a client that leaves stops the decoding."""
        pieces = self._pieces(fields, windows, budget)
        first = await first_item(request, pieces)

        def end(status: int) -> None:
            self.release()
            self.metrics.answered(status, seconds=time.perf_counter() - start, audio_s=audio_s)

        finish = once(end)

        async def events() -> AsyncGenerator[bytes, None]:
            text = ""
            try:
                async with aclosing(pieces):
                    if first is not None:
                        text += first
                        yield sse(_delta(first))
                        async for piece in pieces:
                            text += piece
                            yield sse(_delta(piece))
                yield sse(_done(text))
                finish(200)
            except Exception as e:
                error = api_error(e)
                finish(error.status)
                yield sse(error.body())

        return EventStream(events(), pieces, finish)


def _decode_bytes(data: bytes, name: str, bounds: RequestBounds, tmp_dir: str | None) -> np.ndarray:
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="canary-qwen-audio-") as f:
        f.write(data)
        f.flush()
        return _decode(Path(f.name), name, bounds)


def _decode(path: Path, filename: str | None, bounds: RequestBounds) -> np.ndarray:
    """The uploaded file as 16 kHz mono float32, or an APIError (400) that names the file and what is wrong."""
    name = filename or "upload"
    try:
        info = sf.info(str(path))
        seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    except Exception:  # not something libsndfile reads: load_audio says why below
        seconds = 0.0
    if seconds > bounds.audio_s:
        raise invalid(
            f"{name}: the audio is {seconds:.1f} s long, over this server's {bounds.audio_s:g} s limit "
            "(--max-audio-s); send it in parts",
            FILE_FIELD,
            "audio_too_long",
        )
    try:
        return load_audio(path, max_duration_s=bounds.audio_s)
    except AudioError as e:
        code = "audio_too_long" if "limit" in e.problem and "long" in e.problem else "invalid_audio"
        raise invalid(f"{name}: {e.problem}", FILE_FIELD, code) from None
