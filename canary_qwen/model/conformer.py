"""FastConformer encoder (NeMo ``ConformerEncoder``, rel_pos attention, dw_striding x8, eval mode).

Module and parameter names mirror NeMo's so checkpoint keys load without renaming.
Padded frames never influence valid ones: attention masks padded keys, the convolution
module zeroes padded frames before its depthwise conv, everything else is per-frame.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import EncoderConfig

MASK_VALUE = -10000.0


def subsampled_lengths(lengths: torch.Tensor, n_convs: int) -> torch.Tensor:
    """Length after ``n_convs`` stride-2, kernel-3, padding-1 convolutions."""
    for _ in range(n_convs):
        lengths = torch.div(lengths + 2 - 3, 2, rounding_mode="floor") + 1
    return lengths


def rel_positional_encoding(length: int, d_model: int, device, dtype) -> torch.Tensor:
    """Sinusoids for relative positions length-1 ... -(length-1): [1, 2*length-1, d_model]."""
    # an int64 range cast to float: exported as an integer ONNX Range, the one TensorRT's parser handles well
    positions = torch.arange(length - 1, -length, -1, device=device).to(torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    angles = positions * div_term
    # sin on even dims, cos on odd dims, interleaved without in-place writes (exports as plain ops)
    pe = torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).reshape(positions.shape[0], d_model)
    return pe.unsqueeze(0).to(dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL shift: [b, h, t, 2t-1] scores by relative position -> [b, h, t, 2t-1] aligned."""
    b, h, t, p = x.shape
    x = nn.functional.pad(x, (1, 0)).view(b, h, p + 1, t)
    return x[:, :, 1:].reshape(b, h, t, p)


class ConvSubsampling(nn.Module):
    """dw_striding: Conv2d(1->C, s2), ReLU, then [depthwise s2, pointwise, ReLU] x (n-1), Linear."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c = cfg.subsampling_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, 2, 1), nn.ReLU()]
        for _ in range(cfg.n_subsampling_convs - 1):
            layers += [nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        # Positions of the strided convs, fixed here so wrapping a layer (export) cannot change them.
        self.strided = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1)]
        freq = cfg.feat_in
        for _ in range(cfg.n_subsampling_convs):
            freq = (freq + 2 - 3) // 2 + 1
        self.out = nn.Linear(c * freq, cfg.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, F] -> [B, 1, T, F]; frames past each clip's current length are zeroed before
        # every strided conv, as NeMo's MaskedConvSequential does.
        x = x.unsqueeze(1)
        for i, layer in enumerate(self.conv):
            if i in self.strided:
                x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None])[:, None, :, None].to(
                    x.dtype
                )
                lengths = subsampled_lengths(lengths, 1)
            x = layer(x)
        x = x * (torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None])[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(nn.functional.silu(self.linear1(x)))


class RelPositionAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.h, self.d_k = h, d // h
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.d_k))
        # Exported reduced-precision graphs take the softmax in fp32; NeMo's own bf16 run does not.
        self.softmax_fp32 = False

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        # key_pad: [B, T] True at padded frames; a score is masked when its query or key is padding.
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))[..., :t]
        scores = (ac + bd) / math.sqrt(self.d_k)
        mask = (key_pad[:, None, :] | key_pad[:, :, None])[:, None]
        scores = scores.masked_fill(mask, MASK_VALUE)
        attn = torch.softmax(scores.float() if self.softmax_fp32 else scores, dim=-1).to(v.dtype).masked_fill(mask, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class ConvModule(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise_conv = nn.Conv1d(d, d, cfg.conv_kernel_size, padding=(cfg.conv_kernel_size - 1) // 2, groups=d)
        self.batch_norm = nn.BatchNorm1d(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1)

    def forward(self, x: torch.Tensor, key_pad: torch.Tensor) -> torch.Tensor:
        pad = key_pad[:, None, :]
        x = self.pointwise_conv1(x.transpose(1, 2).masked_fill(pad, 0.0))
        x = nn.functional.glu(x, dim=1).masked_fill(pad, 0.0)
        x = nn.functional.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, cfg.d_ff)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionAttention(cfg)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, cfg.d_ff)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos_emb, key_pad):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), pos_emb, key_pad)
        x = x + self.conv(self.norm_conv(x), key_pad)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """Mel [B, F, T] + lengths -> encoded [B, T', d_model] + lengths (T' = ceil(T / 8))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.pre_encode(mel.transpose(1, 2), lengths)
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        t = x.shape[1]
        pos_emb = rel_positional_encoding(t, self.cfg.d_model, x.device, x.dtype)
        key_pad = torch.arange(t, device=x.device)[None, :] >= lengths[:, None]
        for layer in self.layers:
            x = layer(x, pos_emb, key_pad)
        return x, lengths
