"""Audio frames in place of the prompt's placeholder, as NeMo's SALM builds its LLM input.

One implementation for numpy (ONNX Runtime, Triton) and torch arrays: rows keep the type and dtype of
the token embeddings, batches are left-padded with zero vectors (NeMo pads on the left).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError

Embed = Callable[[np.ndarray], Any]  # prompt ids (int64) -> token embeddings [n, H], numpy or torch


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def _concat(parts: list) -> Any:
    if _is_numpy(parts[0]):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def _zeros(like, n: int):
    """``n`` zero rows shaped and typed like ``like``'s rows (on its device)."""
    if _is_numpy(like):
        return np.zeros((n, *like.shape[1:]), dtype=like.dtype)
    return like.new_zeros((n, *like.shape[1:]))


def splice_row(prompt: Sequence[int], audio, embed: Embed, placeholder_id: int):
    """One sequence: ``prompt``'s embeddings with its placeholder replaced by ``audio`` [T, H]."""
    ids = [int(i) for i in prompt]
    at = ids.index(placeholder_id)
    text = embed(np.asarray(ids, dtype=np.int64))
    audio = np.asarray(audio, dtype=text.dtype) if _is_numpy(text) else audio.to(text.dtype)
    return _concat([text[:at], audio, text[at + 1 :]])


def left_pad(rows: Sequence) -> tuple[Any, np.ndarray]:
    """Rows [L_i, H] -> embeddings [B, L, H] (zero vectors in front) and a numpy validity mask [B, L]."""
    width = max(len(r) for r in rows)
    mask = np.zeros((len(rows), width), dtype=bool)
    padded = []
    for i, r in enumerate(rows):
        mask[i, width - len(r) :] = True
        padded.append(_concat([_zeros(r, width - len(r)), r]))
    if _is_numpy(rows[0]):
        return np.stack(padded), mask
    import torch

    return torch.stack(padded), mask


def splice_and_pad(prompts: Sequence[Sequence[int]], audio_embeds: Sequence, embed: Embed, placeholder_id: int):
    """Row i: ``prompts[i]`` with clip i's frames spliced in; left-padded. Returns (embeds, mask)."""
    return left_pad([splice_row(p, a, embed, placeholder_id) for p, a in zip(prompts, audio_embeds)])


def check_prompt_ids(ids: np.ndarray, placeholder_id: int, vocab_rows: int) -> list[int]:
    """One row of ``PROMPT_IDS`` (as the llm model receives it) checked: exactly one placeholder, ids in range."""
    row = [int(i) for i in np.asarray(ids).reshape(-1)]
    if row.count(placeholder_id) != 1:
        raise InputError(
            f"PROMPT_IDS must hold the audio placeholder id {placeholder_id} exactly once, found {row.count(placeholder_id)}"
        )
    bad = [i for i in row if i != placeholder_id and not 0 <= i < vocab_rows]
    if bad:
        raise InputError(f"PROMPT_IDS has ids outside the vocabulary (0..{vocab_rows - 1}): {bad[:5]}")
    return row
