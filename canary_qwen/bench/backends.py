"""Backends the benchmark can drive, by name, behind one small adapter.

Every factory imports its engine lazily and raises :class:`BackendUnavailable` with a reason a
user can act on (not installed, no export directory, no server); the runner records that as a
skipped run instead of crashing. Token budgets follow each path's own convention:

* ``nemo``: NeMo's ``SALM.generate`` takes one ``max_new_tokens`` for the whole batch, so the
  budget is per batch (``ceil(tokens_per_second * longest clip in the batch)``), as NeMo users and
  the reference measurements run it.
* everything else implements :class:`~canary_qwen.engines.base.Transcriber`, which takes one
  budget per clip (``ceil(tokens_per_second * clip duration)``).
"""
from __future__ import annotations

import gc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..engines.base import Transcription, pad_waveforms, until_eos

PER_CLIP = "per-clip"
PER_BATCH = "per-batch"


class BackendUnavailable(RuntimeError):
    """This backend cannot run here; the message says why (and what to install or pass)."""


@dataclass
class BackendOptions:
    model: str | None = None  # checkpoint directory or Hugging Face id (nemo, torch, torch-fast)
    export_dir: str | None = None  # `canary-qwen export` output (onnx, trt)
    device: str = "cpu"
    dtype: str = "fp32"
    url: str | None = None  # Triton server (triton)


class BenchBackend:
    """Adapter: ``transcribe(audios, budgets)`` with budgets per clip; subclasses set the rest."""

    name: str = "?"
    budget: str = PER_CLIP
    dtype: str | None = None
    device: str | None = None

    def __init__(self, engine, *, name: str, dtype: str | None, device: str | None):
        self.engine, self.name, self.dtype, self.device = engine, name, dtype, device

    def transcribe(self, audios: Sequence[np.ndarray], budgets: Sequence[int]) -> list[Transcription]:
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


# -- registry --------------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[[BackendOptions], BenchBackend]] = {}


def register(name: str):
    def wrap(factory: Callable[[BackendOptions], BenchBackend]):
        REGISTRY[name] = factory
        return factory

    return wrap


def create_backend(name: str, options: BackendOptions) -> BenchBackend:
    if name not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](options)


def _need_model(name: str, options: BackendOptions) -> str:
    if not options.model:
        raise BackendUnavailable(f"{name} needs --model (a checkpoint directory or Hugging Face id)")
    return options.model


def _export_dir(name: str, options: BackendOptions) -> str:
    if options.export_dir:
        return options.export_dir
    if options.model and (Path(options.model) / "manifest.json").is_file():
        return options.model
    raise BackendUnavailable(
        f"{name} needs an export directory: pass --export-dir DIR (create it with `canary-qwen export --model CKPT --out DIR`)"
    )


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"{what} is not available ({module}: {e})") from None


# -- NeMo ------------------------------------------------------------------------------------------


class NemoBackend(BenchBackend):
    """NeMo 3.0 ``SALM.generate`` exactly as its users (and the leaderboard script) call it."""

    budget = PER_BATCH

    def __init__(self, model_dir: str, *, device: str, dtype: str, prompt: str = "Transcribe the following:"):
        try:
            from nemo.collections.speechlm2.models import SALM
        except ImportError as e:
            raise BackendUnavailable(f"NeMo is not installed (pip install 'nemo-toolkit[asr]==3.0.0'): {e}") from None
        import torch
        from transformers import GenerationConfig

        from ..engines.torch_backend import DTYPES, resolve_device

        self.torch, self.generation_config = torch, GenerationConfig
        self.torch_device = resolve_device(device)
        model = SALM.from_pretrained(str(model_dir)).eval().to(DTYPES[dtype]).to(self.torch_device)
        super().__init__(model, name="nemo", dtype=dtype, device=device)
        self.message = f"{prompt} {model.audio_locator_tag}"

    def transcribe(self, audios, budgets) -> list[Transcription]:
        torch, model = self.torch, self.engine
        audio, lengths = pad_waveforms(audios)
        with torch.inference_mode():
            out = model.generate(
                prompts=[[{"role": "user", "content": self.message}]] * len(audios),
                audios=torch.from_numpy(audio).to(self.torch_device, non_blocking=True),
                audio_lens=torch.from_numpy(lengths).to(self.torch_device, non_blocking=True),
                # NeMo's own default config (greedy; its bos/eos/pad ids) with this batch's budget.
                generation_config=self.generation_config(
                    max_new_tokens=int(max(budgets)),
                    bos_token_id=model.text_bos_id,
                    eos_token_id=model.text_eos_id,
                    pad_token_id=model.text_pad_id,
                ),
            )
        eos = model.text_eos_id
        results = []
        for row in out.cpu().tolist():
            ids = until_eos(row, eos)
            results.append(Transcription(text=model.tokenizer.ids_to_text(ids).strip(), token_ids=ids))
        return results


@register("nemo")
def _nemo(options: BackendOptions) -> BenchBackend:
    return NemoBackend(_need_model("nemo", options), device=options.device, dtype=options.dtype)


# -- this package's engines ------------------------------------------------------------------------


@register("torch")
def _torch(options: BackendOptions) -> BenchBackend:
    from ..engines.torch_backend import TorchBackend

    engine = TorchBackend(_need_model("torch", options), device=options.device, dtype=options.dtype)
    return BenchBackend(engine, name="torch", dtype=options.dtype, device=options.device)


@register("torch-fast")
def _torch_fast(options: BackendOptions) -> BenchBackend:
    from ..engines.fast_torch import FastTorchBackend

    engine = FastTorchBackend(_need_model("torch-fast", options), device=options.device, dtype=options.dtype)
    return BenchBackend(engine, name="torch-fast", dtype=options.dtype, device=options.device)


@register("onnx")
def _onnx(options: BackendOptions) -> BenchBackend:
    export_dir = _export_dir("onnx", options)
    module = _import("canary_qwen.engines.onnx_backend", "the ONNX Runtime backend")
    try:
        engine = module.OnnxBackend(export_dir, device=options.device)
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # ArtifactError is a RuntimeError
        raise BackendUnavailable(f"cannot load the ONNX export in {export_dir}: {e}") from None
    # ONNX Runtime runs the fp32 encoder/decoder graphs whatever --dtype says.
    return BenchBackend(engine, name="onnx", dtype="fp32", device=options.device)


@register("triton")
def _triton(options: BackendOptions) -> BenchBackend:
    module = _import("canary_qwen.runtime.client", "the Triton client")
    url = options.url or "localhost:8000"
    try:
        engine = module.TritonBackend(url)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        message = str(e) if url in str(e) else f"cannot reach the Triton server at {url}: {e}"
        raise BackendUnavailable(message) from None
    # Precision is whatever the server's model repository was built with.
    return BenchBackend(engine, name="triton", dtype=None, device=engine.device)


@register("trt")
def _trt(options: BackendOptions) -> BenchBackend:
    from ..engines.errors import MissingDependencyError
    from ..engines.trtllm import TrtLlmBackend

    if not str(options.device).startswith("cuda"):
        raise BackendUnavailable(f"TensorRT-LLM runs on an NVIDIA GPU, not on {options.device}")
    export_dir = _export_dir("trt", options)
    try:
        engine = TrtLlmBackend(export_dir, device=options.device)
    except MissingDependencyError as e:
        raise BackendUnavailable(str(e)) from None
    return BenchBackend(engine, name="trt", dtype=engine.manifest.data.get("precision"), device=options.device)


BACKEND_NAMES = tuple(REGISTRY)
