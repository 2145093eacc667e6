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


def nemo_dialogue_ids(model, turns, prompt_format=None):
    """NeMo's prompt ids for a text-only dialogue (``turns``: dicts with role and content), in the model's format."""
    import copy

    from nemo.collections.common.prompts import PromptFormatter

    formatter = PromptFormatter.resolve(prompt_format or model.cfg.prompt_format)(model.tokenizer)
    return formatter.encode_dialog(turns=copy.deepcopy(turns))["input_ids"].tolist()


@torch.no_grad()
def nemo_answer(model, turns, max_new_tokens):
    """NeMo's LLM mode as the model card runs it: ``generate`` on a text-only dialogue inside
    ``model.llm.disable_adapter()``. Text-only ``generate`` returns the prompt ids before the answer: they are
    checked against the formatter's and cut off; the answer is cut at the first eos (eos excluded)."""
    import copy

    prompt = nemo_dialogue_ids(model, turns)
    with model.llm.disable_adapter():
        (row,) = model.generate(prompts=[copy.deepcopy(turns)], max_new_tokens=max_new_tokens).tolist()
    assert row[: len(prompt)] == prompt, "NeMo's text-only generate no longer returns the prompt first"
    answer = row[len(prompt) :]
    return answer[: answer.index(model.text_eos_id)] if model.text_eos_id in answer else answer
