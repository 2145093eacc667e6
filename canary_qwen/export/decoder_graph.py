"""Qwen3 decoder step as one exportable graph: prefill and decode share it through the KV cache.

Inputs: ``inputs_embeds`` [B, t, H], ``attention_mask`` [B, past + t] (int64, 0 on left padding),
``position_ids`` [B, t], and ``past_key_{i}`` / ``past_value_{i}`` [B, kv_heads, past, head_dim]
(past may be 0). Outputs: ``logits`` [B, V] for the last position only (greedy decoding needs no
more, and the vocab projection over the whole prompt would dominate prefill) and the ``present_*``
caches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.salm import CanaryQwen


def cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    return past, present


class DecoderGraph(nn.Module):
    """Takes over ``model.llm``: its LoRA is merged in place (fp32, before any cast), so a 1.7B-parameter
    LLM is never held twice during export."""

    def __init__(self, model: CanaryQwen, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.llm = model.llm
        self.llm.merge_lora()
        self.llm.to(dtype)
        self.output_weight = nn.Parameter(model.output_weight().detach().clone().to(dtype), requires_grad=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        caches = [[past[2 * i], past[2 * i + 1]] for i in range(len(self.llm.layers))]
        hidden = self.llm(inputs_embeds, position_ids, attention_mask.bool(), caches)
        logits = nn.functional.linear(hidden[:, -1], self.output_weight).float()
        return (logits, *[t for kv in caches for t in kv])

    def example_inputs(self, batch: int = 2, steps: int = 3, past: int = 4):
        cfg = self.llm.cfg
        dtype = self.output_weight.dtype
        embeds = torch.randn(batch, steps, cfg.hidden_size, dtype=dtype)
        mask = torch.ones(batch, past + steps, dtype=torch.int64)
        positions = torch.arange(past, past + steps).expand(batch, steps).contiguous()
        kv = [
            torch.zeros(batch, cfg.num_key_value_heads, past, cfg.head_dim, dtype=dtype)
            for _ in range(2 * cfg.num_hidden_layers)
        ]
        return (embeds, mask, positions, *kv)
