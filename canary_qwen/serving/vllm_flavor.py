"""The ``vllm`` flavour of the Triton model repository: the onnx flavour's preprocessing and encoder, then one
python model that owns a vLLM engine (continuous batching across concurrent requests, tokens streamed).

| model | inputs | outputs |
| --- | --- | --- |
| ``preprocessing``, ``encoder`` | as in the onnx flavour | |
| ``vllm`` (decoupled) | PROMPT_IDS int64 [-1], EMBEDDINGS fp32 [-1, H], MAX_NEW_TOKENS int32 [1] (optional) | TEXT string [1] piece, OUTPUT_IDS int64 [-1] of the piece, per response |
| ``canary_qwen`` (ensemble, decoupled) | AUDIO fp32 [-1], PROMPT string [1] (optional), MAX_NEW_TOKENS int32 [1] (optional) | TEXT, OUTPUT_IDS pieces |
| ``canary_qwen_stream`` (ensemble, decoupled) | as ``canary_qwen`` | TEXT pieces |

Both ensembles contain the decoupled ``vllm`` step, so both are decoupled: Triton serves them over gRPC
streaming and HTTP generate_stream (``canary-qwen client`` reads them to their final response by itself).
The server's Python needs vLLM *and* numpy < 2 (the bundled Triton 2.51 python stub returns empty outputs
under numpy 2): scripts/setup.sh makes ``.venv-vllm`` that way; ``canary-qwen serve`` from it serves this.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..bounds import RequestBounds
from ..defaults import MAX_NEW_TOKENS
from ..errors import ArtifactError, UsageError
from ..export.manifest import read_manifest
from .config_check import check_ensemble
from .repo_files import (
    ENSEMBLE,
    PREPROCESSING,
    STREAM,
    audio_inputs,
    ensemble_step,
    io_block,
    max_new_tokens_input,
    python_model,
    replace_model_dirs,
    request_bounds,
    tensor,
    write_models,
    write_repo_info,
)

ENCODER, VLLM = "encoder", "vllm"
MODEL_NAMES = (PREPROCESSING, ENCODER, VLLM, ENSEMBLE, STREAM)


def _llm_artifacts(manifest) -> tuple[str, ...]:
    have = set(manifest.data["artifacts"])
    if {"llm_base", "lora"} <= have:
        return ("llm_base", "lora")
    if "llm_merged" in have:
        return ("llm_merged",)
    raise ArtifactError(f"{manifest.root} has no llm_merged (nor llm_base + lora): re-run `canary-qwen export`")


def _ensemble(name: str, max_batch: int, outputs: list[str]) -> str:
    names = [o.split('"')[1] for o in outputs]
    steps = [
        ensemble_step(
            PREPROCESSING, {"AUDIO": "AUDIO", "PROMPT": "PROMPT"}, {"PROMPT_IDS": "prompt_ids", "SAMPLES": "samples"}
        ),
        ensemble_step(ENCODER, {"AUDIO": "samples"}, {"EMBEDDINGS": "embeddings"}),
        ensemble_step(
            VLLM,
            {"PROMPT_IDS": "prompt_ids", "EMBEDDINGS": "embeddings", "MAX_NEW_TOKENS": "MAX_NEW_TOKENS"},
            {n: n for n in names},
        ),
    ]
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + io_block("input", audio_inputs() + [max_new_tokens_input()])
        + io_block("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


def model_configs(
    model: dict,
    *,
    max_batch: int,
    bounds: RequestBounds,
    device: str,
    kv_cache_gib: float,
    max_model_len: int,
) -> dict[str, str]:
    hidden = model["hidden_size"]
    max_audio_s, queue = bounds.max_audio_s, bounds.queue
    text, ids = tensor("TEXT", "TYPE_STRING", [1]), tensor("OUTPUT_IDS", "TYPE_INT64", [-1])
    return {
        PREPROCESSING: python_model(
            PREPROCESSING,
            max_batch,
            audio_inputs(),
            [tensor("PROMPT_IDS", "TYPE_INT64", [-1]), tensor("SAMPLES", "TYPE_FP32", [-1])],
            queue=queue,
            params={"max_audio_s": max_audio_s},
        ),
        ENCODER: python_model(
            ENCODER,
            max_batch,
            [tensor("AUDIO", "TYPE_FP32", [-1], ragged=True)],
            [tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden])],
            queue_delay_us=2000,
            queue=queue,
            params={"max_audio_s": max_audio_s, "device": device},
        ),
        # No batching delay: requests go to the engine as they come, and it batches them itself; the dynamic
        # batcher is there for its bounded queue.
        VLLM: python_model(
            VLLM,
            max_batch,
            [
                tensor("PROMPT_IDS", "TYPE_INT64", [-1]),
                tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden]),
                max_new_tokens_input(),
            ],
            [text, ids],
            queue_delay_us=0,
            queue=queue,
            decoupled=True,
            params={
                **bounds.budgets,
                "device": device,
                "kv_cache_gib": kv_cache_gib,
                "max_model_len": max_model_len,
            },
        ),
        ENSEMBLE: _ensemble(ENSEMBLE, max_batch, [text, ids]),
        STREAM: _ensemble(STREAM, max_batch, [text]),
    }


def generate_vllm_repo(
    export_dir,
    out_dir,
    *,
    max_batch: int = 8,
    max_audio_s: float | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_new_tokens_limit: int = 512,
    max_queue: int = 64,
    queue_timeout_s: float = 60.0,
    device: str = "cpu",
    kv_cache_gib: float = 1.0,
    max_model_len: int = 2048,
) -> Path:
    """Write the vllm-flavour model repository for the export in ``export_dir`` to ``out_dir``; returns it.

    ``kv_cache_gib``: the KV cache vLLM reserves on a CPU (on a GPU vLLM sizes it itself); ``max_model_len``:
    longest prompt + answer in tokens. The other settings, limits and queue bounds included, are the onnx
    flavour's (``generate_onnx_repo``); a request the ``vllm`` model accepted waits in vLLM's own scheduler, which
    batches as many as its KV cache holds.
    """
    if max_batch < 1 or kv_cache_gib <= 0 or max_model_len < 1:
        raise UsageError("max_batch and max_model_len must be >= 1, kv_cache_gib > 0")
    manifest = read_manifest(export_dir)
    bounds = request_bounds(
        manifest,
        max_audio_s=max_audio_s,
        max_new_tokens=max_new_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
        max_queue=max_queue,
        queue_timeout_s=queue_timeout_s,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = model_configs(
        manifest.model,
        max_batch=max_batch,
        bounds=bounds,
        device=device,
        kv_cache_gib=kv_cache_gib,
        max_model_len=max_model_len,
    )
    files = {
        PREPROCESSING: ("preprocessing.py", ("tokenizer",)),
        ENCODER: ("encoder.py", (manifest.onnx_name("encoder"),)),  # the graph the export has ONNX Runtime run
        VLLM: ("vllm_llm.py", ("tokenizer", "embed_tokens", *_llm_artifacts(manifest))),
    }
    replace_model_dirs(out, MODEL_NAMES)
    counts = write_models(out, manifest, configs, files)
    settings = {
        "max_batch": max_batch,
        **asdict(bounds),
        "device": device,
        "kv_cache_gib": kv_cache_gib,
        "max_model_len": max_model_len,
    }
    write_repo_info(out, "vllm", manifest.root, configs, settings, counts)
    check_ensemble(out, raise_on_problems=True)
    return out
