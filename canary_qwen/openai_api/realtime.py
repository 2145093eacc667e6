"""``GET /v1/realtime``: live transcription sessions over a WebSocket, in OpenAI's Realtime transcription protocol
(``realtime_protocol``).

A session takes 16-bit PCM as it is spoken, finds turns (server VAD, ``pipeline.live.EnergyVad``, or the client's
commits), and while a turn goes on re-decodes its audio so far every ``partial_interval_s`` through the server's
upstream, sending as deltas only the words the last two hypotheses agree on (``pipeline.live.LocalAgreement``). When a
turn ends its audio is decoded whole, windowed as ``canary-qwen transcribe`` does (a turn longer than the model's
window is cut at quiet points): ``completed`` carries exactly that text. Every decode is an upstream request, so
re-decodes join the local engine's running batch with everything else, or go to Triton with ``--triton``.

Bounds: sessions at once, uncommitted audio per session, idle time, event size. A bad event gets an ``error`` event
and the session goes on; a client that leaves cancels its decodes at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..defaults import SAMPLE_RATE
from ..pipeline.live import EnergyVad, LocalAgreement
from .errors import api_error
from .realtime_protocol import EventError, Events, SessionConfig
from .service import Service

log = logging.getLogger(__name__)
TRY_AGAIN_LATER = 1013  # WebSocket close code: the server is at its session limit


class Realtime:
    """The route: admits at most ``live.max_sessions`` sessions at once."""

    def __init__(self, server: Service):
        self.server = server
        self.sessions = 0

    async def __call__(self, scope, receive, send) -> None:
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        limit = self.server.settings.live.max_sessions
        if self.sessions >= limit:
            refusal = Events().error(
                f"this server already runs {self.sessions} live sessions (its limit, --max-sessions): retry later",
                "too_many_sessions",
            )
            await websocket.send_text(json.dumps(refusal))
            await websocket.close(TRY_AGAIN_LATER)
            return
        self.sessions += 1
        self.server.metrics.live_sessions.inc()
        try:
            await LiveSession(self.server, websocket).run()
        finally:
            self.sessions -= 1
            self.server.metrics.live_sessions.dec()


@dataclass
class _Turn:
    """The turn being spoken: its item id, first sample (from the session's start), and its partial text."""

    item_id: str
    start: int
    agreement: LocalAgreement = field(default_factory=LocalAgreement)
    decoded_to: int = 0  # the sample its last partial decode reached
    sent: list[str] = field(default_factory=list)  # the words its deltas carried


class LiveSession:
    def __init__(self, server: Service, websocket: WebSocket):
        self.server, self.websocket = server, websocket
        self.live = server.settings.live
        self.config = SessionConfig()
        self.events = Events()
        self.audio = np.zeros(0, dtype=np.float32)  # 16 kHz samples kept (the turn, or the padding before one)
        self.offset = 0  # the session sample at audio[0]
        self.received = 0  # 16 kHz samples received in the session
        self.received_at = 0.0  # when the last of them arrived (monotonic)
        self.vad: EnergyVad | None = self._vad()
        self.turn: _Turn | None = None
        self.previous_item: str | None = None
        self.items = 0
        self._resampler: Any = None  # soxr.ResampleStream, made for a rate other than 16 kHz
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._partial: asyncio.Future | None = None  # the re-decode in flight

    def _vad(self) -> EnergyVad | None:
        """The session's VAD as configured, counting from the audio received so far."""
        vad = self.config.vad
        if vad is None:
            return None
        return EnergyVad(vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms, start=self.received)

    # -- the connection --------------------------------------------------------------------------------------
    async def run(self) -> None:
        await self.send(self.events("session.created", session=self.config.body(self.server.settings.served_model)))
        partials = asyncio.ensure_future(self._partials())
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.websocket.receive(), self.live.idle_timeout_s)
                except asyncio.TimeoutError:
                    await self.send(self.events.error(
                        f"no event for {self.live.idle_timeout_s:g} s: the session is closed", "idle_timeout"))  # fmt: skip
                    await self.websocket.close()
                    return
                if message["type"] == "websocket.disconnect":
                    return
                await self._handle(message)
        except WebSocketDisconnect:
            return
        finally:
            partials.cancel()
            if self._partial is not None:
                self._partial.cancel()
            for task in self._tasks:
                task.cancel()  # the engine aborts their decoding at its next step

    async def send(self, event: dict) -> None:
        async with self._send_lock:
            try:
                await self.websocket.send_text(json.dumps(event, ensure_ascii=False))
            except (WebSocketDisconnect, RuntimeError):  # the client has gone; run() ends the session
                pass

    async def _handle(self, message: Mapping[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            await self.send(self.events.error("send events as JSON text messages, not binary", "invalid_event"))
            return
        if len(text) > self.live.max_message_bytes:
            await self.send(self.events.error(
                f"an event of {len(text)} bytes is over this server's {self.live.max_message_bytes} "
                "(--max-message-kb): send the audio in smaller appends", "message_too_large"))  # fmt: skip
            return
        try:
            event = json.loads(text)
        except ValueError as e:
            await self.send(self.events.error(f"the event is not JSON: {e}", "invalid_json"))
            return
        event_id = event.get("event_id") if isinstance(event, dict) else None
        kind = event.get("type") if isinstance(event, dict) else None
        handler = {
            "session.update": self._session_update,
            "transcription_session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit_event,
            "input_audio_buffer.clear": self._clear,
        }.get(kind)  # type: ignore[arg-type]
        if handler is None:
            await self.send(self.events.error(
                f"unknown or unsupported event type {kind!r} in a transcription session", "invalid_event", "type",
                event_id))  # fmt: skip
            return
        try:
            await handler(event)
        except EventError as e:
            await self.send(self.events.error(e.message, e.code, e.param, event_id))

    # -- client events ------------------------------------------------------------------------------------------
    async def _session_update(self, event: dict) -> None:
        config = self.config.updated(event.get("session"), self.server.settings.served_model)
        if config.rate != self.config.rate:
            self._resampler = None
        vad_changed = config.vad != self.config.vad
        self.config = config
        if vad_changed:
            self.vad = self._vad()
        await self.send(self.events("session.updated", session=config.body(self.server.settings.served_model)))

    def _samples(self, audio: object) -> np.ndarray:
        if not isinstance(audio, str):
            raise EventError("input_audio_buffer.append needs audio: base64 of 16-bit PCM", param="audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("audio is not valid base64", "invalid_audio", "audio") from None
        if len(raw) % 2:
            raise EventError("audio must be whole 16-bit samples (an even number of bytes)", "invalid_audio", "audio")
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if self.config.rate == SAMPLE_RATE:
            return pcm
        if self._resampler is None:
            import soxr

            self._resampler = soxr.ResampleStream(self.config.rate, SAMPLE_RATE, 1, dtype="float32")
        return self._resampler.resample_chunk(pcm)

    async def _append(self, event: dict) -> None:
        samples = self._samples(event.get("audio"))
        kept_from = self.offset if self.turn is None else self.turn.start
        if self.received + len(samples) - kept_from > self.live.max_buffer_s * SAMPLE_RATE:
            raise EventError(
                f"the uncommitted audio would pass {self.live.max_buffer_s:g} s (--max-buffer-s): commit or clear "
                "it first; this audio was dropped", "buffer_full", "audio")  # fmt: skip
        self.audio = np.concatenate((self.audio, samples))
        self.received += len(samples)
        self.received_at = time.monotonic()
        if self.vad is None:
            if self.turn is None and len(samples):
                self.turn = self._new_turn(self.received - len(samples))
        else:
            for boundary in self.vad.feed(samples):
                if boundary.kind == "start":
                    self.turn = self._new_turn(boundary.at)
                    await self.send(self.events("input_audio_buffer.speech_started",
                                                audio_start_ms=_ms(boundary.at), item_id=self.turn.item_id))  # fmt: skip
                elif self.turn is not None:
                    item = self.turn.item_id
                    await self.send(self.events("input_audio_buffer.speech_stopped", audio_end_ms=_ms(boundary.at),
                                                item_id=item))  # fmt: skip
                    await self._commit(boundary.at)
            if self.turn is None:  # keep the padding a next turn may start with
                self._drop_before(self.received - self.vad.reach)

    def _new_turn(self, start: int) -> _Turn:
        self.items += 1
        return _Turn(item_id=f"item_{self.config.id[5:13]}_{self.items:04d}", start=start)

    async def _commit_event(self, event: dict) -> None:
        if self.turn is None or self.received <= self.turn.start:
            raise EventError("the input audio buffer is empty: nothing to commit", "input_audio_buffer_commit_empty")
        await self._commit(self.received)
        if self.vad is not None:
            self.vad.reset(self.received)

    async def _commit(self, end: int) -> None:
        """The turn ends at sample ``end``: committed, and its audio decoded whole for ``completed``."""
        turn, self.turn = self.turn, None
        assert turn is not None
        if self._partial is not None:
            self._partial.cancel()
        samples = self.audio[turn.start - self.offset : end - self.offset].copy()
        self._drop_before(end)
        await self.send(self.events("input_audio_buffer.committed", item_id=turn.item_id,
                                    previous_item_id=self.previous_item))  # fmt: skip
        self.previous_item = turn.item_id
        task = asyncio.ensure_future(self._complete(turn.item_id, samples, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _clear(self, event: dict) -> None:
        self.turn = None
        self._drop_before(self.received)
        if self.vad is not None:
            self.vad.reset(self.received)
        await self.send(self.events("input_audio_buffer.cleared"))

    def _drop_before(self, sample: int) -> None:
        cut = max(0, min(len(self.audio), sample - self.offset))
        self.audio, self.offset = self.audio[cut:], self.offset + cut

    # -- decoding -------------------------------------------------------------------------------------------
    async def _complete(self, item_id: str, samples: np.ndarray, committed_at: float) -> None:
        try:
            text = await self.server.transcript_of(
                samples, self.server.settings.bounds.max_new_tokens, self.config.prompt
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = api_error(e)
            await self.send(self.events("conversation.item.input_audio_transcription.failed", item_id=item_id,
                                        content_index=0, error={"type": error.type, "code": error.code,
                                                                "message": error.message}))  # fmt: skip
            return
        self.server.metrics.live_final.observe(time.monotonic() - committed_at)
        usage = {"type": "duration", "seconds": round(len(samples) / SAMPLE_RATE, 3)}
        await self.send(self.events("conversation.item.input_audio_transcription.completed", item_id=item_id,
                                    content_index=0, transcript=text, usage=usage))  # fmt: skip

    async def _partials(self) -> None:
        """Every ``partial_interval_s``: the turn so far decoded again where audio came since its last decode, and
        the words two hypotheses in a row agree on sent as a delta. A re-decode of the turn's last moments is of no
        use once it ends: committing cancels it."""
        while True:
            await asyncio.sleep(self.live.partial_interval_s)
            turn = self.turn
            if turn is None or self.received <= turn.decoded_to:
                continue
            turn.decoded_to, covered_at = self.received, self.received_at
            samples = self.audio[turn.start - self.offset : self.received - self.offset].copy()
            window = self.server.settings.max_window_s
            if window and len(samples) > window * SAMPLE_RATE:
                continue  # past one window the turn's text comes with its end (cut as transcribe cuts it)
            self._partial = asyncio.ensure_future(self._hypothesis(turn, samples))
            await asyncio.wait({self._partial})
            if self._partial.cancelled() or self._partial.exception() is not None:
                if self._partial.exception() is not None:  # a preview: the turn's completed or failed event tells
                    log.debug("a partial decode failed", exc_info=self._partial.exception())
                continue
            self.server.metrics.live_partial_lag.observe(time.monotonic() - covered_at)
            words = self._partial.result()
            if self.turn is turn and words[: len(turn.sent)] == turn.sent and len(words) > len(turn.sent):
                delta = (" " if turn.sent else "") + " ".join(words[len(turn.sent) :])
                turn.sent = words
                await self.send(self.events("conversation.item.input_audio_transcription.delta", item_id=turn.item_id,
                                            content_index=0, delta=delta))  # fmt: skip

    async def _hypothesis(self, turn: _Turn, samples: np.ndarray) -> list[str]:
        """The turn's agreed words after one more decode. Where the upstream can force the answer's start (a local
        engine), the tokens agreed so far are forced and only ``partial_new_tokens`` more decoded (cheap: no
        re-decode of what is settled), the agreement kept on tokens, and the last agreed word held back (its next
        token may extend it). Otherwise (Triton) the turn is decoded whole and the agreement kept on words."""
        upstream, prompt = self.server.upstream, self.config.prompt
        tokenizer = upstream.tokenizer
        if upstream.continues and tokenizer is not None:
            start = list(turn.agreement.shown)
            new = await upstream.continue_transcript(samples, prompt, start, self.live.partial_new_tokens)
            turn.agreement.update(start + new.token_ids)
            return tokenizer.decode(turn.agreement.shown).split()[:-1]
        text = await self.server.transcript_of(samples, self.server.settings.bounds.max_new_tokens, prompt)
        turn.agreement.update(text.split())
        return list(turn.agreement.shown)


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE
