"""Prompt splicing and greedy decoding over numpy arrays, for any decoder that runs one step at a time
(ONNX Runtime here and inside Triton). Same rules as the reference ``model.generate``."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# step(inputs_embeds [B,t,H], attention_mask [B,total] int64, position_ids [B,t] int64, caches)
#   -> (logits [B,V] float32 for the last position, new caches)
DecoderStep = Callable[[np.ndarray, np.ndarray, np.ndarray, list], tuple[np.ndarray, list]]


def splice_and_pad(
    prompts: Sequence[Sequence[int]], audio_embeds: Sequence[np.ndarray], embed_table: np.ndarray, placeholder_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row i: ``prompts[i]`` with its placeholder replaced by clip i's frames; rows are left-padded with
    zero vectors. Returns embeddings [B, L, H] (table dtype) and attention_mask [B, L] int64."""
    rows = []
    for prompt, audio in zip(prompts, audio_embeds):
        prompt = list(prompt)
        at = prompt.index(placeholder_id)
        text = np.asarray(embed_table[np.asarray(prompt, dtype=np.int64)])
        rows.append(np.concatenate((text[:at], np.asarray(audio, dtype=text.dtype), text[at + 1 :])))
    width = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        embeds[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return embeds, mask


def greedy_generate(
    step: DecoderStep,
    embed_table: np.ndarray,
    embeds: np.ndarray,
    mask: np.ndarray,
    caches: list,
    budgets: Sequence[int],
    eos_id: int,
    pad_id: int,
    on_token: Callable[[int, list[int]], None] | None = None,
) -> list[list[int]]:
    """Tokens per row (eos excluded); a row ends at eos or its budget, finished rows are fed pad."""
    budgets = np.asarray(budgets)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    logits, caches = step(embeds, mask, positions, caches)
    out: list[list[int]] = [[] for _ in budgets]
    done = budgets <= 0
    next_pos = positions[:, -1:] + 1
    n = 0
    while not done.all():
        token = np.where(done, pad_id, logits.argmax(-1))
        for i in np.flatnonzero(~done):
            if token[i] != eos_id:
                out[i].append(int(token[i]))
        if on_token is not None:
            on_token(n, token.tolist())
        n += 1
        done = done | (token == eos_id) | (n >= budgets)
        if done.all():
            break
        mask = np.concatenate((mask, np.ones((len(mask), 1), dtype=np.int64)), axis=1)
        logits, caches = step(np.asarray(embed_table[token])[:, None], mask, next_pos, caches)
        next_pos = next_pos + 1
    return out
