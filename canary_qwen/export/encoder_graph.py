"""Waveform -> LLM embeddings as one exportable graph (no STFT op, no complex numbers).

TensorRT has no STFT layer, so the centred STFT is a strided Conv1d whose kernels are the
windowed DFT basis (cos and -sin rows). Everything after the frontend reuses the reference
modules; for reduced precision the frontend, LayerNorms, BatchNorms, softmax and the (small) spatial
convolutions stay fp32, and kernel-1 convolutions become MatMuls so the heavy work is bf16.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..model.mel import feature_lengths, normalize_per_feature
from ..model.salm import CanaryQwen


def dft_basis(window: torch.Tensor, n_fft: int) -> torch.Tensor:
    """[2 * (n_fft // 2 + 1), 1, n_fft] conv kernels: real parts then imaginary parts of the windowed DFT.

    ``torch.stft`` centres a shorter window inside n_fft; the basis does the same.
    """
    win = torch.zeros(n_fft, dtype=torch.float64)
    left = (n_fft - window.numel()) // 2
    win[left : left + window.numel()] = window.double()
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * k * n / n_fft
    return torch.cat((torch.cos(angle) * win, -torch.sin(angle) * win)).float()[:, None, :]


class ConvMelFrontend(nn.Module):
    """Same result as ``MelFrontend`` (pre-emphasis, centred STFT, power, mel, log, normalisation)."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        cfg = reference.cfg
        self.cfg = cfg
        self.register_buffer("basis", dft_basis(reference.window.float(), cfg.n_fft))
        self.register_buffer("fb", reference.fb.float().clone())

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        feat_lens = feature_lengths(lengths, cfg.hop_length)
        in_range = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
        x = torch.cat((audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]), dim=1)
        x = torch.where(in_range, x, torch.zeros_like(x))
        x = nn.functional.pad(x[:, None, :], (cfg.n_fft // 2, cfg.n_fft // 2))
        spec = nn.functional.conv1d(x, self.basis, stride=cfg.hop_length)
        bins = cfg.n_fft // 2 + 1
        power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2
        if cfg.mag_power != 2.0:
            power = power ** (cfg.mag_power / 2)
        mel = torch.log(torch.matmul(self.fb, power) + cfg.log_zero_guard_value)
        return normalize_per_feature(mel, feat_lens), feat_lens


class Fp32(nn.Module):
    """Runs a module in fp32 inside a reduced-precision graph: LayerNorm and BatchNorm drift in bf16,
    and ONNX (opset 17) has no bf16 Conv."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy.deepcopy(module).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class PointwiseAsMatMul(nn.Module):
    """A kernel-1 Conv1d as a MatMul over [B, C, T], so it stays bf16 (the bulk of the conv module's work)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


def _reduced_precision(encoder: nn.Module) -> None:
    """Rewrite the encoder copy in place for a bf16/fp16 graph (see the module docstring)."""
    for module in list(encoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv1d) and child.kernel_size == (1,):
                setattr(module, name, PointwiseAsMatMul(child))
            elif isinstance(child, (nn.LayerNorm, nn.BatchNorm1d, nn.Conv1d, nn.Conv2d)):
                setattr(module, name, Fp32(child))
        if hasattr(module, "softmax_fp32"):
            module.softmax_fp32 = True


class EncoderGraph(nn.Module):
    """audio [B, S] float32, audio_lengths [B] int64 -> embeddings [B, T, H], embedding_lengths [B] int64."""

    def __init__(self, model: CanaryQwen, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.frontend = ConvMelFrontend(model.mel)
        self.encoder = copy.deepcopy(model.encoder)
        if dtype != torch.float32:
            _reduced_precision(self.encoder)
        self.encoder.to(dtype)
        for module in self.encoder.modules():  # .to() above cast the fp32 islands too: restore them
            if isinstance(module, Fp32):
                module.float()
        self.proj = copy.deepcopy(model.proj).to(dtype)

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel, mel_lens = self.frontend(audio, audio_lengths)
        enc, enc_lens = self.encoder(mel.to(self.dtype), mel_lens)
        return self.proj(enc), enc_lens
