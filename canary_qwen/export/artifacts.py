"""``canary-qwen export``: every deployable artifact from one checkpoint, plus the manifest.

- ``encoder.onnx``: waveform -> LLM embeddings, fp32 (ONNX Runtime and TensorRT fp32)
- ``encoder_bf16.onnx``: the same in bf16 with fp32 norms/softmax/frontend (TensorRT, strongly typed), when asked
- ``decoder.onnx``: merged-LoRA Qwen3 step with KV cache, fp32 (ONNX Runtime)
- ``decoder_int8.onnx`` / ``decoder_int4.onnx``: the same with weight-only quantized MatMuls, when asked
  (``quantize_onnx``); ONNX Runtime then runs it instead of decoder.onnx
- ``encoder_fp16.onnx``: fp16 encoder for Jetson (``--target jetson``: with ``decoder_int4.onnx``)
- ``embed_tokens.npy``: the token embedding table the decoder's inputs are built from
- ``tokenizer/``: tokenizer files; ``llm_merged/``: Hugging Face Qwen3 checkpoint for TensorRT-LLM and vLLM
- ``llm_base/`` + ``lora/``: the Qwen3 without the LoRA and the LoRA as a PEFT adapter, when asked (vLLM's LLM mode)
"""

from __future__ import annotations

import gc
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
from .quantize_onnx import TARGETS, parse_method, quantize_decoder


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
    quantize: str | None = None,
    target: str | None = None,
    max_batch: int = 8,
    max_audio_s: float = MAX_WINDOW_S,
    progress: bool = True,
    lora_adapter: bool = False,
) -> Manifest:
    """``quantize`` ("int8"/"int4") adds a weight-quantized decoder graph that ONNX Runtime runs instead of
    decoder.onnx; ``target`` ("jetson") sets both for a device class (fp16 encoder, int4 decoder)."""
    if target is not None:
        if target not in TARGETS:
            raise UsageError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
        precision, quantize = TARGETS[target]["precision"], TARGETS[target]["quantize"]
    precision = Precision.parse_float(precision).value
    quantization = None if quantize is None else parse_method(quantize)
    if max_batch < 1 or max_audio_s <= 0:
        raise UsageError("--max-batch must be >= 1 and --max-audio-s > 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, files = load_model(source)
    info = model_info(model, tokenizer, max_audio_s)
    # decoder.onnx last among the graphs: exporting it merges the model's LoRA in place.
    steps = ["encoder.onnx", "embed_tokens.npy", "decoder.onnx", "tokenizer", "llm_merged"]
    if precision != "fp32":
        steps.insert(1, f"encoder_{precision}.onnx")
    if quantization is not None:
        steps.insert(steps.index("decoder.onnx") + 1, f"decoder_{quantization.method}.onnx")
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
            written = export_encoder(model, path, Precision.parse_float(precision).torch_dtype)
        elif name == "decoder.onnx":
            written = export_decoder(model, path)
            # Nothing after this needs the model: free it before a quantizer loads the decoder graph
            # (a full-size export would otherwise hold both, over 20 GB).
            del model
            gc.collect()
        elif name.startswith("decoder_") and quantization is not None:
            written = quantize_decoder(out / "decoder.onnx", path, quantization)
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
            "target": target,
            # The graphs ONNX Runtime runs (backends, Triton's onnx flavour, the client's local encoder).
            "onnx": {
                "encoder": "encoder_fp16" if target == "jetson" else "encoder",
                "decoder": "decoder" if quantization is None else f"decoder_{quantization.method}",
                "quantization": None if quantization is None else quantization.record(),
            },
            "max_batch": max_batch,
            "max_audio_s": max_audio_s,
            "versions": versions(),
            "model": info,
            "artifacts": artifacts,
        },
    )
    return read_manifest(out)
