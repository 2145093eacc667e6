"""What one request may ask for and how many may wait: the one bounds type every server applies (the python
Triton flavours' models and queues, the OpenAI-compatible server). A command builds it once from its flags; a
generated Triton repository carries it in each model's config as one parameter (``parameters``), which the model
reads back with ``from_parameters``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from .defaults import (
    MAX_ANSWER_TOKENS,
    MAX_ANSWER_TOKENS_LIMIT,
    MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_PROMPT_TOKENS,
    MAX_QUEUE,
    MAX_WINDOW_S,
    QUEUE_TIMEOUT_S,
)
from .errors import ArtifactError, InputError, UsageError
from .modes import ASR

PARAMETER = "request_bounds"  # the model-config parameter that holds them, as JSON


@dataclass(frozen=True)
class RequestBounds:
    """``max_audio_s``: longest clip (one window; None: the export's, else the model's training window);
    ``max_new_tokens``: a transcription's default budget, at most ``max_new_tokens_limit``; ``max_answer_tokens``:
    an LLM-mode answer's default budget, at most ``max_answer_tokens_limit``; ``max_prompt_tokens``: the longest
    LLM-mode dialogue; ``max_queue``: requests that may wait; ``queue_timeout_s``: how long one may wait before it
    is refused (0: no limit)."""

    max_audio_s: float | None = None
    max_new_tokens: int = MAX_NEW_TOKENS
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT
    max_queue: int = MAX_QUEUE
    queue_timeout_s: float = QUEUE_TIMEOUT_S
    max_answer_tokens: int = MAX_ANSWER_TOKENS
    max_answer_tokens_limit: int = MAX_ANSWER_TOKENS_LIMIT
    max_prompt_tokens: int = MAX_PROMPT_TOKENS

    def __post_init__(self):
        if min(self.max_new_tokens, self.max_queue, self.max_answer_tokens, self.max_prompt_tokens) < 1:
            raise UsageError("max_new_tokens, max_answer_tokens, max_prompt_tokens and max_queue must be >= 1")
        if self.queue_timeout_s < 0:
            raise UsageError(f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        for default, limit in (
            ("max_new_tokens", "max_new_tokens_limit"),
            ("max_answer_tokens", "max_answer_tokens_limit"),
        ):
            if getattr(self, default) > getattr(self, limit):
                raise UsageError(f"{default} {getattr(self, default)} is over {limit} {getattr(self, limit)}")
        if self.max_audio_s is not None and not self.max_audio_s > 0:
            raise UsageError(f"max_audio_s must be > 0, got {self.max_audio_s}")

    def with_audio_limit(self, export_max_audio_s: float | None) -> RequestBounds:
        """These bounds with ``max_audio_s`` set: as given, else the export's, else the training window."""
        if self.max_audio_s is not None:
            return self
        return replace(self, max_audio_s=float(export_max_audio_s or MAX_WINDOW_S))

    @property
    def audio_s(self) -> float:
        """``max_audio_s``, set (the training window where it is None)."""
        return MAX_WINDOW_S if self.max_audio_s is None else self.max_audio_s

    @property
    def queue(self) -> tuple[int, int]:
        """A Triton queue policy: (max_queue_size, timeout in microseconds; 0: no limit)."""
        return self.max_queue, round(self.queue_timeout_s * 1e6)

    def parameters(self) -> dict[str, str]:
        """The model-config parameter that carries these bounds."""
        return {PARAMETER: json.dumps(asdict(self.with_audio_limit(None)), sort_keys=True)}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> RequestBounds:
        """The bounds a model's config carries (``parameters``)."""
        try:
            return cls(**json.loads(params[PARAMETER]))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"the model's config has no valid {PARAMETER} parameter ({e}): regenerate the repository with "
                "`canary-qwen triton-repo`"
            ) from None

    def budget(self, requested: int | None, *, mode: str = ASR, least: int = 1, name: str = "max_new_tokens") -> int:
        """A request's token budget in ``mode`` (ASR or LLM): the mode's default when it names none; outside
        ``least``..the mode's limit an InputError."""
        default, limit = (
            (self.max_new_tokens, self.max_new_tokens_limit)
            if mode == ASR
            else (self.max_answer_tokens, self.max_answer_tokens_limit)
        )
        if requested is None:
            return default
        if not least <= requested <= limit:
            raise InputError(f"{name} must be between {least} and {limit}, got {requested}")
        return int(requested)

    def check_dialogue(self, tokens: int) -> None:
        """An InputError when an LLM-mode dialogue of ``tokens`` tokens is over ``max_prompt_tokens``."""
        if tokens > self.max_prompt_tokens:
            raise InputError(
                f"the dialogue takes {tokens} tokens; this server takes at most {self.max_prompt_tokens}: "
                "send a shorter one"
            )

    @property
    def llm_positions(self) -> int:
        """Sequence positions an LLM-mode request may need: the longest dialogue and the longest answer."""
        return self.max_prompt_tokens + self.max_answer_tokens_limit
