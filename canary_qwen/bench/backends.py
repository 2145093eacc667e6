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

import ctypes
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.base import Transcriber, Transcription
from ..errors import BackendUnavailable, UsageError
from ..precision import resolve_precision
from ..registry import CHECKPOINT, EXPORT, backend_spec

PER_CLIP = "per-clip"
PER_BATCH = "per-batch"


@dataclass(frozen=True)
class RunSpec:
    """One ``--backends`` entry, ``NAME[:DTYPE][=SOURCE]``: a backend, optionally its own precision (else
    the run's ``--dtype``) and its own checkpoint / export / server (else ``--model`` / ``--export-dir`` /
    ``--url``), so one run can compare e.g. ``nemo:fp32 nemo:bf16 torch-fast:int8 onnx=export_int8/``.

    ``triton:FLAVOR[:DTYPE][=SOURCE]`` is served: the run writes the flavour's repository (torch-fast from the
    checkpoint, onnx and vllm from the export), starts the bundled Triton on it and sends it the clips
    (``bench.served``); plain ``triton`` measures a server already running at ``--url``."""

    text: str
    name: str
    dtype: str | None = None
    source: str | None = None
    flavor: str | None = None  # triton:FLAVOR: served by a server this run starts

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        head, _, source = text.partition("=")
        name, _, dtype = head.partition(":")
        spec = backend_spec(name)  # an unknown name is refused with the known ones
        flavor = None
        if name == "triton" and dtype:
            from .served import FLAVORS

            flavor, _, dtype = dtype.partition(":")
            if flavor not in FLAVORS:
                raise UsageError(f"{text!r}: the bundled Triton serves the flavours {', '.join(FLAVORS)}")
            spec = backend_spec(flavor)
        if dtype:
            resolve_precision(spec.name, dtype)  # refuses a precision the backend cannot take
        if "=" in text and not source:
            raise UsageError(f"{text!r}: nothing after '='")
        return cls(text, name, dtype or None, source or None, flavor)

    @property
    def local(self) -> str | None:
        """The local entry whose tokens a served one must give (``triton:torch-fast:int8`` -> ``torch-fast:int8``)."""
        if self.flavor is None:
            return None
        return self.flavor + (f":{self.dtype}" if self.dtype else "")


@dataclass
class BackendOptions:
    model: str | None = None  # checkpoint directory or Hugging Face id (nemo, torch, torch-fast)
    export_dir: str | None = None  # `canary-qwen export` output (onnx, trt)
    device: str = "cpu"
    dtype: str | None = None  # the run's --dtype, for the entries that take it (None: resolve_precision's default)
    url: str | None = None  # Triton server (triton)


class BenchBackend:
    """Adapter: ``transcribe(audios, budgets)``, the engine's precision, device and stage timings."""

    def __init__(self, engine: Transcriber | None, *, name: str, device: str | None, label: str | None = None):
        self.engine, self.name, self.label = engine, name, label or name  # label: the --backends entry
        self.budget = getattr(engine, "budget_scope", PER_CLIP)
        self.dtype = getattr(engine, "dtype", None)  # None: whatever the server's repository was built with
        self.device = getattr(engine, "device", None) if name == "triton" else device
        # A server takes clips as they come: the batch size is how many requests it has in flight.
        self.in_flight = hasattr(engine, "concurrency")

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
        reset = getattr(self.engine, "reset", None)
        if callable(reset):
            reset()

    def set_in_flight(self, requests: int) -> None:
        setattr(self.engine, "concurrency", requests)  # noqa: B010 - only on engines that have it (in_flight)

    def served_fields(self) -> dict:
        """Per-request latency (p50, p99), the server's peak memory and its engine's busy seconds, for a served
        entry."""
        latencies = sorted(getattr(self.engine, "latencies", None) or [])
        if not latencies:
            return {}
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        return {
            "latency_p50_s": pick(0.5),
            "latency_p99_s": pick(0.99),
            "server_peak_rss_gb": getattr(self.engine, "server_peak_rss_gb", None),
            "engine_busy_s": getattr(self.engine, "engine_busy_s", None),
        }

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()
        self.engine = None
        release_memory()


def release_memory() -> None:
    """Free what a closed backend held, so the next one's peak memory is its own: Python's garbage, PyTorch's
    CUDA cache, and the C heap's free pages (glibc keeps them mapped until ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
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


def create_backend(run: RunSpec, options: BackendOptions) -> BenchBackend:
    """The registry's backend for one ``--backends`` entry (BackendUnavailable when it cannot run here)."""
    name = run.name
    if run.flavor is not None:
        from .served import ServedBackend

        source = run.source or _source(run.flavor, options)
        served = ServedBackend(run.flavor, source, device=options.device, dtype=run.dtype)
        return BenchBackend(served, name=name, device=options.device, label=run.text)
    if name == "trt" and not str(options.device).startswith("cuda"):
        raise BackendUnavailable(f"TensorRT-LLM runs on an NVIDIA GPU, not on {options.device}")
    spec = backend_spec(name)
    requested = run.dtype or (options.dtype if options.dtype in spec.dtypes else None)
    dtype = resolve_precision(spec.name, requested, options.device)
    engine = spec.make(run.source or _source(name, options), options.device, dtype)
    return BenchBackend(engine, name=name, device=options.device, label=run.text)
