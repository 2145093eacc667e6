"""The benchmark's view of a backend: the registry's engine behind one small adapter.

Making a backend that cannot run here (not installed, no export directory, no server) raises
:class:`~canary_qwen.errors.BackendUnavailable` with a reason a user can act on; the runner records
that as a skipped run instead of crashing. Token budgets follow each path's own convention:

* ``nemo``: NeMo's ``SALM.generate`` takes one ``max_new_tokens`` for the whole batch, so the
  budget is per batch (``ceil(tokens_per_second * longest clip in the batch)``), as NeMo users and
  the reference measurements run it.
* every other backend takes one budget per clip (``ceil(tokens_per_second * clip duration)``).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.base import Transcriber, Transcription
from ..backends.registry import CHECKPOINT, EXPORT, backend_spec
from ..errors import BackendUnavailable, UsageError

PER_CLIP = "per-clip"
PER_BATCH = "per-batch"


@dataclass
class BackendOptions:
    model: str | None = None  # checkpoint directory or Hugging Face id (nemo, torch, torch-fast)
    export_dir: str | None = None  # `canary-qwen export` output (onnx, trt)
    device: str = "cpu"
    dtype: str = "fp32"
    url: str | None = None  # Triton server (triton)


class BenchBackend:
    """Adapter: ``transcribe(audios, budgets)``, the engine's precision, device and stage timings."""

    def __init__(self, engine: Transcriber | None, *, name: str, device: str | None):
        self.engine, self.name = engine, name
        self.budget = getattr(engine, "budget_scope", PER_CLIP)
        self.dtype = getattr(engine, "dtype", None)  # None: whatever the server's repository was built with
        self.device = getattr(engine, "device", None) if name == "triton" else device

    def transcribe(self, audios: Sequence[np.ndarray], budgets: Sequence[int]) -> list[Transcription]:
        if self.engine is None:
            raise UsageError(f"the {self.name} backend was closed")
        return self.engine.transcribe(list(audios), max_new_tokens=[int(b) for b in budgets])

    def stage_timings(self) -> dict[str, float] | None:
        """Seconds per stage accumulated by the engine (its optional ``timings`` dict), if it keeps any."""
        timings = getattr(self.engine, "timings", None)
        return dict(timings) if isinstance(timings, dict) else None

    def reset_stage_timings(self) -> None:
        timings = getattr(self.engine, "timings", None)
        if isinstance(timings, dict):
            timings.clear()

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()
        self.engine = None
        release_memory()


def release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _source(name: str, options: BackendOptions) -> str:
    kind = backend_spec(name).source
    if kind == CHECKPOINT:
        if not options.model:
            raise BackendUnavailable(f"{name} needs --model (a checkpoint directory or Hugging Face id)")
        return options.model
    if kind == EXPORT:
        if options.export_dir:
            return options.export_dir
        if options.model and (Path(options.model) / "manifest.json").is_file():
            return options.model
        raise BackendUnavailable(
            f"{name} needs an export directory: pass --export-dir DIR (create it with `canary-qwen export --model CKPT --out DIR`)"
        )
    return options.url or "localhost:8000"


def create_backend(name: str, options: BackendOptions) -> BenchBackend:
    """The registry's backend ``name`` for the benchmark (BackendUnavailable when it cannot run here)."""
    if name == "trt" and not str(options.device).startswith("cuda"):
        raise BackendUnavailable(f"TensorRT-LLM runs on an NVIDIA GPU, not on {options.device}")
    engine = backend_spec(name).make(_source(name, options), options.device, options.dtype)
    return BenchBackend(engine, name=name, device=options.device)
