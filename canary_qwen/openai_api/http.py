"""The HTTP pieces the OpenAI-compatible server's handlers share: errors as responses, server-sent events that
clean up however they end, and work that stops when the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .metrics import CLIENT_CLOSED
from .protocol import APIError

SSE = "text/event-stream"
T = TypeVar("T")


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def error_response(error: APIError) -> Response:
    if error.close_connection:
        return _Refusal(error)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class _Refusal(JSONResponse):
    """An error answered while the request body still streams in (413), then the connection closed.

    A server that closes a connection with unread data in it resets it, and a client still sending (curl) may
    lose the answer; one that reads the rest to discard it (uvicorn, by default) reads a body of any size. So, as
    nginx does: the answer is sent whole, what the client still sends is read and dropped for at most
    ``LINGER_S`` seconds and ``LINGER_BYTES`` bytes (never kept), then the connection is closed."""

    LINGER_S = 2.0
    LINGER_BYTES = 16 * 2**20

    def __init__(self, error: APIError):
        super().__init__(error.body(), status_code=error.status, headers=error.headers())

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        dropped, deadline = 0, time.monotonic() + self.LINGER_S
        while dropped < self.LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            dropped += len(message.get("body", b""))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; cancelled (which stops its decoding) when the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnect()
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events that, however the response ends (done, error, the client gone before or while it
    streams), close the event and piece generators (which stops the decoding) and release the request's slot."""

    def __init__(self, events: AsyncGenerator[bytes, None], pieces: AsyncGenerator, finish: Callable[[int], None]):
        super().__init__(events, media_type=SSE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._pieces, self._finish = events, pieces, finish

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._pieces.aclose()
            self._finish(CLIENT_CLOSED)


async def gather_all(calls) -> list:
    """Await every call concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


async def first_item(request: Request, items: AsyncGenerator[T, None]) -> T | None:
    """The first of a stream's ``items`` (None when there is none), awaited before a response starts so that a
    refusal still gets its HTTP status; the stream is closed when this fails or the client leaves first."""

    async def first() -> T | None:
        try:
            return await items.__anext__()
        except StopAsyncIteration:
            return None

    try:
        return await until_disconnect(request, first())
    except BaseException:
        await items.aclose()
        raise


def once(action: Callable[[int], None]) -> Callable[[int], None]:
    """``action(status)`` the first time only: a stream ends once, whether done, failed or left by its client."""
    done = False

    def call(status: int) -> None:
        nonlocal done
        if not done:
            done = True
            action(status)

    return call
