"""torch-fast's layers: the LLM's decoder layers with q/k/v and gate/up fused, over dense, oneDNN-packed or int8
linears, and the encoder's feed-forward blocks in int8 (the work between matmuls in compiled row kernels)."""

from __future__ import annotations

import torch
from torch import nn

from ..model.conformer import FeedForward
from ..model.qwen3 import DecoderLayer, apply_rope
from .cpu_linear import (
    Int8Linear,
    bias_silu_quantize_rows,
    quantize_rows,
    rms_norm_quantize_rows,
    row_kernel,
    silu_gate_quantize_rows,
)


class DenseLinear(nn.Module):
    """``x @ weight.T + bias`` over the tensors given (the fused matrices where nothing prepacks them).

    On a CPU a one-row input is computed as two rows: MKL's one-row kernel sums in another order than its
    many-row one (bf16 on CPUs without bf16 units, measured), so a sequence decoding alone would get other bits
    than in a batch. A decode step reads the weights once either way."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.device.type == "cpu":
            return nn.functional.linear(torch.cat((x, x)), self.weight, self.bias)[:1]
        return nn.functional.linear(x, self.weight, self.bias)


class FusedLayer(nn.Module):
    """A Qwen3 decoder layer (LoRA merged) with q/k/v as one matmul and gate/up as another: one pass over
    the input instead of three and two, and in int8 one activation quantization each. Every output
    element is the same dot product as the separate matrices' (in int8 exactly so: int32 sums)."""

    def __init__(self, layer: DecoderLayer, linear):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv, attn.head_dim
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv_proj = linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        self.o_proj = linear(attn.o_proj.weight)
        self.gate_up_proj = linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = linear(mlp.down_proj.weight)

    def qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] (packed tokens, before the layer's norm) -> q [N, heads, d], k/v [N, kv_heads, d], RoPE applied."""
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_projection(x).split([self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
        q = self.q_norm(q.reshape(n, self.n_heads, d))
        k = self.k_norm(k.reshape(n, self.n_kv, d))
        cos, sin = rope
        q = apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        k = apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        return q, k, v.reshape(n, self.n_kv, d)

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv_proj(self.input_norm(x))

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x plus the attention's output ([N, heads * d]) projected."""
        return x + self.o_proj(attention)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the MLP of x (after the post-attention norm)."""
        gate, up = self.gate_up_proj(self.post_norm(x)).chunk(2, -1)
        return x + self.down_proj(nn.functional.silu(gate) * up)


class Int8Layer(FusedLayer):
    """``FusedLayer`` on ``Int8Linear``s with the work between matmuls in compiled row kernels (cpu_linear):
    each norm with the quantization after it, silu(gate) * up with the gate/up product's row scales and the
    down matmul's quantization, each residual add with a matmul's row scales. Eager, these were as many
    passes over the activations as operations (~20 % of a prefill's MLP time, docs/fast-path.md)."""

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.input_norm.weight, self.input_norm.eps)
        return self.qkv_proj.scaled(self.qkv_proj.product(quantized), scale)

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attention, residual=x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.post_norm.weight, self.post_norm.eps)
        hidden, hidden_scale = row_kernel(silu_gate_quantize_rows)(self.gate_up_proj.product(quantized), scale)
        return self.down_proj.scaled(self.down_proj.product(hidden), hidden_scale, residual=x)


class Int8FeedForward(nn.Module):
    """The Conformer's feed-forward (linear, SiLU, linear) on ``Int8Linear``s, with the first one's bias
    and the SiLU fused into the second one's quantization (``bias_silu_quantize_rows``): one pass over
    the 4x wider hidden rows instead of three."""

    def __init__(self, ff: FeedForward):
        super().__init__()
        self.linear1 = Int8Linear(ff.linear1.weight)  # its bias is added in the kernel after it
        self.bias1 = ff.linear1.bias.detach().float()
        self.linear2 = Int8Linear(ff.linear2.weight, ff.linear2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(quantize_rows)(x.reshape(-1, x.shape[-1]).float())
        hidden, hidden_scale = row_kernel(bias_silu_quantize_rows)(self.linear1.product(quantized), scale, self.bias1)
        return self.linear2.scaled(self.linear2.product(hidden), hidden_scale).reshape(*x.shape[:-1], -1)
