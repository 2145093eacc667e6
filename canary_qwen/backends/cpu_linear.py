"""Linear layers with oneDNN-prepacked weights for the fast path on a CPU: fp32/bf16 (``PackedLinear``)
and int8 weights with int8 activations (``Int8Linear``). The ops are private to PyTorch (those its CPU
inductor backend emits), hence each class's ``available()``."""

from __future__ import annotations

import functools
import warnings
from typing import TypeGuard

import torch
from torch import nn


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX tiles, which oneDNN uses for bf16 matmuls (torch.cpu's probes, where this build has them)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_has_amx() -> bool:
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def replace_linears(module: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``module`` by ``make(weight, bias)``, and every pointwise ``nn.Conv1d``
    (kernel 1: a linear over channels, the Conformer's convolution module has two) by that linear between
    transposes; one at a time (memory grows by one matrix)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child.weight, child.bias))
        elif _is_pointwise(child):
            setattr(module, name, ChannelsFirst(make(child.weight[:, :, 0], child.bias)))
        else:
            replace_linears(child, make)


def _is_pointwise(module: nn.Module) -> TypeGuard[nn.Conv1d]:
    return (
        isinstance(module, nn.Conv1d)
        and module.kernel_size == (1,)
        and module.stride == (1,)
        and module.padding == (0,)
        and module.dilation == (1,)
        and module.groups == 1
    )


class ChannelsFirst(nn.Module):
    """A linear over dim 1 of [B, C, T] (what a kernel-1 Conv1d computes), for the Conformer's [B, T, C]
    activations seen through a transpose: the transposes are views, so a kernel-1 convolution becomes one
    prepacked matmul (oneDNN's convolution ran it at ~190 GFLOP/s fp32 here, the packed linear ~270)."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight reordered by oneDNN for this CPU, as torch.compile's CPU
    weight freezing does it."""

    ROWS_HINT = 64  # oneDNN's layout hint; 4 to 512 rows ran equally fast with it

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.ROWS_HINT)
        self.bias = None if bias is None else bias.detach()

    @staticmethod
    def available(dtype: torch.dtype = torch.float32) -> bool:
        """oneDNN's linear ops exist in this build, and for bf16 the CPU has bf16 units (AVX512-BF16 or
        AMX): without them oneDNN emulates bf16 more slowly than fp32."""
        ops = torch.ops.mkldnn
        if not (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        ):
            return False
        if dtype == torch.float32:
            return True
        return dtype == torch.bfloat16 and cpu_has_bf16_units()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows [N, K] -> (uint8 rows around zero point 128, per-row scales [N, 1]): symmetric, 127 steps a side.

    The floor keeps 127 / peak finite, so an all-zero row (padded frames are zeroed) quantizes to 128;
    rows / scale lies in [-127, 127], and + 128.5 then truncation rounds half up into [1, 255].
    """
    peak = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return (rows * (127 / peak) + 128.5).to(torch.uint8), peak / 127


def rms_norm_quantize_rows(rows: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An RMSNorm of fp32 rows (Qwen3's: ``weight * rows / rms(rows)``) quantized as ``quantize_rows`` does."""
    return quantize_rows(weight * (rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)))


def silu_gate_quantize_rows(gate_up: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` of a fused gate/up product still to be multiplied by its row ``scale``,
    quantized as ``quantize_rows`` does: the MLP between its two int8 matmuls."""
    gate, up = (gate_up * scale).chunk(2, -1)
    return quantize_rows(nn.functional.silu(gate) * up)


def bias_silu_quantize_rows(
    product: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(product * scale + bias)`` of an int8 product and its row scales, quantized as ``quantize_rows``
    does: a feed-forward between its two int8 matmuls."""
    return quantize_rows(nn.functional.silu(torch.addcmul(bias, product, scale)))


# Arguments each row kernel is compiled on, for n rows.
_EXAMPLES = {
    quantize_rows: lambda n: (torch.ones(n, 8),),
    rms_norm_quantize_rows: lambda n: (torch.ones(n, 8), torch.ones(8), 1e-6),
    silu_gate_quantize_rows: lambda n: (torch.ones(n, 8), torch.ones(n, 1)),
    bias_silu_quantize_rows: lambda n: (torch.ones(n, 8), torch.ones(n, 1), torch.ones(8)),
}


@functools.cache
def row_kernel(fn):
    """One of the row kernels above compiled by inductor into one loop per row (the row's values, peak
    and bytes while it is in cache): eager, each is several passes over memory, and the quantization
    alone was a third of the int8 linears' time at prefill sizes (docs/fast-path.md). Eager where
    compiling fails, e.g. without the C++ compiler inductor needs.

    One kernel for every row count, one row included: the row dimension is marked unbacked, so inductor
    does not specialise on one row. Its one-row kernel rounded the scales otherwise (154 of 512 rms_norm
    scales of 6144-wide rows differed alone), which at full size gave a one-clip decode other tokens."""
    compiled = torch.compile(fn, dynamic=True)

    def kernel(*args):
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() == 2:  # the rows and their [n, 1] scales
                torch._dynamo.decorators.mark_unbacked(arg, 0)
        return compiled(*args)

    try:
        with torch.inference_mode():
            for rows in (1, 2):
                kernel(*_EXAMPLES[fn](rows))
    except Exception as error:  # inductor raises several kinds (compiler missing, build failed, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"{fn.__name__} runs as eager ops (slower): torch.compile failed: {reason}", stacklevel=2)
        return fn
    return kernel


def compile_row_kernels() -> None:
    """Compile every row kernel now rather than on the first clip (~20 s each the first time on two cores,
    a few seconds from inductor's on-disk cache after)."""
    for fn in _EXAMPLES:
        row_kernel(fn)


class Int8Linear(nn.Module):
    """``x @ weight.T + bias`` in int8: the weight rounded per output channel (symmetric, 127 steps), the
    input per token (its own scale per row, as SmoothQuant's dynamic per-token scheme), int32 dot products
    (AVX512-VNNI / AMX), fp32 out. Per-token scales keep one loud token from flattening the others.

    oneDNN takes one activation scale per call, so the matmul runs with scale 1 and the row scales
    multiply its output. Activations go in as uint8 with zero point 128: oneDNN's int8 (signed)
    activation path fell back to a reference kernel ~1000x slower (torch 2.13, this CPU).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        self.weight_scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        qweight = torch.round(w / self.weight_scale[:, None]).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        self.weight_zero = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float()

    @staticmethod
    def available() -> bool:
        """oneDNN's quantized linear ops exist in this build and the CPU has int8 dot-product units."""
        ops = torch.ops.onednn
        has_ops = hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise")
        units = getattr(torch.cpu, "_is_vnni_supported", lambda: False)() or cpu_has_amx()
        return torch.backends.mkldnn.is_available() and has_ops and units

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias``, plus ``residual`` (its rows those of x) where given."""
        quantized, scale = row_kernel(quantize_rows)(x.reshape(-1, x.shape[-1]).float())
        return self.scaled(self.product(quantized), scale, residual).reshape(*x.shape[:-1], -1)

    def product(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized rows (``quantize_rows``' bytes) times the weight, in fp32, not yet times the rows' scales."""
        return torch.ops.onednn.qlinear_pointwise(
            quantized, 1.0, 128, self.packed, self.weight_scale, self.weight_zero,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip

    def scaled(self, product: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``product * scale + bias + residual`` in one pass where there is one addend."""
        if residual is not None:
            residual = residual.reshape(product.shape)
        add = self.bias if residual is None else residual if self.bias is None else residual + self.bias
        return product.mul_(scale) if add is None else torch.addcmul(add, product, scale)
