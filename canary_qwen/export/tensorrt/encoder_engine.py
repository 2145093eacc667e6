"""The audio encoder graph (``encoder.onnx`` / ``encoder_bf16.onnx``) as a TensorRT 10.x engine.

Build: ``trt.OnnxParser`` into a STRONGLY_TYPED network (TensorRT takes every tensor's precision from
the ONNX graph: the bf16 export keeps its frontend, norms and softmax in fp32, and TensorRT 11 drops
the fp16/bf16 builder flags anyway), one optimisation profile over ``audio`` [B, S] float32 and
``audio_lengths`` [B] int64, an optional timing cache loaded before and saved after the build.
TensorRT is imported inside the functions (a :class:`~canary_qwen.errors.MissingDependencyError` names
TensorRT 10.14 when it is absent). ``canary_qwen.backends.trt.TrtEncoder`` runs the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...defaults import MAX_WINDOW_S, SAMPLE_RATE
from ...errors import ExternalToolError, UsageError
from . import import_tensorrt

INPUTS = ("audio", "audio_lengths")
OUTPUTS = ("embeddings", "embedding_lengths")


@dataclass(frozen=True)
class EncoderProfile:
    """Min / opt / max of the one optimisation profile (batch size and samples per clip)."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    min_samples: int = 1600  # 0.1 s
    opt_samples: int = 10 * SAMPLE_RATE
    max_samples: int = int(MAX_WINDOW_S * SAMPLE_RATE)

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if not 1 <= self.min_samples <= self.opt_samples <= self.max_samples:
            raise UsageError(
                f"need 1 <= min_samples <= opt_samples <= max_samples, got {self.min_samples}, {self.opt_samples}, {self.max_samples}"
            )

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input, as ``IOptimizationProfile.set_shape`` takes them."""
        return {
            "audio": (
                (self.min_batch, self.min_samples),
                (self.opt_batch, self.opt_samples),
                (self.max_batch, self.max_samples),
            ),
            "audio_lengths": ((self.min_batch,), (self.opt_batch,), (self.max_batch,)),
        }


def pad_to_min_samples(audio: np.ndarray, min_samples: int) -> np.ndarray:
    """[B, S] samples zero-padded on the right to at least ``min_samples`` (the plan's profile minimum: TensorRT
    refuses shorter inputs). The graph reads only the first ``audio_lengths`` samples of each row, so the valid
    frames come out as for the clip itself. The trt runner, the trt flavour's Triton models and the embeddings
    client all pad with this."""
    short = int(min_samples) - audio.shape[1]
    return np.pad(audio, ((0, 0), (0, short))) if short > 0 else audio


def build_encoder_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    min_samples: int = 1600,
    opt_samples: int = 10 * SAMPLE_RATE,
    max_samples: int = int(MAX_WINDOW_S * SAMPLE_RATE),
    timing_cache_path: str | os.PathLike | None = None,
    workspace_gb: float = 4.0,
    verbose: bool = False,
) -> Path:
    """Parse ``onnx_path`` (external ``.data`` next to it is found by path), build, write ``engine_path``."""
    profile_spec = EncoderProfile(min_batch, opt_batch, max_batch, min_samples, opt_samples, max_samples)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExternalToolError(f"TensorRT cannot parse {onnx_path}: {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(INPUTS):
        raise ExternalToolError(
            f"{onnx_path} has inputs {sorted(names)}, expected {list(INPUTS)} (the canary-qwen encoder graph)"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_spec.shapes().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU/version is refused

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExternalToolError(
            f"TensorRT failed to build an engine from {onnx_path} (run with verbose=True for its log)"
        )
    out = Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out
