"""Load test of running Canary-Qwen servers: many concurrent clients for a while, then latency
percentiles and errors by kind (``canary-qwen client loadtest``).

Each of ``concurrency`` workers sends one request after another, taking the clips in turn; a share of
them are streams (``stream_share``), timed to the first piece and to the end. The target is a
:class:`~canary_qwen.client.triton.TritonClient` (several servers and the failover are load tested as users get
them) or an :class:`OpenAITarget`: the OpenAI-compatible server (``canary-qwen serve-openai``) through the
official ``openai`` client, each clip sent as a WAV upload, streams as server-sent events. Running both on the
same clips measures what the OpenAI layer adds per request.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..defaults import SAMPLE_RATE
from ..errors import UsageError
from .errors import ModelNotReadyError, ServerBusyError, ServerUnreachableError

RETRY_S = 1.0  # the wait after a refusal that names none


class Target(Protocol):
    """What a load test sends requests to (TritonClient, OpenAITarget)."""

    def infer(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]: ...

    def stream_with_ids(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Iterator[tuple[str, list[int] | None]]: ...

    def close(self) -> None: ...


class OpenAITarget:
    """The OpenAI-compatible server at ``base_url`` (``http://HOST:PORT/v1``) through the ``openai`` client: one
    client shared by every worker (its connection pool holds them all), no retries (a refused request is an
    error of the run), ``model`` the served model's name (default: the first of ``GET /v1/models``)."""

    def __init__(self, base_url: str, model: str | None = None, *, timeout_s: float = 120.0, api_key: str = "none"):
        from ..errors import import_optional

        openai = import_optional("openai", "pip install 'canary-qwen[openai]'")
        base_url = base_url.rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            base_url = f"http://{base_url}"
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self.url = base_url
        self.model = model or self.client.models.list().data[0].id

    @staticmethod
    def wav(audio: np.ndarray) -> bytes:
        """16 kHz mono float32 samples as a WAV file (float samples: the server reads back the same values)."""
        import io

        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, np.asarray(audio, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT")
        return buffer.getvalue()

    def _extra(self, max_new_tokens: int | None) -> dict:
        return {} if max_new_tokens is None else {"extra_body": {"max_new_tokens": int(max_new_tokens)}}

    def infer(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None, with_ids: bool = False
    ) -> tuple[str, list[int]]:
        """(text, token ids: those of verbose_json's segments ``with_ids``, else [])."""
        kwargs = {"prompt": prompt} if prompt is not None else {}
        if with_ids:
            kwargs["response_format"] = "verbose_json"
        result = self.client.audio.transcriptions.create(
            file=("clip.wav", self.wav(audio), "audio/wav"),
            model=self.model,
            **kwargs,
            **self._extra(max_new_tokens),
        )
        return result.text, [i for s in (result.segments or []) for i in s.tokens] if with_ids else []

    def stream_with_ids(
        self, audio: np.ndarray, prompt: str | None = None, *, max_new_tokens: int | None = None
    ) -> Iterator[tuple[str, list[int] | None]]:
        """Text deltas; OpenAI's stream events carry no token ids (None)."""
        kwargs = {"prompt": prompt} if prompt is not None else {}
        events = self.client.audio.transcriptions.create(
            file=("clip.wav", self.wav(audio), "audio/wav"),
            model=self.model,
            stream=True,
            **kwargs,
            **self._extra(max_new_tokens),
        )
        with events:
            for event in events:
                if event.type == "transcript.text.delta":
                    yield event.delta, None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OpenAITarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def refusal_wait(error: Exception) -> float | None:
    """Seconds to wait before the next request when ``error`` says the server refused this one for now (busy, rate
    limited, down or restarting): its Retry-After where it sent one. None for a failure (a timeout, an error
    answer)."""
    if isinstance(error, (ServerBusyError, ServerUnreachableError, ModelNotReadyError)):
        return RETRY_S  # Triton sends no Retry-After
    if type(error).__module__.startswith("openai"):
        import openai

        if isinstance(error, openai.APIStatusError) and error.status_code in (429, 503):
            return _seconds(error.response.headers.get("retry-after"))
        if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
            return RETRY_S  # nothing answered: down or restarting
    return None


def _seconds(retry_after: str | None) -> float:
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else RETRY_S
    except ValueError:  # an HTTP date
        return RETRY_S


def read_reference(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """``transcribe --json`` lines (``audio``, ``text``, ``token_ids``) by the audio file's real path."""
    rows: dict[str, tuple[str, list[int]]] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[os.path.realpath(row["audio"])] = (row["text"], [int(i) for i in row["token_ids"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not the JSON lines `canary-qwen transcribe --json` writes ({e})") from None
    return rows


@dataclass
class LoadReport:
    concurrency: int
    wall_s: float = 0.0
    audio_s: float = 0.0  # audio transcribed by the requests that succeeded
    latencies_s: list[float] = field(default_factory=list)  # whole request, successful ones
    first_piece_s: list[float] = field(default_factory=list)  # streams: time to the first text piece
    streams: int = 0
    errors: Counter = field(default_factory=Counter)  # failed requests: error class name -> count
    refused: Counter = field(default_factory=Counter)  # refused for now (busy, rate limited, down): class -> count
    error_examples: dict[str, str] = field(default_factory=dict)
    compared: Counter = field(default_factory=Counter)  # answers checked against the reference, by mode
    mismatches: Counter = field(default_factory=Counter)  # of those, the ones whose ids or text differ, by mode

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + sum(self.errors.values()) + sum(self.refused.values())

    def as_dict(self) -> dict:
        def ms(values, q):
            return round(float(np.percentile(values, q)) * 1000, 1) if values else None

        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": len(self.latencies_s),
            "streams": self.streams,
            "errors": dict(self.errors),
            "refused": dict(self.refused),
            "compared": dict(self.compared),
            "mismatches": dict(self.mismatches),
            "wall_s": round(self.wall_s, 2),
            "requests_per_s": round(self.requests / self.wall_s, 2) if self.wall_s else None,
            "rtfx": round(self.audio_s / self.wall_s, 1) if self.wall_s else None,
            "latency_ms": {
                "p50": ms(self.latencies_s, 50),
                "p90": ms(self.latencies_s, 90),
                "p99": ms(self.latencies_s, 99),
            },
            "first_piece_ms": {"p50": ms(self.first_piece_s, 50), "p99": ms(self.first_piece_s, 99)},
        }


def run_load(
    client: Target,
    clips: Sequence[np.ndarray],
    *,
    concurrency: int = 8,
    duration_s: float = 30.0,
    stream_share: float = 0.0,
    max_new_tokens: int | None = None,
    expected: Sequence[tuple[str, list[int]]] | None = None,
) -> LoadReport:
    """``concurrency`` workers send requests for ``duration_s`` seconds (each finishes the one it started); one
    refused for now waits as the server asked before its worker sends the next. ``expected``: each clip's (text,
    token ids), against which every answer is checked (a stream's ids where the target sends them)."""
    if not clips or concurrency < 1 or duration_s <= 0 or not 0 <= stream_share <= 1:
        raise UsageError("a load test needs clips, concurrency >= 1, a duration > 0 and a stream share in [0, 1]")
    if expected is not None and len(expected) != len(clips):
        raise UsageError(f"{len(expected)} expected answers for {len(clips)} clips")
    report = LoadReport(concurrency)
    lock = threading.Lock()
    turn = iter(range(1 << 62))
    end = time.monotonic() + duration_s

    def one(clip: np.ndarray, stream: bool, start: float) -> tuple[str, list[int] | None, float | None]:
        """(text, ids or None where the target sent none, seconds to the first piece of a stream)."""
        if not stream:
            text, got = client.infer(clip, max_new_tokens=max_new_tokens, with_ids=expected is not None)
            return text, got if expected is not None else None, None
        text, first = "", None
        ids: list[int] | None = []
        for piece, piece_ids in client.stream_with_ids(clip, max_new_tokens=max_new_tokens):
            if first is None and piece:
                first = time.monotonic() - start
            text += piece
            ids = None if ids is None or piece_ids is None else ids + piece_ids
        return text.strip(), ids, first

    def worker(w: int) -> None:
        while time.monotonic() < end:
            with lock:
                k = next(turn)
            clip = clips[k % len(clips)]
            stream = int((k + 1) * stream_share) > int(k * stream_share)  # streams spread evenly over the requests
            start = time.monotonic()
            try:
                text, ids, first = one(clip, stream, start)
            except Exception as e:
                wait = refusal_wait(e)
                with lock:
                    name = type(e).__name__
                    (report.errors if wait is None else report.refused)[name] += 1
                    report.error_examples.setdefault(name, str(e)[:300])
                time.sleep(min(wait or 0.0, max(0.0, end - time.monotonic())))
                continue
            with lock:
                report.latencies_s.append(time.monotonic() - start)
                report.audio_s += len(clip) / SAMPLE_RATE
                if stream:
                    report.streams += 1
                    if first is not None:
                        report.first_piece_s.append(first)
                if expected is not None:
                    mode = "stream" if stream else "unary"
                    want_text, want_ids = expected[k % len(clips)]
                    report.compared[mode] += 1
                    if text != want_text or (ids is not None and ids != want_ids):
                        report.mismatches[mode] += 1
                        report.error_examples.setdefault(f"mismatch ({mode})", f"{text!r} for {want_text!r}"[:300])

    start = time.monotonic()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="load") as pool:
        list(pool.map(worker, range(concurrency)))
    report.wall_s = time.monotonic() - start
    return report


def format_report(report: LoadReport) -> str:
    d = report.as_dict()
    lat, first = d["latency_ms"], d["first_piece_ms"]
    lines = [
        f"concurrency {d['concurrency']}: {d['requests']} requests in {d['wall_s']} s ({d['requests_per_s']}/s, "
        f"RTFx {d['rtfx']}), {d['ok']} answered ({d['streams']} streams), "
        f"{sum(report.refused.values())} refused, {sum(report.errors.values())} failed",
        f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}",
    ]
    if report.first_piece_s:
        lines.append(f"first streamed piece ms: p50 {first['p50']}  p99 {first['p99']}")
    for mode, n in sorted(report.compared.items()):
        lines.append(f"{mode}: {report.mismatches[mode]} of {n} answers differ from the reference")
    for kind, counts in (("refused", report.refused), ("failed", report.errors)):
        for name, count in counts.most_common():
            lines.append(f"{count} x {name} ({kind}): {report.error_examples[name]}")
    for name, example in report.error_examples.items():
        if name.startswith("mismatch"):
            lines.append(f"{name}: {example}")
    return "\n".join(lines)
