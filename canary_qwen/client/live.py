"""``canary-qwen client live``: play audio files into a live transcription session (``serve-openai``'s
``/v1/realtime``) at real-time pace through the official ``openai`` client, and show the partial text as it
changes and each turn's final text."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from ..defaults import SAMPLE_RATE
from ..errors import UsageError

CHUNK_MS = 100  # audio per append: what a microphone client sends
TRAILING_SILENCE_S = 1.0  # after a file, so the server's VAD ends its last turn


@dataclass
class Played:
    """What a session gave for one file: final texts by item (in commit order), partial text, errors."""

    finals: dict[str, str] = field(default_factory=dict)
    partials: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def play(
    base_url: str,
    samples: np.ndarray,
    *,
    speed: float = 1.0,
    on_event: Callable[[dict], None] | None = None,
    timeout_s: float = 120.0,
) -> Played:
    """Stream 16 kHz mono ``samples`` into one session at ``speed`` times real time (16 kHz PCM, server VAD), then
    wait for every committed turn's final text. ``on_event``: each server event as a dict, as it comes."""
    try:
        import openai
    except ImportError:
        raise UsageError("client live needs the openai client: pip install 'canary-qwen[openai]'") from None
    if speed <= 0:
        raise UsageError("--speed must be > 0")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    pcm = np.concatenate((pcm, np.zeros(int(TRAILING_SILENCE_S * SAMPLE_RATE), dtype="<i2")))
    chunk = SAMPLE_RATE * CHUNK_MS // 1000
    played, committed = Played(), list[str]()
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as conn:
        update = {"type": "session.update", "session": {"type": "transcription",
                  "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}}}}}  # fmt: skip
        conn.send(cast(Any, update))  # the client types events as TypedDicts; this is one, as a plain dict
        sent = threading.Event()

        def send_audio() -> None:
            start = time.monotonic()
            for i in range(0, len(pcm), chunk):
                delay = start + i / SAMPLE_RATE / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                conn.send({"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(pcm[i : i + chunk].tobytes()).decode()})  # fmt: skip
            sent.set()
            # A marker: the server answers events in order, so once session.updated comes back every turn the
            # audio ended has been committed; only their final texts may still be on the way.
            conn.send(cast(Any, {"type": "session.update", "session": {"type": "transcription"}}))

        sender = threading.Thread(target=send_audio, name="live-audio", daemon=True)
        sender.start()
        deadline = time.monotonic() + len(pcm) / SAMPLE_RATE / speed + timeout_s
        marked = False
        while time.monotonic() < deadline:
            if marked and all(item in played.finals for item in committed):
                break
            event = json.loads(conn.recv_bytes())
            if on_event is not None:
                on_event(event)
            kind, item = event.get("type", ""), event.get("item_id")
            if kind == "session.updated" and sent.is_set():
                marked = True
            elif kind == "input_audio_buffer.committed":
                committed.append(item)
            elif kind == "input_audio_buffer.speech_started":
                played.partials[item] = ""
            elif kind.endswith("input_audio_transcription.delta"):
                played.partials[item] = played.partials.get(item, "") + (event.get("delta") or "")
            elif kind.endswith("input_audio_transcription.completed"):
                played.finals[item] = event.get("transcript", "")
                played.partials.pop(item, None)
            elif kind.endswith("input_audio_transcription.failed"):
                played.finals[item] = ""
                played.errors.append(str(event.get("error")))
                played.partials.pop(item, None)
            elif kind == "error":
                played.errors.append(str(event.get("error", {}).get("message")))
        sender.join(1.0)
    return played
