"""The reference PyTorch backend: NeMo-exact transcription without NeMo."""

from __future__ import annotations

import torch

from ..decoding import left_pad, token_budgets
from ..defaults import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS
from ..errors import BackendUnavailable
from ..model.generate import greedy_tokens, splice_audio
from ..model.prompt import dialogue_ids, prompt_ids
from ..model.qwen3 import adapter_off
from ..model.salm import load_model
from ..precision import resolve_precision
from .base import Transcription, pad_waveforms


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            "--device cuda was asked for but PyTorch sees no CUDA GPU (is this a CPU-only torch build?)"
        )
    return torch.device(device)


class TorchBackend:
    name = "torch"

    def __init__(self, model: str, *, device: str = "cpu", dtype: str | None = None, merge_lora: bool = False):
        self.device = resolve_device(device)
        precision = resolve_precision(self.name, dtype, self.device.type)
        assert precision is not None
        self.dtype = precision.value
        self.model, self.tokenizer, self.files = load_model(
            model, dtype=precision.torch_dtype, device=self.device, merge_lora=merge_lora
        )
        self.merged = merge_lora and self.files.config.lora is not None

    @torch.inference_mode()
    def encode(self, audios) -> list[torch.Tensor]:
        """Per-clip LLM embeddings [T_i, H] (padding frames dropped)."""
        audio, lengths = (torch.from_numpy(a).to(self.device) for a in pad_waveforms(audios))
        embeds, lens = self.model.encode(audio, lengths)
        return [embeds[i, : int(lens[i])] for i in range(len(audios))]

    @torch.inference_mode()
    def transcribe(self, audios, *, prompt=None, max_new_tokens=MAX_NEW_TOKENS) -> list[Transcription]:
        if not len(audios):
            return []
        tok = self.tokenizer
        ids = prompt_ids(tok, prompt)
        embeds, valid = splice_audio(self.model, [ids] * len(audios), self.encode(audios), tok.placeholder_id)
        tokens = greedy_tokens(
            self.model, embeds, valid, token_budgets(max_new_tokens, len(audios)), tok.eos_id, tok.pad_id
        )
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]

    @torch.inference_mode()
    def answer(self, dialogues, *, max_new_tokens=MAX_ANSWER_TOKENS) -> list[Transcription]:
        """LLM mode (``Answerer``): the dialogues decoded together, left-padded, with every LoRA pair left out."""
        if not len(dialogues):
            return []
        if self.merged:
            raise BackendUnavailable("this model's LoRA is merged into its weights: load it unmerged for LLM mode")
        tok = self.tokenizer
        rows = [self.model.embed_tokens(torch.tensor(dialogue_ids(tok, d), device=self.device)) for d in dialogues]
        embeds, valid = left_pad(rows)
        budgets = token_budgets(max_new_tokens, len(dialogues))
        with adapter_off(self.model):
            tokens = greedy_tokens(
                self.model, embeds, torch.from_numpy(valid).to(self.device), budgets, tok.eos_id, tok.pad_id
            )
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]
