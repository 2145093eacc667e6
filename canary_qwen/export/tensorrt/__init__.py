"""TensorRT encoder plans and TensorRT-LLM engines built from an export (needs an NVIDIA GPU).

TensorRT and TensorRT-LLM wheels come only from NVIDIA's own package index and need an NVIDIA GPU, so
every module that drives them imports them inside functions; :func:`import_tensorrt` and
:func:`import_tensorrt_llm` turn an ``ImportError`` into a ``MissingDependencyError`` that says what to install.
"""

from __future__ import annotations

from ...errors import import_optional

TENSORRT_REQUIREMENT = (
    "TensorRT 10.14 (Python package `tensorrt`, tensorrt==10.14.1; its wheels come from NVIDIA's package "
    "index) and an NVIDIA GPU with CUDA"
)
TENSORRT_LLM_REQUIREMENT = (
    "TensorRT-LLM 1.2.x (Python package `tensorrt_llm`, tensorrt_llm==1.2.*, which pins tensorrt 10.14.1, "
    "torch 2.9.1 and CUDA 13; from NVIDIA's package index or the NGC Triton + TensorRT-LLM container) "
    "and an NVIDIA GPU"
)


def import_tensorrt():
    """``import tensorrt`` or a MissingDependencyError naming TensorRT 10.14."""
    return import_optional("tensorrt", TENSORRT_REQUIREMENT)


def import_tensorrt_llm():
    """``import tensorrt_llm`` or a MissingDependencyError naming TensorRT-LLM 1.2.x."""
    return import_optional("tensorrt_llm", TENSORRT_LLM_REQUIREMENT)


def tensorrt_environment(device=0) -> dict:
    """What TensorRT engines depend on here, keyed as the manifest's engine build record: the installed TensorRT
    and TensorRT-LLM versions and the GPU's compute capability ("9.0"; ``None`` without a visible GPU)."""
    import torch

    from ..manifest import installed_version

    capability = None
    if torch.cuda.is_available():
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
    return {
        "tensorrt": installed_version("tensorrt"),
        "tensorrt_llm": installed_version("tensorrt_llm"),
        "compute_capability": capability,
    }
