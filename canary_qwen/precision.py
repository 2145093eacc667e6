"""One precision type: the names users type, what each means to torch, numpy, ONNX and Triton, and which one a
backend runs in unless asked (``default_precision``)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from .errors import UsageError

_ALIASES = {"fp32": ("float",), "fp16": ("half",)}


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # int8 weights and activations in every linear (torch-fast on CPUs with VNNI/AMX), fp32 elsewhere

    @classmethod
    def parse(cls, name: str | Precision) -> Precision:
        """Accepts the short names, the long ones ("bfloat16", "float32", "half", ...) and Triton's (TYPE_BF16)."""
        if isinstance(name, Precision):
            return name
        key = str(name).lower()
        for p in cls:
            if key in (p.value, p.long_name, p.triton_type.lower(), *_ALIASES.get(p.value, ())):
                return p
        raise UsageError(f"unknown precision {name!r} (one of {', '.join(p.value for p in cls)})")

    @classmethod
    def parse_float(cls, name: str | Precision) -> Precision:
        """``parse`` where tensors are held or written (fp32, bf16, fp16): int8 is refused."""
        precision = cls.parse(name)
        if precision not in cls.floats():
            raise UsageError(
                f"{name!r} is no precision to hold tensors in (one of {', '.join(cls.choices(*cls.floats()))})"
            )
        return precision

    @classmethod
    def floats(cls) -> tuple[Precision, ...]:
        """The floating-point ones: what every tensor of a model can be held in."""
        return (cls.FP32, cls.BF16, cls.FP16)

    @property
    def long_name(self) -> str:
        """The name torch, numpy/ml_dtypes and TensorRT-LLM use: float32, bfloat16, float16 (and int8)."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}[self.value]

    @property
    def triton_type(self) -> str:
        return f"TYPE_{self.value.upper()}"

    @property
    def torch_dtype(self):
        """The torch dtype of a model held in this precision (int8 is a way to run the linears, not one)."""
        if self is Precision.INT8:
            raise UsageError("int8 quantizes the linears of an fp32 model: it is no dtype to hold a model in")
        import torch

        return getattr(torch, self.long_name)

    @property
    def numpy_dtype(self):
        """numpy has no bfloat16: ml_dtypes' (installed with tritonclient / onnx) stands in."""
        import numpy as np

        if self is Precision.BF16:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.long_name)

    @classmethod
    def choices(cls, *members: Precision) -> tuple[str, ...]:
        return tuple(p.value for p in (members or tuple(cls)))


# What each backend can be asked to run in; the others run in their export's or server's precision.
TAKES: dict[str, tuple[Precision, ...]] = {
    "torch": Precision.floats(),
    "torch-fast": (*Precision.floats(), Precision.INT8),
    "vllm": Precision.floats(),
    "nemo": Precision.floats(),
}


def resolve_precision(backend: str, requested: str | None, device: str = "cpu") -> Precision | None:
    """The precision ``backend`` runs in on ``device`` (every entry point asks this): ``requested``, refused where
    the backend cannot take it (it would be silently ignored), else ``default_precision``; None where its export or
    server fixes it."""
    takes = TAKES.get(backend, ())
    if requested is None:
        return default_precision(device, takes)
    if requested not in takes:
        fixed = ", ".join(takes) if takes else "its precision is that of its export or server"
        raise UsageError(f"{backend} does not run in {requested!r} ({fixed})")
    return Precision.parse(requested)


def default_precision(device: str, takes: Sequence[Precision]) -> Precision | None:
    """What a backend that ``takes`` these precisions runs in on ``device`` unless asked: bf16 on a CUDA GPU (the
    released weights' own dtype, and the GPUs' fast path), fp32 elsewhere (the reference's tokens; on the CPUs
    measured bf16 was slower than fp32, docs/benchmarks.md). None for a backend that takes none: it runs in its
    export's or server's precision."""
    if not takes:
        return None
    if str(device).startswith("cuda") and Precision.BF16 in takes:
        return Precision.BF16
    return Precision.FP32
