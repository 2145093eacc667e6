"""The in-process engines by backend name, each taking 16 kHz audio (``open_engine``): what the Triton engine
model and the OpenAI-compatible server's local mode run."""

from __future__ import annotations

import math

from ..bounds import RequestBounds
from ..defaults import SAMPLE_RATE
from ..engines.base import StepEngine
from ..errors import UsageError

ENGINES = ("torch-fast", "vllm", "onnx")
SOURCES = {"torch-fast": "checkpoint", "vllm": "export", "onnx": "export"}  # what each one loads
PROMPT_POSITIONS = 64  # room for the prompt's text tokens (the default prompt is ~15); longer prompts must fit too
_HOP, _SUBSAMPLING = 160, 8  # mel hop in samples, encoder subsampling: frames = ceil(floor(samples / 160) / 8)


def positions_for(max_audio_s: float, max_new_tokens: int) -> int:
    """Sequence positions one request may need: the frames of the longest clip, prompt text and answer."""
    frames = math.ceil(int(max_audio_s * SAMPLE_RATE) // _HOP / _SUBSAMPLING)
    return frames + PROMPT_POSITIONS + max_new_tokens


def open_engine(
    backend: str,
    source: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    max_batch: int = 16,
    bounds: RequestBounds | None = None,
    kv_cache_gib: float = 1.0,
) -> StepEngine:
    """``backend``'s engine on ``source`` (a checkpoint for torch-fast, an export for vllm and onnx), sized for
    ``max_batch`` rows decoding at once, each within ``bounds`` (its longest clip and the most new tokens, or in LLM
    mode its longest dialogue and answer; default: ``RequestBounds()``).
    ``dtype``: torch-fast's and vLLM's precision (default: ``default_precision`` for ``device``); ``kv_cache_gib``: vLLM's KV cache on a CPU."""
    if backend not in ENGINES:
        raise UsageError(f"no in-process engine {backend!r} (one of {', '.join(ENGINES)})")
    if max_batch < 1:
        raise UsageError("max_batch must be >= 1")
    bounds = bounds or RequestBounds()
    # A row holds the longest transcription or, in the engines with LLM mode, the longest dialogue and answer.
    positions = max(positions_for(bounds.audio_s, bounds.max_new_tokens_limit), bounds.llm_positions)
    if backend == "torch-fast":
        from .fast_torch import FastTorchBackend

        fast = FastTorchBackend(source, device=device, dtype=dtype, max_slots=max_batch)
        return fast.engine(slots=max_batch, max_len=positions)
    if dtype is not None and backend == "onnx":
        raise UsageError("onnx runs in its export's precision: leave dtype out")
    from ..export.manifest import read_manifest
    from .onnx_runtime import OnnxBackend, OnnxEncoder

    if backend == "onnx":
        return OnnxBackend(source, device=device, arena=False).engine(max_batch)  # a server's: see session()
    from .vllm import VllmEngine

    manifest = read_manifest(source)
    return VllmEngine(
        manifest,
        device=device,
        dtype=dtype,
        kv_cache_gib=kv_cache_gib,
        max_model_len=positions,
        encoder=OnnxEncoder(manifest.onnx_graph("encoder"), device, arena=False),
    )
