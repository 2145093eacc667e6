"""The reference model's LLM input and greedy loop, on the shared decoding core (NeMo's ``SALM.generate``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..decoding import greedy_decode, splice_and_pad
from ..decoding.greedy import TokenCallback
from .salm import CanaryQwen


def splice_audio(
    model: CanaryQwen, prompts: Sequence[Sequence[int]], audio_embeds: Sequence[torch.Tensor], placeholder_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, L, H] with each clip's frames in its prompt, left-padded, and a validity mask [B, L]."""
    embeds, mask = splice_and_pad(
        prompts, audio_embeds, lambda ids: model.embed_tokens(torch.from_numpy(ids).to(model.device)), placeholder_id
    )
    return embeds, torch.from_numpy(mask).to(model.device)


@torch.no_grad()
def greedy_tokens(
    model: CanaryQwen,
    embeds: torch.Tensor,
    valid: torch.Tensor,
    max_new_tokens: Sequence[int],
    eos_id: int,
    pad_id: int,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """Greedy tokens per row (eos excluded) from spliced ``embeds`` with a KV cache; stop rule: the core's."""
    position = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    caches: list[list] = [[] for _ in model.llm.layers]
    seen, last = valid, position[:, -1:]

    def argmax(hidden: torch.Tensor) -> list[int]:
        return model.logits(hidden[:, -1]).argmax(-1).tolist()

    def prefill() -> list[int]:
        return argmax(model.llm(embeds, position, valid, caches))

    def step(tokens: list[int]) -> list[int]:
        nonlocal seen, last
        last = last + 1
        seen = torch.cat((seen, torch.ones(len(tokens), 1, dtype=torch.bool, device=seen.device)), dim=1)
        fed = model.embed_tokens(torch.from_numpy(np.asarray(tokens, dtype=np.int64)[:, None]).to(model.device))
        return argmax(model.llm(fed, last, seen, caches))

    return greedy_decode(prefill, step, max_new_tokens, eos_id, pad_id, on_token)
