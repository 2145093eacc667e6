"""The audio encoder graph (``encoder.onnx`` / ``encoder_bf16.onnx``) as a TensorRT 10.x engine.

Build: ``trt.OnnxParser`` into a STRONGLY_TYPED network (TensorRT takes every tensor's precision from
the ONNX graph: the bf16 export keeps its frontend, norms and softmax in fp32, and TensorRT 11 drops
the fp16/bf16 builder flags anyway), one optimisation profile over ``audio`` [B, S] float32 and
``audio_lengths`` [B] int64, an optional timing cache loaded before and saved after the build.
Run: torch CUDA tensors for every I/O, ``set_input_shape`` + ``set_tensor_address`` +
``execute_async_v3`` on the current torch stream. TensorRT is imported inside the functions (a
:class:`~canary_qwen.engines.errors.MissingDependencyError` names TensorRT 10.14 when it is absent).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import SAMPLE_RATE, pad_waveforms
from .errors import MissingDependencyError, import_tensorrt

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
    max_samples: int = 40 * SAMPLE_RATE

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if not 1 <= self.min_samples <= self.opt_samples <= self.max_samples:
            raise ValueError(
                f"need 1 <= min_samples <= opt_samples <= max_samples, got {self.min_samples}, {self.opt_samples}, {self.max_samples}"
            )

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape per input, as ``IOptimizationProfile.set_shape`` takes them."""
        return {
            "audio": ((self.min_batch, self.min_samples), (self.opt_batch, self.opt_samples), (self.max_batch, self.max_samples)),
            "audio_lengths": ((self.min_batch,), (self.opt_batch,), (self.max_batch,)),
        }


def build_encoder_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    min_samples: int = 1600,
    opt_samples: int = 10 * SAMPLE_RATE,
    max_samples: int = 40 * SAMPLE_RATE,
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
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(INPUTS):
        raise RuntimeError(f"{onnx_path} has inputs {sorted(names)}, expected {list(INPUTS)} (the canary-qwen encoder graph)")

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
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (run with verbose=True for its log)")
    out = Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise RuntimeError(f"unsupported TensorRT I/O dtype {dtype}")
    return table[dtype]


class TrtEncoder:
    """Runs the encoder engine: waveforms -> per-clip embeddings, or batched torch tensors.

    ``__call__(audios)`` takes 1-D float32 waveforms and returns a list of [T_i, H] CUDA tensors
    (the engine's output dtype); :meth:`run` takes padded ``audio`` [B, S] and ``audio_lengths`` [B].
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: str = "cuda"):
        trt = import_tensorrt()
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a core dependency
            raise MissingDependencyError("torch", "torch with CUDA") from e
        if not torch.cuda.is_available():
            raise MissingDependencyError("CUDA", "an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
        self.trt, self.torch = trt, torch
        self.device = torch.device(device if str(device).startswith("cuda") else "cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {engine_path} (built with another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(inputs) != set(INPUTS) or not set(OUTPUTS) <= set(names):
            raise RuntimeError(f"{engine_path} has tensors {names}, expected inputs {list(INPUTS)} and outputs {list(OUTPUTS)}")
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape("audio", 0)
        self.max_batch, self.max_samples = int(hi[0]), int(hi[1])
        self.min_samples = int(lo[1])

    def run(self, audio, audio_lengths):
        """``audio`` [B, S] float32 and ``audio_lengths`` [B] int64 (torch or numpy) -> (embeddings [B, T, H], lengths [B])."""
        torch = self.torch
        audio = torch.as_tensor(audio).to(self.device, self.dtypes["audio"]).contiguous()
        lengths = torch.as_tensor(audio_lengths).to(self.device, self.dtypes["audio_lengths"]).contiguous()
        batch, samples = audio.shape
        if batch > self.max_batch or samples > self.max_samples or samples < self.min_samples:
            raise ValueError(
                f"batch {batch} x {samples} samples is outside the engine's profile "
                f"(batch <= {self.max_batch}, {self.min_samples} <= samples <= {self.max_samples})"
            )
        ctx = self.context
        ctx.set_input_shape("audio", tuple(audio.shape))
        ctx.set_input_shape("audio_lengths", tuple(lengths.shape))
        ctx.set_tensor_address("audio", audio.data_ptr())
        ctx.set_tensor_address("audio_lengths", lengths.data_ptr())
        outputs = {}
        for name in OUTPUTS:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {name} has a data-dependent shape {shape}: not supported by this runner")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outputs["embeddings"], outputs["embedding_lengths"]

    def __call__(self, audios: Sequence[np.ndarray]) -> list:
        out = []
        for start in range(0, len(audios), self.max_batch):
            chunk = list(audios)[start : start + self.max_batch]
            audio, lengths = pad_waveforms(chunk)
            if audio.shape[1] < self.min_samples:
                audio = np.pad(audio, ((0, 0), (0, self.min_samples - audio.shape[1])))
            embeds, lens = self.run(audio, lengths)
            out += [embeds[i, : int(n)] for i, n in enumerate(lens.tolist())]
        return out

