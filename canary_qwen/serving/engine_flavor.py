"""The ``torch-fast`` and ``vllm`` flavours of the Triton model repository: one decoupled python model that holds
an in-process engine (``canary_qwen.engines``) for every request, under the names every flavour has.

| model | inputs | outputs |
| --- | --- | --- |
| ``canary_qwen_stream`` (python, decoupled): the engine | AUDIO fp32 [-1] and PROMPT string [1] (optional), or DIALOGUE string [1]; MAX_NEW_TOKENS int32 [1] (optional) | TEXT string [1] piece, OUTPUT_IDS int64 [-1] of the piece, PROMPT_TOKENS int64 [1], per response |
| ``canary_qwen`` (python, not decoupled; ``models/gather.py``) | as ``canary_qwen_stream`` | TEXT, OUTPUT_IDS: the engine's answer, one response |

Both modes of the model come from the one engine: a request with AUDIO is transcribed (ASR mode, through the
LoRA), one with DIALOGUE instead (JSON turns, ``checks.read_dialogue``) is answered in LLM mode (the LoRA off),
each within its mode's bounds; they decode in the same running batch.

The streaming model is the engine itself, not an ensemble step: Triton checks an ensemble request's cancellation
only between its steps and never tells the model running a step (its ``is_cancelled()`` stays false), so a stream
whose reader leaves must reach the engine directly to stop decoding.

The engine (parameter ``engine``) is torch-fast (the fast PyTorch path on a checkpoint: int8 on CPUs with
VNNI/AMX, bf16 and CUDA graphs on GPUs) or vLLM (on an export, its encoder in ONNX Runtime). Requests join the
running batch between decode steps; a cancelled stream stops decoding. ``canary_qwen`` passes each request to the
engine as it comes (BLS) and answers with the engine's whole answer, so Triton's standard unary inference (HTTP
``/v2/models/canary_qwen/infer``, gRPC ModelInfer, perf_analyzer) reaches the engine; streams go to
``canary_qwen_stream`` (gRPC streaming, HTTP generate_stream). The vllm flavour's server needs vLLM *and* numpy < 2
(the bundled Triton 2.51 python stub returns empty outputs under numpy 2): scripts/setup.sh makes
``.venv-vllm`` that way.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..backends.engines import SOURCES
from ..bounds import RequestBounds
from ..errors import ArtifactError, UsageError
from ..export.manifest import read_manifest
from ..precision import resolve_precision
from .config_check import check_ensemble
from .repo_files import (
    ENSEMBLE,
    STREAM,
    VERSION,
    audio_inputs,
    copy_artifacts,
    dialogue_input,
    ensemble_outputs,
    link_or_copy,
    max_new_tokens_input,
    model_code,
    prompt_tokens_output,
    python_model,
    replace_model_dirs,
    write_models,
    write_repo_info,
)

ENGINE = STREAM
FLAVORS = ("torch-fast", "vllm")
# Replaced when a repository is written again: its models, and those the vllm flavour had before it was one model.
MODEL_NAMES = (ENGINE, ENSEMBLE, "preprocessing", "encoder", "vllm")


def _llm_artifacts(manifest) -> tuple[str, ...]:
    have = set(manifest.data["artifacts"])
    if {"llm_base", "lora"} <= have:
        return ("llm_base", "lora")
    if "llm_merged" in have:
        return ("llm_merged",)
    raise ArtifactError(f"{manifest.root} has no llm_merged (nor llm_base + lora): re-run `canary-qwen export`")


def model_configs(engine: str, *, max_batch: int, bounds: RequestBounds, params: dict) -> dict[str, str]:
    max_pending = str(max_batch + bounds.max_queue)  # the requests each model holds: the running ones and a queue
    return {
        # No dynamic batcher on either model: each execute returns at once, and requests reach the engine as they
        # come; it batches them itself (max_batch decode together) and holds at most max_pending (its slots and a
        # full queue), refusing one more as busy. With Triton's dynamic batcher (delay 0) in front, requests that
        # came while an execute ran waited up to 0.5 s for the next (measured: 16 requests at once reached the
        # engine in waves 0.5 s apart).
        ENGINE: python_model(
            ENGINE,
            max_batch,
            audio_inputs(optional=True) + [dialogue_input(), max_new_tokens_input()],
            ensemble_outputs() + [prompt_tokens_output()],
            decoupled=True,
            params={
                "engine": engine,
                "max_pending": max_pending,
                **bounds.parameters(),
                **params,
            },
        ),
        # Not decoupled, so unary clients reach it. Its execute hands each request to a thread that waits for the
        # engine's answer (models/gather.py). It answers TEXT and OUTPUT_IDS only: asking BLS for PROMPT_TOKENS as
        # well crashed its stub (a segfault in libpython, 3 runs of 5 here, async BLS); the prompt's length comes
        # from canary_qwen_stream.
        ENSEMBLE: python_model(
            ENSEMBLE,
            max_batch,
            audio_inputs(optional=True) + [dialogue_input(), max_new_tokens_input()],
            ensemble_outputs(),
            params={"engine_model": ENGINE, "max_pending": max_pending},
        ),
    }


def _link_checkpoint(source, dest: Path) -> dict[str, int]:
    """The checkpoint in NeMo's offline layout under ``dest``: its config and weights (linked), the tokenizer
    files and the Qwen3 config (``llm_backbone/config.json``), wherever the checkpoint found them."""
    from ..model.checkpoint import LLM_BACKBONE_DIR, WEIGHTS_FILE, resolve_checkpoint
    from ..model.tokenizer import TOKENIZER_FILES

    files = resolve_checkpoint(source)
    pairs = [(files.root / "config.json", "config.json"), (files.weights, WEIGHTS_FILE)]
    pairs += [(files.tokenizer_dir / f, f) for f in TOKENIZER_FILES]
    counts = {"linked": 0, "copied": 0}
    for src, name in pairs:
        counts[link_or_copy(src, dest / name)] += 1
    backbone = dest / LLM_BACKBONE_DIR / "config.json"
    backbone.parent.mkdir(parents=True, exist_ok=True)
    backbone.write_text(json.dumps(files.llm_config.raw, indent=2))
    return counts


def generate_engine_repo(
    engine: str,
    source,
    out_dir,
    *,
    max_batch: int = 16,
    bounds: RequestBounds | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    kv_cache_gib: float = 1.0,
) -> Path:
    """Write the ``engine`` flavour's repository (torch-fast on the checkpoint ``source``, vllm on the export
    ``source``) to ``out_dir``; returns it.

    ``max_batch``: requests decoding together (torch-fast's cache slots; vLLM batches as its KV cache allows);
    each engine is sized for the longest clip and the largest budget the bounds allow. ``dtype``: the engine's
    precision (torch-fast: fp32, bf16, fp16 or int8; vllm: fp32, bf16 or fp16; default: ``default_precision``
    for ``device``). ``kv_cache_gib``: the KV cache vLLM reserves on a CPU. ``bounds``: the limits and queue, as
    the onnx flavour's (``generate_onnx_repo``).
    """
    if engine not in FLAVORS:
        raise UsageError(f"unknown engine flavour {engine!r} (one of {', '.join(FLAVORS)})")
    if max_batch < 1 or kv_cache_gib <= 0:
        raise UsageError("max_batch must be >= 1, kv_cache_gib > 0")
    precision = resolve_precision(engine, dtype, device)
    assert precision is not None  # both engines take a precision
    settings: dict = {"max_batch": max_batch, "device": device, "dtype": precision.value}
    if engine == "vllm":
        manifest = read_manifest(source)
        export_root = manifest.root
        settings["kv_cache_gib"] = kv_cache_gib
    else:
        manifest, export_root = None, Path(source)
    bounds = (bounds or RequestBounds()).with_audio_limit(
        None if manifest is None else manifest.data.get("max_audio_s")
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = model_configs(engine, max_batch=max_batch, bounds=bounds, params=settings)
    replace_model_dirs(out, MODEL_NAMES)
    counts = write_models(out, manifest, configs, {})
    version_dir = out / ENGINE / VERSION
    (version_dir / "model.py").write_text(model_code("engine.py"))
    (out / ENSEMBLE / VERSION / "model.py").write_text(model_code("gather.py"))
    data = version_dir / SOURCES[engine]
    if manifest is not None:
        artifacts = ("tokenizer", "embed_tokens", manifest.onnx_name("encoder"), *_llm_artifacts(manifest))
        counts = copy_artifacts(manifest, artifacts, data)
    else:
        counts = _link_checkpoint(source, data)
    write_repo_info(out, engine, export_root, configs, {**asdict(bounds), **settings}, counts)
    check_ensemble(out, raise_on_problems=True)
    return out
