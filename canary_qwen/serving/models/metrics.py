"""The counters a streaming python model adds to Triton's metrics endpoint (``/metrics`` on the metrics port), from
its :class:`~canary_qwen.engines.RequestCounts`:

- ``canary_qwen_tokens_total{model}``: tokens generated for requests;
- ``canary_qwen_requests_ended_total{model, outcome}``: requests ended, by outcome (finished, cancelled, failed);
- ``canary_qwen_requests_pending{model}`` (the engine model): requests held, decoding or waiting for a slot;
- ``canary_qwen_engine_busy_seconds_total{model}`` (the engine model): seconds its engine spent admitting and
  stepping; the rest of a request's time was the serving path's (``canary-qwen bench`` reports it per request);
- ``canary_qwen_engine_steps_total{model}`` (the engine model): engine steps taken;
- ``canary_qwen_responses_total{model}``: responses sent (each one a round trip from the model's process).

Each increment is a round trip to the server process, so counts are pushed as deltas when a request ends (and, for
the engine model, every ``METRICS_PUSH_S`` from its outbox thread), never per token.
"""

import triton_python_backend_utils as pb_utils

from canary_qwen.engines import RequestCounts

TOKENS = "canary_qwen_tokens_total"
ENDED = "canary_qwen_requests_ended_total"
PENDING = "canary_qwen_requests_pending"
BUSY = "canary_qwen_engine_busy_seconds_total"
STEPS = "canary_qwen_engine_steps_total"
RESPONSES = "canary_qwen_responses_total"


class ModelCounters:
    """The model's ``counts`` (its own, or an engine loop's) and their counters in Triton. ``push`` from one thread
    only, before a request's final response goes out, so that a client that has its answer sees it counted."""

    def __init__(self, model: str, counts: RequestCounts | None = None, pending=None):
        """``pending``: a callable giving the requests an engine loop holds now; with it (the engine model) the engine's
        busy seconds, steps and pending requests are published too."""
        self.counts = counts if counts is not None else RequestCounts()
        self.pending = pending
        counter = pb_utils.MetricFamily.COUNTER
        labels = {"model": model}
        ended = pb_utils.MetricFamily(
            name=ENDED,
            description="Requests ended, by outcome: finished (whole answer sent), cancelled (the client left first), "
            "failed (an error response)",
            kind=counter,
        )
        self._families = [ended]
        self._metrics = {
            outcome: ended.Metric(labels={**labels, "outcome": outcome}) for outcome in self.counts.outcomes()
        }
        counters = {"tokens": (TOKENS, "Tokens generated for requests"), "responses": (RESPONSES, "Responses sent")}
        if pending is not None:
            counters["busy_s"] = (BUSY, "Seconds the engine spent admitting requests and stepping")
            counters["steps"] = (STEPS, "Engine steps taken")
        for key, (name, description) in counters.items():
            self._families.append(pb_utils.MetricFamily(name=name, description=description, kind=counter))
            self._metrics[key] = self._families[-1].Metric(labels=labels)
        self.responses = 0  # sent so far (``responded``)
        self._pushed = {**RequestCounts().as_dict(), "responses": 0}
        self._gauge = None
        if pending is not None:
            family = pb_utils.MetricFamily(
                name=PENDING, description="Requests held, decoding or waiting", kind=pb_utils.MetricFamily.GAUGE
            )
            self._families.append(family)
            self._gauge = family.Metric(labels=labels)

    def ended(self, outcome: str, tokens: int) -> None:
        """One request ended: counted and pushed."""
        self.counts.ended(outcome, tokens)
        self.push()

    def responded(self) -> None:
        """One response is going out (counted; pushed with the next ``push``)."""
        self.responses += 1

    def push(self) -> None:
        """Add to each counter what ``counts`` gained since the last push. Never raises: a metric is not worth a
        reply."""
        try:
            for name, value in {**self.counts.as_dict(), "responses": self.responses}.items():
                if name in self._metrics and value > self._pushed[name]:
                    self._metrics[name].increment(value - self._pushed[name])
                    self._pushed[name] = value
            if self._gauge is not None:
                self._gauge.set(self.pending())
        except Exception as e:
            pb_utils.Logger.log_warn(f"metrics not published: {e}")

    def close(self) -> None:
        """Drop the metrics before their families, as the python backend requires."""
        self._metrics.clear()
        self._gauge = None
        self._families.clear()
