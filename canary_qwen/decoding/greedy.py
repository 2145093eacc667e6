"""Greedy decoding as NeMo's ``SALM.generate`` (Hugging Face ``generate``, no sampling) does it.

The stop rule lives in :meth:`TokenStreams.push` alone: a row's token is kept unless it is eos, and the
row ends at eos or when it holds its budget of tokens. Every path calls it: the batch loop below (torch
reference, ONNX Runtime, the Triton ``llm`` model), the fast path's continuous-batching scheduler and the
engines whose own loop returns raw ids (TensorRT-LLM, vLLM) through :func:`until_eos`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import UsageError

# on_token(row, token, finished): token is the text token kept (None at eos); finished once the row ended.
TokenCallback = Callable[[int, "int | None", bool], None]


def token_budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One decoding budget per clip from a single budget or a per-clip list."""
    if isinstance(max_new_tokens, (int, np.integer)):
        return [int(max_new_tokens)] * n
    values = [int(v) for v in max_new_tokens]
    if len(values) != n:
        raise UsageError(f"{len(values)} token budgets for {n} clips")
    return values


class TokenStreams:
    """Generated tokens per row (eos excluded) and which rows have ended."""

    def __init__(self, budgets: Sequence[int], eos_id: int, on_token: TokenCallback | None = None):
        self.budgets = [int(b) for b in budgets]
        self.eos_id = int(eos_id)
        self.tokens: list[list[int]] = [[] for _ in self.budgets]
        self.done = [b <= 0 for b in self.budgets]
        self.on_token = on_token

    def push(self, row: int, token: int) -> bool:
        """Record ``row``'s next token; True when the row has ended (eos, or its budget is full)."""
        token = int(token)
        kept = token != self.eos_id
        if kept:
            self.tokens[row].append(token)
        finished = not kept or len(self.tokens[row]) >= self.budgets[row]
        self.done[row] = finished
        if self.on_token is not None:
            self.on_token(row, token if kept else None, finished)
        return finished

    @property
    def all_done(self) -> bool:
        return all(self.done)


def greedy_decode(
    prefill: Callable[[], Sequence[int]],
    step: Callable[[list[int]], Sequence[int]],
    budgets: Sequence[int],
    eos_id: int,
    pad_id: int,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """Tokens per row, eos excluded, for a batch that decodes in lock step.

    ``prefill()`` runs the prompts and returns each row's argmax; ``step(tokens)`` feeds one token per row
    (``pad_id`` for rows already ended, as Hugging Face does) and returns the next argmax per row.
    """
    streams = TokenStreams(budgets, eos_id, on_token)
    if streams.all_done:
        return streams.tokens
    chosen = list(prefill())
    while True:
        fed = []
        for row, token in enumerate(chosen):
            if streams.done[row]:
                fed.append(pad_id)
            else:
                streams.push(row, token)
                fed.append(int(token))
        if streams.all_done:
            return streams.tokens
        chosen = list(step(fed))


def until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The generated ids before the first eos (for engines that return their raw output ids)."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
