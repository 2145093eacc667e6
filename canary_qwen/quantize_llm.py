"""``canary-qwen quantize``: the merged Qwen3 (an export's ``llm_merged``) quantized with NVIDIA Model
Optimizer into a TensorRT-LLM checkpoint (what ``build-engines --quantized METHOD`` builds from) and a
Hugging Face checkpoint (vLLM and other runtimes read ``hf_quant_config.json``).

Calibration feeds what the LLM really sees: the prompt with a clip's encoder embeddings in place of
the audio placeholder (the export's fp32 encoder graph, the prompt splicer every backend uses), from
the audio files given or, by default, sentences spoken by espeak-ng. Calibration and export run on a
CPU (slowly at full size); building and running the engines needs a GPU and TensorRT-LLM.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoding import splice_and_pad
from .errors import ArtifactError, UsageError, import_optional
from .export.manifest import Manifest, describe, read_manifest, write_manifest

logger = logging.getLogger(__name__)

MODELOPT_REQUIREMENT = "nvidia-modelopt for `canary-qwen quantize` (pip install 'canary-qwen[quant]')"
# Method -> Model Optimizer config name (the command line lists the same names). INT4 AWQ blocks are 128
# inputs wide: every linear input size of the LLM must be a multiple of 128 (Qwen3-1.7B's are).
METHODS = {
    "int4_awq": "INT4_AWQ_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "fp8": "FP8_DEFAULT_CFG",
    "int8_wo": "INT8_WEIGHT_ONLY_CFG",
}
INT4_BLOCK = 128
CALIBRATION_SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "The meeting has been moved to Thursday afternoon at half past three.",
    "Speech recognition turns spoken words into written text, one token at a time.",
    "In nineteen sixty nine, astronauts first walked on the surface of the moon.",
    "Turn left at the second traffic light and the station is on your right.",
)


@dataclass(frozen=True)
class QuantizedLlm:
    method: str
    trtllm_checkpoint: Path
    hf_checkpoint: Path


def quantized_dir(export_dir, method: str) -> Path:
    return Path(export_dir) / f"llm_{method}"


def calibration_audio(files: list[str] | None, count: int) -> tuple[list[np.ndarray], str]:
    """The clips to calibrate on and where they came from: ``files``, else espeak-ng speech."""
    from .pipeline.audio import load_audio

    if files:
        return [load_audio(f) for f in files[:count]], f"{min(count, len(files))} files"
    from .pipeline.speech_clip import synthesize_speech

    sentences = [CALIBRATION_SENTENCES[i % len(CALIBRATION_SENTENCES)] for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        clips = [load_audio(synthesize_speech(s, Path(tmp) / f"{i}.wav")) for i, s in enumerate(sentences)]
    return clips, f"{count} espeak-ng sentences"


def calibration_batches(manifest: Manifest, clips: list[np.ndarray], batch: int):
    """(inputs_embeds [B, L, H] float32, attention_mask [B, L] int64) per batch: each clip's fp32 encoder
    embeddings spliced into the default prompt, left-padded as every backend feeds the LLM."""
    from .backends.onnx_runtime import OnnxEncoder

    encoder = OnnxEncoder(manifest.artifact("encoder"))
    table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
    info = manifest.model
    for start in range(0, len(clips), batch):
        chunk = clips[start : start + batch]
        embeds, valid = splice_and_pad(
            [info["default_prompt_ids"]] * len(chunk), encoder(chunk), table.__getitem__, info["placeholder_id"]
        )
        yield embeds.astype(np.float32), valid.astype(np.int64)


def check_quantizable(config: dict, method: str) -> None:
    """INT4 AWQ's 128-wide blocks: fail before minutes of calibration, not inside the exporter."""
    if method != "int4_awq":
        return
    sizes = {
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "attention width": config["num_attention_heads"] * config.get("head_dim", 0),
    }
    bad = {k: v for k, v in sizes.items() if v % INT4_BLOCK}
    if bad:
        raise UsageError(
            f"int4_awq needs every linear input size to be a multiple of {INT4_BLOCK}; this LLM has "
            + ", ".join(f"{k} {v}" for k, v in bad.items())
        )


def complete_trtllm_config(checkpoint: Path, llm_config: dict) -> None:
    """Add what TensorRT-LLM's ``QWenConfig.from_hugging_face`` would set for Qwen3 and Model Optimizer's
    own config writer (used when tensorrt_llm is not importable, as on a CPU machine) leaves out: without
    ``qwen_type`` the q/k norms are not built, and ``rotary_base`` would default to 10000 (Qwen3: 1e6)."""
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    rope = llm_config.get("rope_theta") or (llm_config.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        raise ArtifactError(f"{checkpoint}: the merged Qwen3 config has no rope_theta")
    config.update(
        qwen_type="qwen3",
        rotary_base=float(rope),
        attn_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(llm_config.get("tie_word_embeddings", False)),
    )
    path.write_text(json.dumps(config, indent=4))


def quantize_llm(
    export_dir,
    method: str,
    *,
    calib_files: list[str] | None = None,
    calib_count: int = 8,
    calib_batch: int = 4,
    dtype: str = "bf16",
    device: str = "cpu",
) -> QuantizedLlm:
    """Calibrate, quantize and export ``llm_merged``; records both checkpoints in the manifest."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    if calib_count < 1 or calib_batch < 1:
        raise UsageError("--calib-count and --calib-batch must be >= 1")
    from .precision import Precision

    out_dtype = Precision.parse_float(dtype)
    if out_dtype not in (Precision.BF16, Precision.FP16):
        raise UsageError(f"--dtype must be bf16 or fp16 (TensorRT-LLM's quantized kernels), got {dtype!r}")
    mtq = import_optional("modelopt.torch.quantization", MODELOPT_REQUIREMENT)
    mte = import_optional("modelopt.torch.export", MODELOPT_REQUIREMENT)
    import torch
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(export_dir)
    merged = manifest.artifact("llm_merged")
    llm_config = json.loads((merged / "config.json").read_text())
    check_quantizable(llm_config, method)
    clips, source = calibration_audio(calib_files, calib_count)
    batches = list(calibration_batches(manifest, clips, calib_batch))
    # Calibrate in fp32 on a CPU (its bf16 matmuls are no faster in eager PyTorch), bf16 on a GPU.
    work_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=work_dtype).eval()
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to reads as unbound to mypy

    def next_token_logits(m) -> torch.Tensor:
        """The model's logits for the token after each calibration prompt [prompts, V] (left padding: last column)."""
        out = []
        for embeds, mask in batches:
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            with torch.no_grad():
                logits = m(
                    inputs_embeds=torch.from_numpy(embeds).to(device, work_dtype),
                    attention_mask=torch.from_numpy(mask).to(device),
                    position_ids=torch.from_numpy(positions).to(device),
                ).logits
            out.append(logits[:, -1].float().cpu())
        return torch.cat(out)

    reference = next_token_logits(model)
    logger.info(f"calibrating {method} on {source} ({len(reference)} prompts)")
    model = mtq.quantize(model, getattr(mtq, METHODS[method]), next_token_logits)
    # Fidelity on the calibration prompts themselves, with Model Optimizer's simulated quantization (the
    # engines' kernels round differently): how far the next-token logits moved, and how often the top token held.
    quantized = next_token_logits(model)
    fidelity = {
        "logits_max_rel_error": float((quantized - reference).abs().max() / reference.abs().max()),
        "top1_agreement": float((quantized.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
    logger.info(f"{method} on the calibration prompts: {fidelity}")
    out = quantized_dir(manifest.root, method)
    result = QuantizedLlm(method, out / "trtllm_checkpoint", out / "hf")
    with torch.inference_mode():
        mte.export_tensorrt_llm_checkpoint(
            model,
            "qwen",
            out_dtype.torch_dtype,
            export_dir=result.trtllm_checkpoint,
            inference_tensor_parallel=1,
        )
    complete_trtllm_config(result.trtllm_checkpoint, llm_config)
    mte.export_hf_checkpoint(model, dtype=out_dtype.torch_dtype, export_dir=result.hf_checkpoint)
    _record(manifest, result, source, out_dtype.value, fidelity)
    return result


def _record(manifest: Manifest, result: QuantizedLlm, calibration: str, dtype: str, fidelity: dict) -> None:
    from importlib import metadata

    data = {k: v for k, v in manifest.data.items() if k != "format_version"}
    name = f"llm_{result.method}"
    data["artifacts"][f"{name}_trtllm"] = describe([result.trtllm_checkpoint], manifest.root)
    data["artifacts"][f"{name}_hf"] = describe([result.hf_checkpoint], manifest.root)
    data.setdefault("llm_quantized", {})[result.method] = {
        "trtllm_checkpoint": f"{name}_trtllm",
        "hf_checkpoint": f"{name}_hf",
        "dtype": dtype,
        "calibration": calibration,
        "fidelity_on_calibration": fidelity,
        "modelopt": metadata.version("nvidia-modelopt"),
    }
    write_manifest(manifest.root, data)
