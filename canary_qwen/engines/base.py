"""What an in-process engine takes and what it answers (no engine imported here)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from ..errors import CanaryQwenError, InputError
from ..model.tokenizer import QwenTokenizer
from ..modes import ASR, LLM

AUDIO, EMBEDDINGS = "audio", "embeddings"  # what an engine's request carries (StepEngine.takes)
FINISHED, CANCELLED, FAILED = "finished", "cancelled", "failed"  # how a request ends (RequestCounts)


@dataclass
class RequestCounts:
    """What a decoding loop did, counted as it happened: tokens generated for requests, and requests ended by how
    they ended (``finished``: whole answer sent; ``cancelled``: the caller left first; ``failed``: an error sent).
    Servers publish these as metrics, and tests read them to see what the code did instead of timing it.
    ``busy_s``: seconds the engine spent admitting requests and stepping (its own work; a server's time outside it is
    the serving path's); ``steps``: engine steps taken (one token for each running request)."""

    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    busy_s: float = 0.0
    steps: int = 0

    def ended(self, outcome: str, tokens: int = 0) -> None:
        """One request ended (``outcome``: FINISHED, CANCELLED or FAILED) after ``tokens`` more tokens."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.tokens += tokens

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def outcomes(self) -> dict[str, int]:
        """Requests ended, by outcome."""
        return {FINISHED: self.finished, CANCELLED: self.cancelled, FAILED: self.failed}


@dataclass(frozen=True)
class EngineRequest:
    """One row to decode, ``budget`` >= 0 new tokens. In ASR mode ``source`` is the clip that fills the prompt's
    placeholder: 16 kHz mono float32 samples [S] for an engine that takes AUDIO, its projected encoder frames
    [T, H] for one that takes EMBEDDINGS. In LLM mode ``source`` is None: ``prompt_ids`` are a text-only
    dialogue, answered with the LoRA off."""

    request_id: str
    prompt_ids: Sequence[int]
    source: np.ndarray | None
    budget: int

    @property
    def mode(self) -> str:
        return LLM if self.source is None else ASR


class StepEngine(Protocol):
    """Decodes every admitted request together; requests admitted between steps join the running batch."""

    tokenizer: QwenTokenizer
    takes: str  # AUDIO or EMBEDDINGS

    def admit(self, requests: Sequence[EngineRequest]) -> list[InputError | None]:
        """Queue requests (encoding and splicing them as one batch where the engine encodes); per request the
        InputError that refused it (its prompt does not fit the engine, say) or None."""
        ...

    def step(self) -> Iterable[tuple[str, list[int], bool]]:
        """One iteration: (request id, new token ids with eos left out, finished) per request that advanced."""
        ...

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop decoding these requests now (their slots go to the next ones)."""
        ...

    @property
    def busy(self) -> bool:
        """Whether any admitted request is unfinished."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """Where one request's answer goes; called from the engine's thread."""

    def send(self, ids: list[int], finished: bool) -> None:
        """New token ids (eos left out); ``finished`` on the last call."""
        ...

    def fail(self, error: CanaryQwenError) -> None:
        """The request ends with this error: refused by the engine (InputError), the engine failed (EngineFailed),
        or the loop stopped (BackendUnavailable)."""
        ...

    def cancelled(self) -> bool:
        """True once the caller has gone: its decoding stops at the next step."""
        ...
