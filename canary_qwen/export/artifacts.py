"""``canary-qwen export``: every deployable artifact from one checkpoint, plus the manifest.

- ``encoder.onnx``: waveform -> LLM embeddings, fp32 (ONNX Runtime and TensorRT fp32)
- ``encoder_bf16.onnx``: the same in bf16 with fp32 norms/softmax/frontend (TensorRT, strongly typed), when asked
- ``decoder.onnx``: merged-LoRA Qwen3 step with KV cache, fp32 (ONNX Runtime)
- ``embed_tokens.npy``: the token embedding table the decoder's inputs are built from
- ``tokenizer/``: tokenizer files; ``llm_merged/``: Hugging Face Qwen3 checkpoint for TensorRT-LLM and vLLM
- ``llm_base/`` + ``lora/``: the Qwen3 without the LoRA and the LoRA as a PEFT adapter, when asked (vLLM's LLM mode)
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..defaults import MAX_WINDOW_S
from ..errors import UsageError
from ..model.prompt import DEFAULT_PROMPT, prompt_ids
from ..model.salm import load_model
from ..model.tokenizer import TOKENIZER_FILES
from ..precision import Precision
from .manifest import Manifest, describe, read_manifest, versions, write_manifest
from .onnx_export import export_decoder, export_encoder


def model_info(model, tokenizer, max_audio_s: float) -> dict:
    llm, pre, enc = model.llm_cfg, model.cfg.preprocessor, model.cfg.encoder
    return {
        "sample_rate": pre.sample_rate,
        "frames_per_second": model.frames_per_second,
        "max_audio_frames": math.ceil(max_audio_s * model.frames_per_second),
        "encoder_dim": enc.d_model,
        "hidden_size": llm.hidden_size,
        "vocab_size": llm.vocab_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "head_dim": llm.head_dim,
        "audio_locator_tag": tokenizer.audio_locator_tag,
        "placeholder_id": tokenizer.placeholder_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "tokenizer_size": len(tokenizer),
        "default_prompt": DEFAULT_PROMPT,
        "default_prompt_ids": prompt_ids(tokenizer, None),
    }


def export_all(
    source,
    out,
    *,
    precision: str = "fp32",
    max_batch: int = 8,
    max_audio_s: float = MAX_WINDOW_S,
    progress: bool = True,
    lora_adapter: bool = False,
) -> Manifest:
    if Precision.parse(precision) not in (Precision.FP32, Precision.BF16):
        raise UsageError(f"precision must be fp32 or bf16, got {precision!r}")
    precision = Precision.parse(precision).value
    if max_batch < 1 or max_audio_s <= 0:
        raise UsageError("--max-batch must be >= 1 and --max-audio-s > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, files = load_model(source)
    # decoder.onnx last among the graphs: exporting it merges the model's LoRA in place.
    steps = ["encoder.onnx", "embed_tokens.npy", "decoder.onnx", "tokenizer", "llm_merged"]
    if precision != "fp32":
        steps.insert(1, f"encoder_{precision}.onnx")
    if lora_adapter and files.config.lora is not None:
        steps += ["llm_base", "lora"]
    artifacts = {}
    bar = tqdm(steps, desc="export", unit="artifact", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        path = out / name
        written = [path]
        if name == "encoder.onnx":
            written = export_encoder(model, path)
        elif name.startswith("encoder_"):
            written = export_encoder(model, path, Precision.parse(precision).torch_dtype)
        elif name == "decoder.onnx":
            written = export_decoder(model, path)
        elif name == "embed_tokens.npy":
            np.save(path, model.embed_tokens.weight.detach().float().numpy())
        elif name == "tokenizer":
            path.mkdir(exist_ok=True)
            for f in TOKENIZER_FILES:
                shutil.copy2(files.tokenizer_dir / f, path / f)
        elif name == "llm_merged":
            from .merge_lora import merge_lora_checkpoint

            merge_lora_checkpoint(source, path, dtype=precision)
        elif name == "llm_base":
            from .merge_lora import merge_lora_checkpoint

            merge_lora_checkpoint(source, path, dtype=precision, merge=False)
        elif name == "lora":
            from .merge_lora import write_lora_adapter

            write_lora_adapter(source, path)
        artifacts[name.split(".")[0]] = describe(written, out)
    write_manifest(
        out,
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": str(files.root),
            "precision": precision,
            "trt_encoder": f"encoder_{precision}" if precision != "fp32" else "encoder",
            "max_batch": max_batch,
            "max_audio_s": max_audio_s,
            "versions": versions(),
            "model": model_info(model, tokenizer, max_audio_s),
            "artifacts": artifacts,
        },
    )
    return read_manifest(out)
