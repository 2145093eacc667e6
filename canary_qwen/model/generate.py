"""Prompt splicing and greedy decoding, as NeMo's ``SALM.generate`` + HF ``generate`` do them."""
from __future__ import annotations

from typing import Sequence

import torch

from .salm import CanaryQwen


def splice_audio(
    model: CanaryQwen, prompts: Sequence[Sequence[int]], audio_embeds: Sequence[torch.Tensor], placeholder_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each prompt's placeholder by its clip's frames; left-pad with zero vectors.

    Returns embeddings [B, L, H] and a validity mask [B, L] (False on padding).
    """
    rows = []
    for ids, audio in zip(prompts, audio_embeds):
        at = list(ids).index(placeholder_id)
        ids_t = torch.tensor(ids, device=model.device)
        text = model.embed_tokens(ids_t)
        rows.append(torch.cat((text[:at], audio.to(text.dtype), text[at + 1 :]), dim=0))
    width = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype, device=model.device)
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=model.device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0] :] = r
        valid[i, width - r.shape[0] :] = True
    return embeds, valid


@torch.no_grad()
def greedy_decode(
    model: CanaryQwen,
    embeds: torch.Tensor,
    valid: torch.Tensor,
    max_new_tokens: Sequence[int],
    eos_id: int,
    pad_id: int,
    on_token=None,
) -> list[list[int]]:
    """Greedy tokens per row, eos excluded. A row stops at eos or its own budget; the batch stops
    when every row has. ``on_token(step, tokens)`` sees each step's new token per row (pad once done)."""
    batch = embeds.shape[0]
    budgets = torch.tensor(list(max_new_tokens), device=embeds.device)
    position = valid.long().cumsum(-1) - 1
    position = position.masked_fill(~valid, 0)
    caches = [[] for _ in model.llm.layers]
    hidden = model.llm(embeds, position, valid, caches)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = budgets <= 0
    step = 0
    last_pos = position[:, -1:]
    while not bool(done.all()):
        token = model.logits(hidden[:, -1]).argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for i in (~done).nonzero().flatten().tolist():
            if int(token[i]) != eos_id:
                out[i].append(int(token[i]))
        if on_token is not None:
            on_token(step, token.tolist())
        step += 1
        done = done | (token == eos_id) | (step >= budgets)
        if bool(done.all()):
            break
        last_pos = last_pos + 1
        valid = torch.cat((valid, torch.ones(batch, 1, dtype=torch.bool, device=valid.device)), dim=1)
        hidden = model.llm(model.embed_tokens(token[:, None]), last_pos, valid, caches)
    return out
