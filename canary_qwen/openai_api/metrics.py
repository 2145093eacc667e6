"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..engines import RequestCounts

PREFIX = "canary_qwen_openai"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LIVE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0)
CLIENT_CLOSED = 499  # the status counted for a request whose client went away before its answer (nginx's)


class Metrics:
    """``requests_total{status}``: transcription requests by HTTP status (499: the client left);
    ``audio_seconds_total``: audio of the answered ones; ``request_duration_seconds``: latency of answered ones
    (a stream: to its done event); ``requests_in_flight``; ``engine_pending``: windows the local engine holds;
    ``engine_tokens_total``, ``engine_requests_ended_total{outcome}``, ``engine_busy_seconds_total`` and
    ``engine_steps_total``: what the local engine did (its ``RequestCounts``)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pending: Callable[[], int] = lambda: 0, counts: Callable[[], RequestCounts] = RequestCounts):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests", "Transcription requests by HTTP status", ["status"], registry=self.registry
        )
        self.audio_seconds = Counter(
            f"{PREFIX}_audio_seconds", "Seconds of audio in answered transcription requests", registry=self.registry
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Seconds from a transcription request's arrival to its whole answer (answered requests)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Transcription requests being handled now", registry=self.registry
        )
        self.live_sessions = Gauge(
            f"{PREFIX}_live_sessions", "Live transcription sessions open now (GET /v1/realtime)", registry=self.registry
        )
        self.live_partial_lag = Histogram(
            f"{PREFIX}_live_partial_lag_seconds",
            "Live sessions: from the arrival of the last audio a re-decode covers to its hypothesis (how far the "
            "partial text trails the speech)",
            buckets=LIVE_BUCKETS,
            registry=self.registry,
        )
        self.live_final = Histogram(
            f"{PREFIX}_live_final_seconds",
            "Live sessions: from a turn's commit (end of speech found, or the client's commit) to its completed text",
            buckets=LIVE_BUCKETS,
            registry=self.registry,
        )
        self.engine_pending = Gauge(
            f"{PREFIX}_engine_pending",
            "Windows submitted to the in-process engine and not finished (0 when forwarding)",
            registry=self.registry,
        )
        self.engine_pending.set_function(lambda: float(pending()))
        self.registry.register(_EngineCounts(counts))

    def answered(self, status: int, *, seconds: float | None = None, audio_s: float | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if status == 200:
            if seconds is not None:
                self.latency.observe(seconds)
            if audio_s is not None:
                self.audio_seconds.inc(audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounts(Collector):
    """The local engine's counts, read at each scrape (zeros when the server forwards to Triton)."""

    def __init__(self, counts: Callable[[], RequestCounts]):
        self.counts = counts

    def collect(self):
        counts = self.counts()
        yield CounterMetricFamily(
            f"{PREFIX}_engine_tokens", "Tokens the in-process engine generated", value=counts.tokens
        )
        yield CounterMetricFamily(
            f"{PREFIX}_engine_busy_seconds",
            "Seconds the in-process engine spent admitting requests and stepping",
            value=counts.busy_s,
        )
        yield CounterMetricFamily(f"{PREFIX}_engine_steps", "Steps the in-process engine took", value=counts.steps)
        ended = CounterMetricFamily(
            f"{PREFIX}_engine_requests_ended",
            "Windows the in-process engine ended, by outcome: finished, cancelled (the client left), failed",
            labels=["outcome"],
        )
        for outcome, n in counts.outcomes().items():
            ended.add_metric([outcome], n)
        yield ended
