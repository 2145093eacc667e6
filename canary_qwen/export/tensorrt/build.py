"""``canary-qwen build-engines``: the TensorRT encoder plan and the TensorRT-LLM engine of an export.

Reads the export's manifest (its precision, max batch and max clip length) and writes the layout the
trt backend and the trt-flavour Triton repository read: ``EXPORT/trt/encoder.plan`` (from the export's
TensorRT encoder graph, bf16 when exported with ``--precision bf16``) and ``EXPORT/trt/llm_engine/``
(from ``llm_merged/``, sized for max batch x max audio frames). Needs TensorRT 10.14 and TensorRT-LLM
1.2.x on an NVIDIA GPU; without them it stops before doing anything and says what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from ...defaults import MAX_NEW_TOKENS, SAMPLE_RATE
from ...errors import UsageError
from ...precision import Precision
from ..manifest import ENGINE_BUILD, read_manifest, record_engine_build
from . import import_tensorrt, import_tensorrt_llm, tensorrt_environment
from .llm_engine import default_engine_paths

logger = logging.getLogger(__name__)


def build_engines(
    export_dir,
    *,
    max_batch: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_prompt_text_tokens: int = 64,
    only: str | None = None,
    timing_cache=None,
    quantized: str | None = None,
    log=None,
) -> dict[str, Path]:
    """Build what ``only`` names ("encoder", "llm") or both; returns the paths written. ``quantized`` names a
    ``canary-qwen quantize`` method whose TensorRT-LLM checkpoint the LLM engine is built from."""
    log = log or logger.info
    from .encoder_engine import build_encoder_engine

    """Build what ``only`` names ("encoder", "llm") or both; returns the paths written.

    Records in the manifest what loading the engines needs: the TensorRT and TensorRT-LLM versions, the GPU's
    compute capability and the encoder plan's profile (the trt backend and the trt flavour check them).
    """
    from .encoder_engine import EncoderProfile
    from .llm_engine import build_llm_engine

    if only not in (None, "encoder", "llm"):
        raise UsageError(f"only must be encoder or llm, got {only!r}")
    manifest = read_manifest(export_dir)
    # fail on a missing package before minutes of work, not after the first engine
    if only in (None, "encoder"):
        import_tensorrt()
    if only in (None, "llm"):
        import_tensorrt_llm()
    max_batch = int(manifest.data["max_batch"]) if max_batch is None else max_batch
    if max_batch < 1:
        raise UsageError(f"max_batch must be >= 1, got {max_batch}")
    paths = default_engine_paths(export_dir)
    built = {}
    record = dict(manifest.data.get(ENGINE_BUILD, {}))
    if only in (None, "encoder"):
        onnx_path = manifest.artifact(manifest.data.get("trt_encoder", "encoder"))
        log(
            f"building the TensorRT encoder from {onnx_path.name} (batch <= {max_batch}, clips <= {manifest.data['max_audio_s']} s)"
        )
        max_samples = int(manifest.data["max_audio_s"] * SAMPLE_RATE)
        profile = EncoderProfile(
            opt_batch=max(1, max_batch // 2),
            max_batch=max_batch,
            opt_samples=min(10 * SAMPLE_RATE, max_samples),
            max_samples=max_samples,
        )
        built["encoder"] = build_encoder_engine(
            onnx_path, paths["encoder"], timing_cache_path=timing_cache, **asdict(profile)
        )
        record["encoder_profile"] = asdict(profile)
    if only in (None, "llm"):
        dtype = Precision.parse_float(manifest.data["precision"]).long_name
        quantized_checkpoint = None
        if quantized is not None:
            done = manifest.data.get("llm_quantized", {})
            if quantized not in done:
                raise UsageError(
                    f"{export_dir} has no {quantized} LLM checkpoint (have: {', '.join(done) or 'none'}): "
                    f"run `canary-qwen quantize --artifacts {export_dir} --method {quantized}` first"
                )
            quantized_checkpoint = manifest.artifact(done[quantized]["trtllm_checkpoint"])
            dtype = Precision.parse_float(done[quantized]["dtype"]).long_name
        log(
            f"building the TensorRT-LLM engine ({dtype}, batch <= {max_batch}, {manifest.model['max_audio_frames']} audio frames per clip)"
        )
        built["llm"] = build_llm_engine(
            manifest.artifact("llm_merged"),
            paths["llm_engine"],
            max_batch=max_batch,
            max_audio_frames=int(manifest.model["max_audio_frames"]),
            max_prompt_text_tokens=max_prompt_text_tokens,
            max_new_tokens=max_new_tokens,
            dtype=dtype,
            checkpoint_dir=paths["llm_checkpoint"],
            timing_cache=None if timing_cache is None else f"{timing_cache}.llm",
            quantized_checkpoint=quantized_checkpoint,
            log=log,
        )
        record["llm_quantization"] = quantized  # None: built from llm_merged as it is
    record_engine_build(export_dir, {**record, **tensorrt_environment()})
    return built
