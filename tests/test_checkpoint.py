"""Checkpoint loading: the real layout, and one clear error for each way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from canary_qwen.errors import CheckpointError
from canary_qwen.model.checkpoint import resolve_checkpoint
from canary_qwen.model.salm import load_model


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_and_reports_real_ids(tiny_checkpoint):
    model, tok, files = load_model(tiny_checkpoint)
    assert tok.placeholder_id == len(tok) - 1 and tok.placeholder_id < model.llm_cfg.vocab_size
    assert tok.token_to_id("<|im_end|>") == tok.eos_id and tok.token_to_id("<|endoftext|>") == tok.pad_id
    assert not any(p.requires_grad for p in model.parameters())
    assert model.mel.window.dtype == torch.float32


def test_full_size_layout_matches_the_released_checkpoint(tmp_path):
    """The full architecture on the meta device: the released checkpoint has 1,718 tensors."""
    from canary_qwen.model.checkpoint import checkpoint_key
    from canary_qwen.model.config import parse_llm_config, parse_salm_config
    from canary_qwen.model.salm import CanaryQwen
    from canary_qwen.model.synthetic import qwen3_config, salm_config

    salm = parse_salm_config(salm_config("full"))
    llm = parse_llm_config(qwen3_config("full", 151936, bos_id=151643, eos_id=151645))
    with torch.device("meta"):
        state = CanaryQwen(salm, llm).state_dict()
    keys = {checkpoint_key(k, salm.lora.target_modules): tuple(v.shape) for k, v in state.items()}
    assert len(keys) == 1718
    assert keys["llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (128, 2048)
    assert keys["llm.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"] == (1024, 128)
    assert keys["embed_tokens.weight"] == (151936, 2048)
    assert keys["perception.preprocessor.featurizer.fb"] == (1, 128, 257)
    assert keys["perception.encoder.pre_encode.out.weight"] == (1024, 4096)
    assert keys["perception.proj.weight"] == (2048, 1024)
    assert not any("lm_head" in k for k in keys)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")


def test_directory_without_weights(tmp_path, tiny_checkpoint):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        resolve_checkpoint(ckpt)


def test_config_that_is_not_a_salm(tmp_path, tiny_checkpoint):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not a NeMo SALM"):
        load_model(ckpt)


def test_truncated_weights(tmp_path, tiny_checkpoint):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(ckpt)


def test_shape_mismatch_with_config(tmp_path, tiny_checkpoint):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["perception"]["encoder"]["n_layers"] = 3  # weights have 2 layers
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.2"):
        load_model(ckpt)


def test_wrong_tensor_shape(tmp_path, tiny_checkpoint):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["perception.proj.bias"] = torch.zeros(7)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"perception.proj.bias: shape \(7,\)"):
        load_model(ckpt)


def test_offline_without_tokenizer_names_what_is_missing(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match="lacks tokenizer.json, tokenizer_config.json.*For offline use"):
        load_model(ckpt)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError, match="cannot fetch the checkpoint from the Hugging Face hub repo 'nvidia/canary-qwen-2.5b'"
    ):
        resolve_checkpoint("nvidia/canary-qwen-2.5b")


# Qwen3 config.json variants: transformers 5 writes rope_parameters only, transformers 4 (the hub) a top-level
# rope_theta; some leave fields out. Each must resolve to what transformers itself computes with.
QWEN3_CONFIG_VARIANTS = [
    {"rope_theta": 1e6},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    {},
    {"rope_theta": 1e6, "rope_scaling": None},
]


@pytest.mark.parametrize("variant", QWEN3_CONFIG_VARIANTS)
def test_llm_config_resolves_like_transformers(variant):
    transformers = pytest.importorskip("transformers")
    from canary_qwen.model.config import parse_llm_config

    cfg = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, **variant}  # fmt: skip
    ours = parse_llm_config(cfg)
    theirs = transformers.Qwen3Config.from_dict(cfg)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert (ours.head_dim, ours.tie_word_embeddings) == (theirs.head_dim, theirs.tie_word_embeddings)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}}, "dynamic"),
        ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, "sliding-window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_llm_config_settings_we_do_not_compute_are_refused(tmp_path, tiny_checkpoint, change, message):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    path = ckpt / "llm_backbone" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(ckpt)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoder_chunk_size_seconds": 10.0}, "encoder_chunk_size_seconds"),
        ({"lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}}, "target_modules"),
        ({"lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True}}, "use_dora"),
        ({"lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"q": 2}}}, "rank_pattern"),
    ],
)
def test_salm_config_settings_we_do_not_compute_are_refused(tmp_path, tiny_checkpoint, change, message):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(ckpt)


def test_shared_position_biases_load_from_the_one_stored_copy(tmp_path, tiny_checkpoint):
    """untie_biases: false — NeMo's save_pretrained keeps layer 0's pos_bias_u/v only; every layer reads it."""
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["perception"]["encoder"]["untie_biases"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    tensors = load_file(ckpt / "model.safetensors")
    shared = {k: v for k, v in tensors.items() if "pos_bias" in k and ".layers.0." in k}
    tensors = {k: v for k, v in tensors.items() if "pos_bias" not in k or ".layers.0." in k}
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    model, _, _ = load_model(ckpt)
    for layer in model.encoder.layers:
        for name in ("pos_bias_u", "pos_bias_v"):
            assert torch.equal(getattr(layer.self_attn, name), shared[f"perception.encoder.layers.0.self_attn.{name}"])
    config["perception"]["encoder"]["untie_biases"] = True  # the same file with per-layer biases declared
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.self_attn\.pos_bias"):
        load_model(ckpt)


def test_loads_in_the_dtype_asked_or_as_stored(tmp_path, tiny_checkpoint):
    """bf16 weights are read straight into a bf16 model (no fp32 copy first) and equal the fp32 load rounded;
    dtype None keeps what the file stores: bf16 where every float tensor is (the released checkpoint), else fp32."""
    fp32, _, _ = load_model(tiny_checkpoint)
    bf16, _, _ = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert bf16.mel.window.dtype == torch.float32
    for (name, ours), theirs in zip(bf16.named_parameters(), fp32.parameters()):
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs.bfloat16()), name
    assert load_model(tiny_checkpoint, dtype=None)[0].dtype == torch.float32  # the tiny file stores fp32
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    tensors = load_file(ckpt / "model.safetensors")
    tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    stored, _, _ = load_model(ckpt, dtype=None)
    assert stored.dtype == torch.bfloat16 and stored.mel.window.dtype == torch.float32
