"""What one request may ask for and how many may wait: the one bounds type every server applies (the python
Triton flavours' models and queues, the OpenAI-compatible server)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, UsageError


@dataclass(frozen=True)
class RequestBounds:
    """``max_audio_s``: longest clip (one window); ``max_new_tokens``: a request's default budget, at most
    ``max_new_tokens_limit``; ``max_queue``: requests that may wait; ``queue_timeout_s``: how long one may
    wait before it is refused (0: no limit)."""

    max_audio_s: float
    max_new_tokens: int
    max_new_tokens_limit: int
    max_queue: int
    queue_timeout_s: float

    def __post_init__(self):
        if min(self.max_new_tokens, self.max_queue) < 1 or self.queue_timeout_s < 0:
            raise UsageError("max_new_tokens and max_queue must be >= 1, queue_timeout_s >= 0")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise UsageError(
                f"max_new_tokens {self.max_new_tokens} is over max_new_tokens_limit {self.max_new_tokens_limit}"
            )
        if not self.max_audio_s > 0:
            raise UsageError(f"max_audio_s must be > 0, got {self.max_audio_s}")

    @property
    def queue(self) -> tuple[int, int]:
        """A Triton queue policy: (max_queue_size, timeout in microseconds; 0: no limit)."""
        return self.max_queue, round(self.queue_timeout_s * 1e6)

    @property
    def budgets(self) -> dict:
        """The parameters the decoding models read: default budget and the most a request may ask for."""
        return {"max_new_tokens": self.max_new_tokens, "max_new_tokens_limit": self.max_new_tokens_limit}

    def budget(self, requested: int | None) -> int:
        """A request's token budget: the default when it names none; outside 1..limit an InputError."""
        if requested is None:
            return self.max_new_tokens
        if not 1 <= requested <= self.max_new_tokens_limit:
            raise InputError(f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, got {requested}")
        return int(requested)
