"""Log-mel frontend, numerically identical to NeMo's ``FilterbankFeatures`` in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from .config import PreprocessorConfig


def feature_lengths(sample_lengths: torch.Tensor, hop_length: int) -> torch.Tensor:
    """Valid mel frames per clip: floor(samples / hop) (centred STFT with an even n_fft)."""
    return torch.div(sample_lengths, hop_length, rounding_mode="floor").long()


def normalize_per_feature(x: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean/std over the valid frames of each clip (std with N-1), padded frames set to 0."""
    valid = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
    count = valid.sum(1, keepdim=True).to(x.dtype)
    mean = torch.where(valid[:, None], x, 0.0).sum(2) / count
    centered = torch.where(valid[:, None], x - mean[:, :, None], 0.0)
    std = torch.sqrt(centered.pow(2).sum(2) / (count - 1.0))
    std = std.masked_fill(std.isnan(), 0.0) + eps
    return ((x - mean[:, :, None]) / std[:, :, None]).masked_fill(~valid[:, None], 0.0)


class MelFrontend(nn.Module):
    """Waveform [B, S] float32 -> normalised log-mel [B, n_mels, T] float32.

    ``window`` and ``fb`` are the checkpoint's own buffers (bf16-rounded in the real model),
    so the frontend never recomputes them.
    """

    def __init__(self, cfg: PreprocessorConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.zeros(cfg.win_length))
        self.register_buffer("fb", torch.zeros(1, cfg.features, cfg.n_fft // 2 + 1))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        audio = audio.float()
        feat_lens = feature_lengths(lengths, cfg.hop_length)
        in_range = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
        x = torch.cat((audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]), dim=1).masked_fill(~in_range, 0.0)
        spec = torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            center=True,
            window=self.window.float(),
            return_complex=True,
            pad_mode="constant",
        )
        power = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1)).pow(cfg.mag_power)
        mel = torch.log(torch.matmul(self.fb.float(), power) + cfg.log_zero_guard_value)
        return normalize_per_feature(mel, feat_lens), feat_lens
