"""``POST /v1/chat/completions``: OpenAI's chat API over Canary-Qwen's LLM mode (``chat_protocol`` says what each
field means). Audio parts are transcribed first (ASR mode, windowed, through the same upstream and batch as the
transcription requests); then the dialogue is answered with the speech LoRA off, whole or as server-sent chunks.
A request holds one of the server's in-flight slots from its arrival to its last byte, and a client that leaves
stops its decoding."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import cast

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import InputError
from ..model.prompt import Turn
from ..modes import LLM
from .chat_protocol import ChatRequest, Completion, turns
from .errors import RETRY_AFTER_S, api_error
from .http import EventStream, error_response, first_item, gather_all, once, sse, until_disconnect
from .metrics import CLIENT_CLOSED
from .protocol import SERVER_ERROR, APIError, invalid
from .service import Service
from .upstream import Answering

DONE = b"data: [DONE]\n\n"


class ChatCompletions:
    """The route's handler, over the server's upstream, limits and metrics."""

    def __init__(self, server: Service):
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        start = time.perf_counter()
        server = self.server
        refused = server.take_slot()
        if refused is not None:
            return error_response(refused)
        handed_over = False  # a stream releases its slot when it ends
        try:
            fields = ChatRequest.from_json(await self._body(request), server.settings.served_model)
            upstream = await self._upstream()
            bounds = server.settings.bounds
            try:
                budget = bounds.budget(fields.max_tokens, mode=LLM, name="max_completion_tokens")
            except InputError as e:
                raise invalid(str(e), "max_completion_tokens") from None
            heard = await until_disconnect(request, self._transcripts(fields))
            dialogue = turns(fields.messages, heard)
            completion = Completion(fields.model)
            if fields.stream:
                response = await self._stream(request, upstream, dialogue, budget, completion, fields, start)
                handed_over = True
                return response
            answer, completion.prompt_tokens = await until_disconnect(request, upstream.answer(dialogue, budget))
            reason = "length" if len(answer.token_ids) >= budget else "stop"
            server.metrics.answered(200, seconds=time.perf_counter() - start)
            return JSONResponse(completion.body(answer.text, len(answer.token_ids), reason))
        except ClientDisconnect:
            server.metrics.answered(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            error = api_error(e)
            server.metrics.answered(error.status)
            return error_response(error)
        finally:
            if not handed_over:
                server.release()

    async def _body(self, request: Request) -> object:
        """The JSON body, read up to the server's upload limit (base64 audio included)."""
        limit = self.server.settings.max_upload_bytes * 4 // 3 + 2**16  # base64 is 4/3 of the audio's bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                error = APIError(
                    413,
                    f"the request body is over this server's {limit} bytes (--max-upload-mb)",
                    code="body_too_large",
                )
                error.close_connection = True  # the rest of the body is not read: answer, then close
                raise error
        try:
            return json.loads(body)
        except ValueError as e:
            raise invalid(f"the body is not valid JSON: {e}", None, "invalid_json") from None

    async def _upstream(self) -> Answering:
        upstream = self.server.upstream
        if not upstream.answers:
            raise APIError(
                400,
                f"{upstream.description} transcribes only: chat completions (LLM mode) need a torch-fast or vllm "
                "engine (here, or in the Triton repository with --triton)",
                code="unsupported_endpoint",
            )
        ready, why = await upstream.ready()
        if not ready:
            raise APIError(503, why, type=SERVER_ERROR, code="backend_unavailable", retry_after_s=RETRY_AFTER_S)
        return cast(Answering, upstream)

    async def _transcripts(self, fields: ChatRequest) -> list[str]:
        """Each audio part's transcript, in order (every window of every part decoded at once)."""
        server = self.server
        parts = [part for message in fields.messages for part in message.audio]
        samples = [await server.samples_of(part.data, f"input_audio ({part.format})") for part in parts]
        asr_budget = server.settings.bounds.max_new_tokens
        return await gather_all(server.transcript_of(s, asr_budget) for s in samples)

    async def _stream(
        self,
        request: Request,
        upstream: Answering,
        dialogue: list[Turn],
        budget: int,
        completion: Completion,
        fields: ChatRequest,
        start: float,
    ) -> Response:
        """``chat.completion.chunk`` events: the role, the text as it is decoded, the finish reason, the usage when
        asked for, then ``[DONE]``. The first piece is awaited before the answer starts, so a refusal still gets its
        HTTP status."""
        server = self.server
        pieces = upstream.answer_pieces(dialogue, budget)
        first = await first_item(request, pieces)

        def end(status: int) -> None:
            server.release()
            server.metrics.answered(status, seconds=time.perf_counter() - start)

        finish = once(end)

        async def events() -> AsyncGenerator[bytes, None]:
            tokens = 0
            try:
                yield sse(completion.chunk({"role": "assistant", "content": ""}))
                async with aclosing(pieces):
                    if first is not None:
                        for piece, count, completion.prompt_tokens in [first]:
                            tokens += count
                            if piece:
                                yield sse(completion.chunk({"content": piece}))
                        async for piece, count, _ in pieces:
                            tokens += count
                            if piece:
                                yield sse(completion.chunk({"content": piece}))
                yield sse(completion.chunk({}, "length" if tokens >= budget else "stop"))
                if fields.include_usage:
                    yield sse(completion.chunk({}, usage=completion.usage(tokens)))
                yield DONE
                finish(200)
            except Exception as e:
                error = api_error(e)
                finish(error.status)
                yield sse(error.body())
                yield DONE

        return EventStream(events(), pieces, finish)
