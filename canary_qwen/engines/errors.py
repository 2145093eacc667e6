"""Errors of the TensorRT / TensorRT-LLM engine paths.

TensorRT and TensorRT-LLM wheels come only from NVIDIA's own package index and need an NVIDIA GPU,
so every module that drives them imports them inside functions and turns an ``ImportError`` into a
:class:`MissingDependencyError` that names exactly what to install.
"""
from __future__ import annotations

import importlib

TENSORRT_REQUIREMENT = (
    "TensorRT 10.14 (Python package `tensorrt`, tensorrt==10.14.1; its wheels come from NVIDIA's package "
    "index) and an NVIDIA GPU with CUDA"
)
TENSORRT_LLM_REQUIREMENT = (
    "TensorRT-LLM 1.2.x (Python package `tensorrt_llm`, tensorrt_llm==1.2.*, which pins tensorrt 10.14.1, "
    "torch 2.9.1 and CUDA 13; from NVIDIA's package index or the NGC Triton + TensorRT-LLM container) "
    "and an NVIDIA GPU"
)


class MissingDependencyError(ImportError):
    """A TensorRT / TensorRT-LLM path was used where its package (or a GPU) is not available.

    ``package`` is the import name that failed, ``requirement`` says what to install.
    """

    def __init__(self, package: str, requirement: str, detail: str | None = None):
        message = f"{package} is not available: this path needs {requirement}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.package = package
        self.requirement = requirement


def import_tensorrt():
    """``import tensorrt`` or a :class:`MissingDependencyError` naming TensorRT 10.14."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise MissingDependencyError("tensorrt", TENSORRT_REQUIREMENT, str(e)) from e


def import_tensorrt_llm():
    """``import tensorrt_llm`` or a :class:`MissingDependencyError` naming TensorRT-LLM 1.2.x."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as e:
        raise MissingDependencyError("tensorrt_llm", TENSORRT_LLM_REQUIREMENT, str(e)) from e
