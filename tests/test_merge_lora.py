"""The merged Hugging Face Qwen3 checkpoint (for TensorRT-LLM) against our unmerged LoRA reference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from canary_qwen.backends.base import pad_waveforms
from canary_qwen.errors import CheckpointError, UsageError
from canary_qwen.export.merge_lora import merge_lora_checkpoint
from canary_qwen.model.generate import greedy_tokens, splice_audio
from canary_qwen.model.prompt import prompt_ids
from canary_qwen.model.salm import load_model
from canary_qwen.model.synthetic import make_checkpoint
from canary_qwen.model.tokenizer import QwenTokenizer

transformers = pytest.importorskip("transformers")

LOGITS_REL_TOL = 1e-5
TEXT_PROMPTS = [
    f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    for text in (
        "Transcribe the following: hello world",
        "the quick brown fox jumps over the lazy dog, 0 1 2 3",
        "She sells sea shells",
        "numbers 7 8 9",
    )
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def read_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def load_hf(directory):
    return transformers.Qwen3ForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged(tiny_checkpoint, tmp_path_factory):
    return merge_lora_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("merged") / "llm", dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_model(merged):
    return load_hf(merged)


def prefill_reference(model, inputs, valid):
    position = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
    with torch.no_grad():
        return model.logits(model.llm(inputs, position, valid)), position


def test_prefill_logits_on_spliced_audio_match_unmerged_lora(variant_checkpoint, tmp_path, clips):
    """Every architecture variant (q/v LoRA, no LoRA, LoRA on all attention projections), left-padded batch."""
    model, tok, _ = load_model(variant_checkpoint)
    hf = load_hf(merge_lora_checkpoint(variant_checkpoint, tmp_path / "llm", dtype="float32"))
    audio, lengths = (torch.from_numpy(a) for a in pad_waveforms(clips))
    with torch.no_grad():
        enc, enc_lens = model.encode(audio, lengths)
    audio_embeds = [enc[i, :n] for i, n in enumerate(enc_lens.tolist())]
    inputs, valid = splice_audio(model, [prompt_ids(tok, None)] * len(clips), audio_embeds, tok.placeholder_id)
    assert not bool(valid.all())  # the batch really is left-padded
    ref, position = prefill_reference(model, inputs, valid)
    with torch.no_grad():
        got = hf(inputs_embeds=inputs, attention_mask=valid.long(), position_ids=position).logits.float()
    assert rel_err(got[valid], ref[valid]) < LOGITS_REL_TOL


def test_lm_head_is_written_and_equals_embeddings(merged):
    tensors = read_tensors(merged)
    assert "lm_head.weight" in tensors
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True


def test_tensor_names_are_standard_hf(merged, reference):
    llm_cfg = reference[0].llm_cfg
    per_layer = [
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{m}.weight" for i in range(llm_cfg.num_hidden_layers) for m in per_layer}
    assert set(read_tensors(merged)) == expected
    assert [p.name for p in merged.glob("*.safetensors")] == ["model.safetensors"]


@pytest.fixture(scope="module")
def eos_prone(tmp_path_factory):
    """Tiny seed 0 with <|im_end|>'s (tied) embedding scaled x2.5: on TEXT_PROMPTS two rows stop at eos."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("eos") / "ckpt", "tiny", seed=0)
    tensors = load_file(ckpt / "model.safetensors")
    eos = QwenTokenizer(ckpt, "<|audioplaceholder|>").eos_id
    tensors["embed_tokens.weight"][eos] *= 2.5
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return ckpt


def test_greedy_generate_matches_ours(eos_prone, tmp_path):
    """Left-padded text-only batch; transformers' generate runs from the written generation_config.json."""
    model, tok, _ = load_model(eos_prone)
    hf = load_hf(merge_lora_checkpoint(eos_prone, tmp_path / "llm", dtype="float32"))
    max_new = 24
    prompts = [tok.encode(p) for p in TEXT_PROMPTS]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    ours = greedy_tokens(model, model.embed_tokens(ids), valid, [max_new] * len(prompts), tok.eos_id, tok.pad_id)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=max_new)
    for row, want in zip(out[:, width:].tolist(), ours):
        got = row[: row.index(tok.eos_id)] if tok.eos_id in row else row  # ours stops before eos
        assert got == want
    lengths = [len(w) for w in ours]
    assert any(0 < n < max_new for n in lengths) and max_new in lengths  # some rows hit eos, some the budget


def test_config_and_generation_config_ids(merged, reference):
    _, tok, files = reference
    config = transformers.AutoConfig.from_pretrained(str(merged))
    assert config.model_type == "qwen3" and config.architectures == ["Qwen3ForCausalLM"]
    assert (config.eos_token_id, config.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert config.head_dim == files.llm_config.head_dim and config.vocab_size == files.llm_config.vocab_size
    raw = json.loads((merged / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "float32"
    assert raw["rope_theta"] == files.llm_config.rope_theta
    gen = transformers.GenerationConfig.from_pretrained(str(merged))
    assert gen.do_sample is False and gen.num_beams == 1
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert gen.bos_token_id == files.llm_config.raw["bos_token_id"]
    assert tok.token_to_id("<|im_end|>") == tok.eos_id and tok.token_to_id("<|endoftext|>") == tok.pad_id


def test_tokenizer_matches_ours_without_placeholder(merged, reference):
    _, tok, _ = reference
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(merged))
    for text in TEXT_PROMPTS + ["Speech recognition: 12 numbers, <think>ok</think> done."]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert tok.audio_locator_tag not in hf_tok.get_vocab()
    assert len(hf_tok) == len(tok) - 1  # ours adds the placeholder in memory; the merged one does not
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"


def test_placeholder_is_dropped_from_a_saved_tokenizer(tmp_path):
    """A tokenizer saved after NeMo added the placeholder still yields a merged tokenizer without it."""
    from tokenizers import AddedToken, Tokenizer

    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    tag = json.loads((ckpt / "config.json").read_text())["audio_locator_tag"]
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(tag, special=True, normalized=False)])
    tokenizer.save(str(ckpt / "tokenizer.json"))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(tokenizer.token_to_id(tag))] = {"content": tag, "special": True}
    config["additional_special_tokens"] = [tag]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    out = merge_lora_checkpoint(ckpt, tmp_path / "llm", dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tag not in hf_tok.get_vocab()
    assert len(hf_tok) == tokenizer.get_vocab_size(with_added_tokens=True) - 1


def test_merge_math_from_original_safetensors(tiny_checkpoint, merged):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())["lora"]
    scaling = cfg["lora_alpha"] / cfg["r"]
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    got = read_tensors(merged)
    prefix = "llm.base_model.model.model."
    n_merged = 0
    for name, value in got.items():
        if not name.startswith("model.layers."):
            continue
        stem = prefix + name[len("model.") :].rsplit(".", 1)[0]
        if stem.rsplit(".", 1)[-1] in cfg["target_modules"]:
            a, b = original[f"{stem}.lora_A.default.weight"], original[f"{stem}.lora_B.default.weight"]
            want = original[f"{stem}.base_layer.weight"].double() + scaling * (b.double() @ a.double())
            assert torch.allclose(value.double(), want, rtol=0, atol=1e-6), name
            assert not torch.equal(value, original[f"{stem}.base_layer.weight"])
            n_merged += 1
        else:
            assert torch.equal(value, original[f"{stem}.weight"]), name
    assert n_merged == 2 * 2  # q_proj and v_proj in both tiny layers
    assert torch.equal(got["model.embed_tokens.weight"], original["embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], original[prefix + "norm.weight"])


def test_bf16_merge_writes_bf16(tiny_checkpoint, merged, tmp_path):
    out = merge_lora_checkpoint(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16")
    tensors, fp32 = read_tensors(out), read_tensors(merged)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    for name, value in tensors.items():  # merged in fp32, then rounded once
        assert torch.equal(value, fp32[name].to(torch.bfloat16)), name
    raw = json.loads((out / "config.json").read_text())
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"


def test_sharded_output_loads_identically(tiny_checkpoint, merged, hf_model, tmp_path):
    out = merge_lora_checkpoint(tiny_checkpoint, tmp_path / "sharded", dtype="float32", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(read_tensors(merged))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_tensors(merged).values())
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(load_hf(out)(input_ids=ids).logits, hf_model(input_ids=ids).logits)
    # Re-merging into the same directory leaves no stale shards behind (TRT-LLM globs *.safetensors).
    merge_lora_checkpoint(tiny_checkpoint, out, dtype="float32")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_missing_source_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        merge_lora_checkpoint(tmp_path / "does-not-exist", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_rejected(tiny_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="'int8' is no precision to hold tensors in"):
        merge_lora_checkpoint(tiny_checkpoint, tmp_path / "out", dtype="int8")


def test_base_plus_peft_adapter_equals_the_merged_checkpoint(variant_checkpoint, tmp_path):
    """`export --lora-adapter`: the unmerged base and the adapter, loaded and merged by PEFT itself, give the
    merged checkpoint's weights (and without the adapter the base differs from it where the LoRA acts)."""
    peft = pytest.importorskip("peft")
    from canary_qwen.export.merge_lora import write_lora_adapter
    from canary_qwen.model.checkpoint import resolve_checkpoint

    if resolve_checkpoint(variant_checkpoint).config.lora is None:
        with pytest.raises(CheckpointError, match="no LoRA"):
            write_lora_adapter(variant_checkpoint, tmp_path / "lora")
        return
    merged = read_tensors(merge_lora_checkpoint(variant_checkpoint, tmp_path / "merged", dtype="float32"))
    base_dir = merge_lora_checkpoint(variant_checkpoint, tmp_path / "base", dtype="float32", merge=False)
    adapter_dir = write_lora_adapter(variant_checkpoint, tmp_path / "lora")
    base = read_tensors(base_dir)
    assert base.keys() == merged.keys()
    assert any(not torch.equal(base[k], merged[k]) for k in base)
    model = peft.PeftModel.from_pretrained(load_hf(base_dir), str(adapter_dir)).merge_and_unload()
    state = model.state_dict()
    for name, want in merged.items():
        assert torch.allclose(state[name], want, rtol=1e-6, atol=1e-6), name
