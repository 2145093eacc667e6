"""One precision type: the names users type, and what each means to torch, numpy, ONNX and Triton."""

from __future__ import annotations

from enum import Enum

from .errors import UsageError

_ALIASES = {"fp32": ("float",), "fp16": ("half",)}


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

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

    @property
    def long_name(self) -> str:
        """The name torch, numpy/ml_dtypes and TensorRT-LLM use: float32, bfloat16, float16."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.value]

    @property
    def triton_type(self) -> str:
        return {"fp32": "TYPE_FP32", "bf16": "TYPE_BF16", "fp16": "TYPE_FP16"}[self.value]

    @property
    def torch_dtype(self):
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
