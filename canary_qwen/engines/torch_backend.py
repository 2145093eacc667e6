"""The reference PyTorch backend: NeMo-exact transcription without NeMo."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..model.generate import greedy_decode, splice_audio
from ..model.prompt import prompt_ids
from ..model.salm import load_model
from .base import Transcription

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but PyTorch sees no CUDA GPU (is this a CPU-only torch build?)")
    return torch.device(device)


def pad_batch(audios: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D float32 waveforms to [B, S] + lengths [B] (int64)."""
    lengths = torch.tensor([len(a) for a in audios], dtype=torch.int64)
    batch = torch.zeros(len(audios), int(lengths.max()), dtype=torch.float32)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return batch, lengths


def budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    values = list(max_new_tokens)
    if len(values) != n:
        raise ValueError(f"{len(values)} token budgets for {n} clips")
    return values


class TorchBackend:
    name = "torch"

    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "fp32", merge_lora: bool = False):
        self.device = resolve_device(device)
        self.model, self.tokenizer, self.files = load_model(
            model, dtype=DTYPES[dtype], device=self.device, merge_lora=merge_lora
        )

    @torch.inference_mode()
    def encode(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per-clip LLM embeddings [T_i, H] (padding frames dropped)."""
        audio, lengths = pad_batch(audios)
        embeds, lens = self.model.encode(audio.to(self.device), lengths.to(self.device))
        return [embeds[i, : int(lens[i])] for i in range(len(audios))]

    @torch.inference_mode()
    def transcribe(self, audios, *, prompt=None, max_new_tokens=128, on_token=None) -> list[Transcription]:
        if not len(audios):
            return []
        tok = self.tokenizer
        ids = prompt_ids(tok, prompt)
        embeds, valid = splice_audio(self.model, [ids] * len(audios), self.encode(audios), tok.placeholder_id)
        tokens = greedy_decode(
            self.model, embeds, valid, budgets(max_new_tokens, len(audios)), tok.eos_id, tok.pad_id, on_token
        )
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]
