"""torch-fast's layers: the LLM's decoder layers with q/k/v and gate/up fused, over dense, oneDNN-packed or int8
linears, the speech LoRA kept beside them and applied per row, and the encoder's feed-forward blocks in int8 (the
work between matmuls in compiled row kernels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.conformer import FeedForward
from ..model.qwen3 import DecoderLayer, LoraLinear, apply_rope
from .cpu_linear import (
    Int8Linear,
    bias_silu_quantize_rows,
    quantize_rows,
    rms_norm_quantize_rows,
    row_kernel,
    silu_gate_quantize_rows,
)

# MKL's fp32 sgemm gives a row the same bits at 16 rows and more whatever their count, and other bits at 1-15 rows
# (Intel Xeon, the full-size LoRA's shapes: 2048 -> 256 and 128 -> 2048/1024). The LoRA's matrices are small, so its
# rows are always computed 16 or more at a time: a served request, decoded beside however many others, gets the
# bits of a local batch.
LORA_MIN_ROWS = 16


class DenseLinear(nn.Module):
    """``x @ weight.T + bias`` over the tensors given (the fused matrices where nothing prepacks them).

    On a CPU an input of fewer than ``min_rows`` rows is computed padded to that many: MKL picks its kernel by the
    row count, and a few rows sum in another order than many (a one-row input, bf16 on CPUs without bf16 units;
    1-15 rows of fp32 on an Intel Xeon at the LoRA's shapes, measured), so a sequence decoding alone, or beside a
    few others, would get other bits than in a batch. Two rows (the default) cost a decode step nothing extra: it
    reads the weights once either way."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, min_rows: int = 2):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows < self.min_rows and x.device.type == "cpu":
            padded = torch.cat((x, x.new_zeros(self.min_rows - rows, *x.shape[1:])))
            return nn.functional.linear(padded, self.weight, self.bias)[:rows]
        return nn.functional.linear(x, self.weight, self.bias)


class LoraPath(nn.Module):
    """The LoRA pairs of one fused projection, kept beside its weight and added per row: ``add(out, x, on)`` adds
    ``scaling * B (A x)`` to each pair's columns of ``out`` in the rows where ``on`` [N, 1] is 1 (ASR rows) and
    nothing where it is 0 (LLM rows), so both modes share one batch and one set of weights. The pairs' A matrices
    take the same input and run as one matmul. ``x * 1`` and ``out + 0`` are exact: a row gets the bits it gets in
    a batch of its own mode."""

    def __init__(self, projections: Sequence[LoraLinear]):
        super().__init__()
        pairs = _lora_pairs(projections)
        self.down = DenseLinear(torch.cat([a for a, _, _, _ in pairs]), min_rows=LORA_MIN_ROWS)
        self.ups = []  # (first rank row, rank, first output column, B, scaling)
        rank_start = 0
        for a, b, scaling, column in pairs:
            self.ups.append((rank_start, a.shape[0], column, DenseLinear(b, min_rows=LORA_MIN_ROWS), scaling))
            rank_start += a.shape[0]

    @classmethod
    def of(cls, projections: Sequence[LoraLinear]) -> LoraPath | None:
        return cls(projections) if any(p.lora_A is not None for p in projections) else None

    def add(self, out: torch.Tensor, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        low = self.down(x)
        for rank_start, rank, column, up, scaling in self.ups:
            delta = up(low[:, rank_start : rank_start + rank]) * scaling * on
            out[:, column : column + delta.shape[1]] += delta
        return out


def _lora_pairs(projections: Sequence[LoraLinear]) -> list[tuple[torch.Tensor, torch.Tensor, float, int]]:
    """(A, B, scaling, first output column in the fused matrix) of each projection that has a pair (the projections'
    outputs stacked in order)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor, float, int]] = []
    column = 0
    for p in projections:
        if p.lora_A is not None and p.lora_B is not None:
            pairs.append((p.lora_A, p.lora_B, p.scaling, column))
        column += p.weight.shape[0]
    return pairs


class FusedLayer(nn.Module):
    """A Qwen3 decoder layer with q/k/v as one matmul and gate/up as another: one pass over the input instead of
    three and two, and in int8 one activation quantization each. Every output element is the same dot product as
    the separate matrices' (in int8 exactly so: int32 sums). The LoRA pairs stay unmerged (``LoraPath``); every
    method takes ``on`` [N, 1], 1 for the rows decoded with the adapter (ASR) and 0 for those without (LLM)."""

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
        self.qkv_lora = LoraPath.of([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_lora = LoraPath.of([attn.o_proj])
        self.gate_up_lora = LoraPath.of([mlp.gate_proj, mlp.up_proj])
        self.down_lora = LoraPath.of([mlp.down_proj])

    def qkv(self, x: torch.Tensor, rope, on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] (packed tokens, before the layer's norm) -> q [N, heads, d], k/v [N, kv_heads, d], RoPE applied."""
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_projection(x, on).split([self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
        q = self.q_norm(q.reshape(n, self.n_heads, d))
        k = self.k_norm(k.reshape(n, self.n_kv, d))
        cos, sin = rope
        q = apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        k = apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        return q, k, v.reshape(n, self.n_kv, d)

    @staticmethod
    def _with_lora(out: torch.Tensor, lora: LoraPath | None, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        return out if lora is None else lora.add(out, x, on)

    def qkv_projection(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        normed = self.input_norm(x)
        return self._with_lora(self.qkv_proj(normed), self.qkv_lora, normed, on)

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """x plus the attention's output ([N, heads * d]) projected."""
        return x + self._with_lora(self.o_proj(attention), self.o_lora, attention, on)

    def mlp_residual(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """x plus the MLP of x (after the post-attention norm)."""
        normed = self.post_norm(x)
        gate, up = self._with_lora(self.gate_up_proj(normed), self.gate_up_lora, normed, on).chunk(2, -1)
        hidden = nn.functional.silu(gate) * up
        return x + self._with_lora(self.down_proj(hidden), self.down_lora, hidden, on)


class Int8Layer(FusedLayer):
    """``FusedLayer`` on ``Int8Linear``s with the work between matmuls in compiled row kernels (cpu_linear):
    each norm with the quantization after it, silu(gate) * up with the gate/up product's row scales and the
    down matmul's quantization, each residual add with a matmul's row scales. Eager, these were as many
    passes over the activations as operations (~20 % of a prefill's MLP time, docs/fast-path.md). The LoRA pairs
    run in fp32 on the fp32 activations (the norm's output is computed apart for them)."""

    def qkv_projection(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.input_norm.weight, self.input_norm.eps)
        out = self.qkv_proj.scaled(self.qkv_proj.product(quantized), scale)
        return out if self.qkv_lora is None else self.qkv_lora.add(out, self.input_norm(x), on)

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        out = self.o_proj(attention, residual=x)
        return out if self.o_lora is None else self.o_lora.add(out, attention, on)

    def mlp_residual(self, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.post_norm.weight, self.post_norm.eps)
        if self.gate_up_lora is None and self.down_lora is None:
            hidden, hidden_scale = row_kernel(silu_gate_quantize_rows)(self.gate_up_proj.product(quantized), scale)
            return self.down_proj.scaled(self.down_proj.product(hidden), hidden_scale, residual=x)
        # LoRA on the MLP (not in the released model): its pairs need the fp32 activations between the matmuls.
        gate_up = self.gate_up_proj.scaled(self.gate_up_proj.product(quantized), scale)
        if self.gate_up_lora is not None:
            self.gate_up_lora.add(gate_up, self.post_norm(x), on)
        gate, up = gate_up.chunk(2, -1)
        hidden = nn.functional.silu(gate) * up
        out = self.down_proj(hidden, residual=x)
        return out if self.down_lora is None else self.down_lora.add(out, hidden, on)


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
