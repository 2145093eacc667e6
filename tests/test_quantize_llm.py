"""``canary-qwen quantize`` with NVIDIA Model Optimizer on a CPU: calibration on spliced encoder embeddings,
quantization and both checkpoint exports on the ``small`` checkpoint (an LLM 128 wide, as INT4 AWQ needs).
Building engines from the result needs a GPU and TensorRT-LLM (tests/test_trt_engines.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

from canary_qwen.cli import main
from canary_qwen.errors import UsageError
from canary_qwen.export.artifacts import export_all
from canary_qwen.export.manifest import read_manifest
from canary_qwen.export.tensorrt.llm_engine import trtllm_build_commands
from canary_qwen.model.synthetic import make_checkpoint
from canary_qwen.quantize_llm import calibration_audio, calibration_batches, quantize_llm

# TensorRT-LLM's name for each method's weights and activations
QUANT_ALGO = {"int4_awq": "W4A16_AWQ", "int8_sq": "W8A8_SQ_PER_CHANNEL"}


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return export_all(make_checkpoint(root / "ckpt", "small", seed=4), root / "export", progress=False)


def test_calibration_prompts_hold_the_clips_encoder_embeddings(small_export, clips):
    from canary_qwen.backends.onnx_runtime import OnnxEncoder

    (embeds, mask), *rest = calibration_batches(small_export, clips[:3], batch=2)
    assert len(rest) == 1 and embeds.shape[0] == 2 and embeds.dtype == np.float32
    info = small_export.model
    prompt = info["default_prompt_ids"]
    at = prompt.index(info["placeholder_id"])
    frames = OnnxEncoder(small_export.artifact("encoder"))(clips[:1])[0]
    row = embeds[0][mask[0] == 1]  # the valid (right-aligned) part of the first prompt
    assert len(row) == len(prompt) - 1 + len(frames)
    np.testing.assert_array_equal(row[at : at + len(frames)], frames)
    table = np.load(small_export.artifact("embed_tokens"))
    np.testing.assert_array_equal(row[:at], table[prompt[:at]])


@pytest.mark.parametrize("method", list(QUANT_ALGO))
def test_quantize_writes_tensorrt_llm_and_hf_checkpoints(small_export, clip_files, method, capsys):
    pytest.importorskip("modelopt", reason="nvidia-modelopt (the [quant] extra) is not installed")
    args = ["quantize", "--artifacts", str(small_export.root), "--method", method, "--calib", *clip_files[:2]]
    assert main([*args, "--calib-batch", "2"]) == 0
    manifest = read_manifest(small_export.root)
    record = manifest.data["llm_quantized"][method]
    assert record["calibration"] == "2 files" and record["dtype"] == "bf16"
    fidelity = record["fidelity_on_calibration"]  # simulated quantization vs fp32, next token after each prompt
    print(f"{method}: {fidelity}")
    assert 0 < fidelity["logits_max_rel_error"] < 1 and 0 <= fidelity["top1_agreement"] <= 1
    trtllm = manifest.artifact(record["trtllm_checkpoint"])
    config = json.loads((trtllm / "config.json").read_text())
    merged = json.loads((manifest.artifact("llm_merged") / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == QUANT_ALGO[method]
    assert config["architecture"] == "Qwen3ForCausalLM" and config["qwen_type"] == "qwen3"
    assert config["rotary_base"] == merged["rope_theta"] and config["dtype"] == "bfloat16"
    with safe_open(str(trtllm / "rank0.safetensors"), "pt") as f:
        qkv = f.get_slice("transformer.layers.0.attention.qkv.weight")
        assert qkv.get_dtype() == "I8"  # int8, or two int4 per byte
        assert "transformer.layers.0.attention.q_layernorm.weight" in f.keys()
    hf = manifest.artifact(record["hf_checkpoint"])
    assert json.loads((hf / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == QUANT_ALGO[method]
    # build-engines --quantized: trtllm-build straight from this checkpoint, nothing to convert
    (build,) = trtllm_build_commands(
        manifest.artifact("llm_merged"),
        manifest.root / "engine",
        max_batch=2,
        max_audio_frames=50,
        quantized_checkpoint=trtllm,
    )
    assert build[build.index("--checkpoint_dir") + 1] == str(trtllm)


def test_int4_awq_refuses_an_llm_not_128_wide(tiny_checkpoint, tmp_path):
    pytest.importorskip("modelopt", reason="nvidia-modelopt (the [quant] extra) is not installed")
    export_all(tiny_checkpoint, tmp_path, progress=False)
    with pytest.raises(UsageError, match="multiple of 128; this LLM has hidden_size 64"):
        quantize_llm(tmp_path, "int4_awq", calib_files=["unused.wav"])


def test_default_calibration_is_espeak_speech():
    from canary_qwen.pipeline.speech_clip import ensure_espeak

    if ensure_espeak() is None:
        pytest.skip("espeak-ng is not installed")
    clips, source = calibration_audio(None, 2)
    assert source == "2 espeak-ng sentences" and all(len(c) > 16000 for c in clips)
