"""NeMo 3.0's ``SALM.generate`` behind the ``Transcriber`` interface, called exactly as its users (and the
Open ASR leaderboard script) call it: the reference every other path is measured against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..decoding import token_budgets, until_eos
from ..defaults import MAX_NEW_TOKENS
from ..errors import BackendUnavailable
from ..model.prompt import user_message
from ..precision import resolve_precision
from .base import Transcription, pad_waveforms


class NemoBackend:
    name = "nemo"
    # SALM.generate takes one max_new_tokens for the whole batch: per-clip budgets become their maximum.
    budget_scope = "per-batch"

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: str | None = None):
        try:
            from nemo.collections.speechlm2.models import SALM
        except ImportError as e:
            raise BackendUnavailable(f"NeMo is not installed (pip install 'canary-qwen[nemo]'): {e}") from None
        import torch
        from transformers import GenerationConfig

        from .torch_ref import resolve_device

        self.torch, self.generation_config = torch, GenerationConfig
        self.device = device
        self.torch_device = resolve_device(device)
        precision = resolve_precision(self.name, dtype, self.torch_device.type)
        assert precision is not None
        self.dtype = precision.value
        self.model = SALM.from_pretrained(str(model_dir)).eval().to(precision.torch_dtype).to(self.torch_device)

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        *,
        prompt: str | None = None,
        max_new_tokens: int | Sequence[int] = MAX_NEW_TOKENS,
    ) -> list[Transcription]:
        if not len(audios):
            return []
        torch, model = self.torch, self.model
        message = user_message(prompt, model.audio_locator_tag)
        audio, lengths = pad_waveforms(audios)
        with torch.inference_mode():
            out = model.generate(
                prompts=[[{"role": "user", "content": message}]] * len(audios),
                audios=torch.from_numpy(audio).to(self.torch_device, non_blocking=True),
                audio_lens=torch.from_numpy(lengths).to(self.torch_device, non_blocking=True),
                # NeMo's own default config (greedy; its bos/eos/pad ids) with this batch's budget.
                generation_config=self.generation_config(
                    max_new_tokens=max(token_budgets(max_new_tokens, len(audios))),
                    bos_token_id=model.text_bos_id,
                    eos_token_id=model.text_eos_id,
                    pad_token_id=model.text_pad_id,
                ),
            )
        results = []
        for row in out.cpu().tolist():
            ids = until_eos(row, model.text_eos_id)
            results.append(Transcription(text=model.tokenizer.ids_to_text(ids).strip(), token_ids=ids))
        return results
