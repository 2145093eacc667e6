"""Qwen3 decoder with optional (unmerged) LoRA on its projections, matching HF ``Qwen3ForCausalLM``
plus PEFT numerically, with a KV cache for greedy decoding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import LlmConfig, LoraConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoraLinear(nn.Linear):
    """``nn.Linear`` that may carry a LoRA pair; ``merge()`` folds it in (W += scaling * B @ A, fp32).
    ``adapter_on`` False leaves the pair out (LLM mode, :func:`adapter_off`)."""

    def __init__(self, in_features: int, out_features: int, lora: LoraConfig | None):
        super().__init__(in_features, out_features, bias=False)
        self.scaling = lora.scaling if lora else 0.0
        self.lora_A = nn.Parameter(torch.zeros(lora.r, in_features)) if lora else None
        self.lora_B = nn.Parameter(torch.zeros(out_features, lora.r)) if lora else None
        self.adapter_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.lora_A is not None and self.adapter_on:
            out = out + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.lora_A is None:
            return
        delta = self.lora_B.float() @ self.lora_A.float() * self.scaling
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.lora_A = self.lora_B = None


@contextmanager
def adapter_off(module: nn.Module) -> Iterator[None]:
    """Every LoRA pair below ``module`` left out while inside (PEFT's ``disable_adapter``, NeMo's LLM mode)."""
    layers = [m for m in module.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.adapter_on = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_on = True


def merge_lora(module: nn.Module) -> None:
    """Fold every LoRA pair below ``module`` into its weight."""
    for child in module.modules():
        if isinstance(child, LoraLinear):
            child.merge()


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each KV head for its query heads (expand+reshape exports cleanly)."""
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_heads // n_kv, s, d).reshape(b, n_heads, s, d)


class Attention(nn.Module):
    def __init__(self, cfg: LlmConfig, lora: LoraConfig | None):
        super().__init__()
        targets = set(lora.target_modules) if lora else set()
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.n_heads, self.n_kv = hd, nh, nkv
        self.q_proj = LoraLinear(cfg.hidden_size, nh * hd, lora if "q_proj" in targets else None)
        self.k_proj = LoraLinear(cfg.hidden_size, nkv * hd, lora if "k_proj" in targets else None)
        self.v_proj = LoraLinear(cfg.hidden_size, nkv * hd, lora if "v_proj" in targets else None)
        self.o_proj = LoraLinear(nh * hd, cfg.hidden_size, lora if "o_proj" in targets else None)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: list | None):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if cache:
                k = torch.cat((cache[0], k), dim=2)
                v = torch.cat((cache[1], v), dim=2)
            cache[:] = [k, v]
        k, v = _expand_kv(k, self.n_heads), _expand_kv(v, self.n_heads)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlmConfig, lora: LoraConfig | None):
        super().__init__()
        targets = set(lora.target_modules) if lora else set()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = LoraLinear(h, f, lora if "gate_proj" in targets else None)
        self.up_proj = LoraLinear(h, f, lora if "up_proj" in targets else None)
        self.down_proj = LoraLinear(f, h, lora if "down_proj" in targets else None)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlmConfig, lora: LoraConfig | None):
        super().__init__()
        self.self_attn = Attention(cfg, lora)
        self.mlp = MLP(cfg, lora)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """Boolean [B, 1, q, k] mask: causal over the last ``query_len`` positions and no padded keys.

    A left-padded query row would see no key at all; it is let see its causal prefix instead so
    sdpa never produces NaN (those rows are padding and never read).
    """
    k_len = key_valid.shape[1]
    q_pos = torch.arange(k_len - query_len, k_len, device=key_valid.device)
    causal = torch.arange(k_len, device=key_valid.device)[None, :] <= q_pos[:, None]
    allowed = causal[None] & key_valid[:, None, :]
    query_is_pad = ~key_valid[:, k_len - query_len :]
    allowed = allowed | (causal[None] & query_is_pad[:, :, None])
    return allowed[:, None]


class Qwen3(nn.Module):
    """The decoder stack; token embeddings live outside (as in NeMo's SALM) and are passed in."""

    def __init__(self, cfg: LlmConfig, lora: LoraConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg, lora) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds, position_ids, key_valid, caches: list[list] | None = None) -> torch.Tensor:
        """embeds [B, t, H] at ``position_ids`` [B, t]; ``key_valid`` [B, past + t]. Returns hidden [B, t, H]."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        mask = attention_mask(key_valid, embeds.shape[1])
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, caches[i] if caches is not None else None)
        return self.norm(x)

    def merge_lora(self) -> None:
        merge_lora(self)
