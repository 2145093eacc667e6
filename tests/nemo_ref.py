"""NeMo 3.0 as the reference: load a checkpoint and run its own generate / perception / LLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def load_nemo(checkpoint):
    nemo_salm = pytest.importorskip(
        "nemo.collections.speechlm2.models", reason="nemo-toolkit[asr]==3.0.0 is not installed"
    )
    return nemo_salm.SALM.from_pretrained(str(checkpoint)).eval()


def pad(clips):
    lengths = torch.tensor([len(c) for c in clips])
    audio = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(np.asarray(c))
    return audio, lengths


@torch.no_grad()
def nemo_generate(model, clips, max_new_tokens, prompt="Transcribe the following:"):
    """Token ids per clip, cut at the first eos (eos excluded), as NeMo users read them."""
    audio, lengths = pad(clips)
    message = f"{prompt} {model.audio_locator_tag}"
    out = model.generate(
        prompts=[[{"role": "user", "content": message}]] * len(clips),
        audios=audio,
        audio_lens=lengths,
        max_new_tokens=max_new_tokens,
    )
    result = []
    for row in out.tolist():
        result.append(row[: row.index(model.text_eos_id)] if model.text_eos_id in row else row)
    return result
