"""The reference model against NeMo 3.0 itself, on tiny random SALMs of several architectures (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from nemo_ref import load_nemo, nemo_generate

from canary_qwen.backends.base import pad_waveforms
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.model.generate import splice_audio
from canary_qwen.model.prompt import prompt_ids

pytestmark = pytest.mark.nemo
MAX_NEW_TOKENS = 24
ENCODER_REL_TOL = 1e-5
LOGITS_REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pair(variant_checkpoint):
    return TorchBackend(str(variant_checkpoint)), load_nemo(variant_checkpoint)


def test_prompt_ids_match_nemo(pair):
    ours, nemo = pair
    from nemo.collections.common.prompts import PromptFormatter

    formatter = PromptFormatter.resolve("qwen")(nemo.tokenizer)
    turns = [{"role": "user", "slots": {"message": f"Transcribe the following: {nemo.audio_locator_tag}"}}]
    assert prompt_ids(ours.tokenizer, None) == formatter.encode_dialog(turns)["input_ids"].tolist()
    assert ours.tokenizer.placeholder_id == nemo.audio_locator_tag_id
    assert (ours.tokenizer.eos_id, ours.tokenizer.pad_id) == (nemo.text_eos_id, nemo.text_pad_id)


def test_encoder_embeddings_match_nemo(pair, clips):
    ours, nemo = pair
    audio, lengths = (torch.from_numpy(a) for a in pad_waveforms(clips))
    with torch.no_grad():
        ref, ref_lens = nemo.perception(input_signal=audio, input_signal_length=lengths)
        got, got_lens = ours.model.encode(audio, lengths)
    assert got_lens.tolist() == ref_lens.tolist()
    for i, n in enumerate(ref_lens.tolist()):
        assert rel_err(got[i, :n], ref[i, :n]) < ENCODER_REL_TOL


def test_prefill_logits_match_nemo(pair, clips):
    ours, nemo = pair
    tok = ours.tokenizer
    embeds = ours.encode(clips)
    inputs, valid = splice_audio(ours.model, [prompt_ids(tok, None)] * len(clips), embeds, tok.placeholder_id)
    with torch.no_grad():
        ref = nemo(inputs, attention_mask=valid)["logits"]
        position = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        got = ours.model.logits(ours.model.llm(inputs, position, valid))
    assert rel_err(got[valid], ref[valid]) < LOGITS_REL_TOL


def test_greedy_tokens_identical_to_nemo(pair, clips):
    ours, nemo = pair
    expected = nemo_generate(nemo, clips, MAX_NEW_TOKENS)
    got = ours.transcribe(clips, max_new_tokens=MAX_NEW_TOKENS)
    assert [t.token_ids for t in got] == expected
    assert len({tuple(e) for e in expected}) > 1, "degenerate test: every clip decoded to the same tokens"


def test_custom_prompt_tokens_identical_to_nemo(pair, clips):
    ours, nemo = pair
    expected = nemo_generate(nemo, clips[:2], 8, prompt="Repeat after me:")
    got = ours.transcribe(clips[:2], prompt="Repeat after me:", max_new_tokens=8)
    assert [t.token_ids for t in got] == expected


def test_nemo_saved_checkpoint_loads_here(tmp_path, tiny_checkpoint, clips):
    """NeMo -> ours: re-randomise a NeMo SALM, save_pretrained it, load it here, same tokens."""
    nemo = load_nemo(tiny_checkpoint)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in nemo.named_parameters():
            if "lora_B" in name or name.startswith("perception.encoder.layers.0"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    nemo.save_pretrained(tmp_path / "saved")
    ours = TorchBackend(str(tmp_path / "saved"))
    assert [t.token_ids for t in ours.transcribe(clips, max_new_tokens=12)] == nemo_generate(nemo, clips, 12)


def test_early_eos_and_padding_rows_match_nemo(eos_prone_checkpoint, eos_prone_clips):
    """Rows that stop at eos while others go on: NeMo feeds them pad; the kept tokens must agree."""
    expected = nemo_generate(load_nemo(eos_prone_checkpoint), eos_prone_clips, MAX_NEW_TOKENS)
    got = TorchBackend(str(eos_prone_checkpoint)).transcribe(eos_prone_clips, max_new_tokens=MAX_NEW_TOKENS)
    assert [t.token_ids for t in got] == expected
    lengths = [len(e) for e in expected]
    assert min(lengths) < MAX_NEW_TOKENS and max(lengths) == MAX_NEW_TOKENS, lengths
