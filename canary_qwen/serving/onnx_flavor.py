"""The ``onnx`` flavour of the Triton model repository: every model is a python-backend model running
ONNX Runtime (or plain Python), so it serves on a CPU with the tritonserver bundled in nvidia-pytriton.

Models (tensor names; shapes without the batch dimension, every model has max_batch_size > 0):

| model | inputs | outputs |
| --- | --- | --- |
| ``preprocessing`` | AUDIO fp32 [-1], PROMPT string [1] (optional) | PROMPT_IDS int64 [-1], SAMPLES fp32 [-1] (AUDIO, checked) |
| ``encoder`` | AUDIO fp32 [-1] (ragged, dynamic batching) | EMBEDDINGS fp32 [-1, H] |
| ``llm`` | PROMPT_IDS int64 [-1], EMBEDDINGS fp32 [-1, H] (ragged, dynamic batching), MAX_NEW_TOKENS int32 [1] (optional) | OUTPUT_IDS int64 [-1] |
| ``postprocessing`` | OUTPUT_IDS int64 [-1] | TEXT string [1], TOKEN_IDS int64 [-1] (the ids again) |
| ``canary_qwen`` (ensemble) | AUDIO fp32 [-1], PROMPT string [1] (optional), MAX_NEW_TOKENS int32 [1] (optional) | TEXT string [1], OUTPUT_IDS int64 [-1] |
| ``canary_qwen_stream`` (decoupled) | as ``canary_qwen`` (AUDIO ragged, dynamic batching) | TEXT string [1] pieces, then an empty final response |

The last exists with ``decoupled_streaming=True``. It does the whole job inside its own process (input
checks, encoder, decoding, text pieces; ``models/onnx_stream.py``) instead of calling ``encoder`` and a
decoupled llm: Triton 2.51's python stub corrupted its heap under concurrent streams when model-to-model
calls were made from threads, and an ensemble does not pass a client's cancellation on to a decoupled step.

Bounds: every python model's queue holds at most ``max_queue`` requests and refuses one that waited longer
than ``queue_timeout_s``; a request may ask up to ``max_new_tokens_limit`` tokens and send up to
``max_audio_s`` seconds of audio.

Every artifact a model reads is hard-linked (copied across file systems) into its version folder with
a ``manifest.json`` of its own, so the repository can be moved or copied as a whole. The model code is
``canary_qwen.serving.models.*``, copied as ``model.py``; it imports ``canary_qwen``, so the server's
Python (the one its python stub runs) must have this package installed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..bounds import RequestBounds
from ..errors import UsageError
from ..export.manifest import read_manifest
from .config_check import check_ensemble
from .repo_files import (
    ENSEMBLE,
    POSTPROCESSING,
    PREPROCESSING,
    STREAM,
    audio_inputs,
    ensemble_outputs,
    ensemble_step,
    io_block,
    max_new_tokens_input,
    python_model,
    replace_model_dirs,
    tensor,
    write_models,
    write_repo_info,
)

ENCODER, LLM = "encoder", "llm"
MODEL_NAMES = (PREPROCESSING, ENCODER, LLM, POSTPROCESSING, ENSEMBLE, STREAM)
RETIRED = ("llm_stream",)  # models of older repositories, removed when a repository is written again

# model -> (code file in canary_qwen.serving.models, artifacts it reads; encoder/decoder: roles, see Manifest.onnx_name)
_MODEL_FILES = {
    PREPROCESSING: ("preprocessing.py", ("tokenizer",)),
    ENCODER: ("encoder.py", ("encoder",)),
    LLM: ("llm.py", ("decoder", "embed_tokens")),
    POSTPROCESSING: ("postprocessing.py", ("tokenizer",)),
    STREAM: ("onnx_stream.py", ("tokenizer", "encoder", "decoder", "embed_tokens")),
}


def _llm_tensors(hidden: int) -> tuple[list[str], list[str]]:
    inputs = [
        tensor("PROMPT_IDS", "TYPE_INT64", [-1], ragged=True),
        tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden], ragged=True),
        max_new_tokens_input(),
    ]
    return inputs, [tensor("OUTPUT_IDS", "TYPE_INT64", [-1])]


def ensemble_config(max_batch: int) -> str:
    inputs = audio_inputs() + [max_new_tokens_input()]
    outputs = ensemble_outputs()
    steps = [
        # A chain, not preprocessing and encoder side by side: when two parallel steps of one request both
        # fail, Triton 2.51's gRPC endpoint can stop answering later ensemble requests (measured; HTTP is
        # unaffected). preprocessing checks the audio and hands the checked samples on.
        ensemble_step(
            PREPROCESSING, {"AUDIO": "AUDIO", "PROMPT": "PROMPT"}, {"PROMPT_IDS": "prompt_ids", "SAMPLES": "samples"}
        ),
        ensemble_step(ENCODER, {"AUDIO": "samples"}, {"EMBEDDINGS": "embeddings"}),
        ensemble_step(
            LLM,
            {"PROMPT_IDS": "prompt_ids", "EMBEDDINGS": "embeddings", "MAX_NEW_TOKENS": "MAX_NEW_TOKENS"},
            {"OUTPUT_IDS": "output_ids"},
        ),
        # OUTPUT_IDS comes back from postprocessing, not straight from llm: Triton 2.51 prunes an ensemble
        # output the client did not ask for even when a later step reads it ("unexpected deadlock").
        ensemble_step(POSTPROCESSING, {"OUTPUT_IDS": "output_ids"}, {"TEXT": "TEXT", "TOKEN_IDS": "OUTPUT_IDS"}),
    ]
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + io_block("input", inputs)
        + io_block("output", outputs)
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


def model_configs(
    model: dict,
    *,
    max_batch: int,
    instances: int,
    queue_delay_us: int,
    decoupled_streaming: bool,
    bounds: RequestBounds,
    device: str,
    ort_threads: int,
) -> dict[str, str]:
    """config.pbtxt text for every model of the repository, by model name."""
    hidden = model["hidden_size"]
    runtime = {"device": device, "ort_threads": ort_threads}
    limits, queue = bounds.parameters(), bounds.queue
    llm_in, llm_out = _llm_tensors(hidden)
    configs = {
        PREPROCESSING: python_model(
            PREPROCESSING,
            max_batch,
            audio_inputs(),
            [tensor("PROMPT_IDS", "TYPE_INT64", [-1]), tensor("SAMPLES", "TYPE_FP32", [-1])],
            queue=queue,
            params=limits,
        ),
        ENCODER: python_model(
            ENCODER,
            max_batch,
            [tensor("AUDIO", "TYPE_FP32", [-1], ragged=True)],
            [tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden])],
            instances=instances,
            queue_delay_us=queue_delay_us,
            queue=queue,
            params={**limits, **runtime},
        ),
        LLM: python_model(
            LLM,
            max_batch,
            llm_in,
            llm_out,
            instances=instances,
            queue_delay_us=queue_delay_us,
            queue=queue,
            params={**limits, **runtime},
        ),
        POSTPROCESSING: python_model(
            POSTPROCESSING,
            max_batch,
            [tensor("OUTPUT_IDS", "TYPE_INT64", [-1])],
            [tensor("TEXT", "TYPE_STRING", [1]), tensor("TOKEN_IDS", "TYPE_INT64", [-1])],
            queue=queue,
        ),
        ENSEMBLE: ensemble_config(max_batch),
    }
    if decoupled_streaming:
        # AUDIO ragged: concurrent streams of different lengths are batched into one decode
        stream_in = [tensor("AUDIO", "TYPE_FP32", [-1], ragged=True)] + audio_inputs()[1:] + [max_new_tokens_input()]
        configs[STREAM] = python_model(
            STREAM,
            max_batch,
            stream_in,
            ensemble_outputs(),
            instances=instances,
            queue_delay_us=queue_delay_us,
            queue=queue,
            decoupled=True,
            params={**limits, **runtime},
        )
    return configs


def generate_onnx_repo(
    export_dir,
    out_dir,
    *,
    max_batch: int = 8,
    instances: int = 1,
    queue_delay_us: int = 2000,
    decoupled_streaming: bool = True,
    bounds: RequestBounds | None = None,
    device: str = "cpu",
    ort_threads: int = 0,
) -> Path:
    """Write the onnx-flavour model repository for the export in ``export_dir`` to ``out_dir``; returns it.

    ``max_batch``: largest batch each model takes (and the ensemble's max_batch_size); ``instances``:
    instances of encoder / llm / canary_qwen_stream; ``queue_delay_us``: how long their dynamic batchers wait to
    fill a batch; ``bounds``: the longest clip accepted (default: the export's max_audio_s), the default decoding
    budget and the most a request may ask for (one request decodes alone in its batch for as long as it asks,
    holding up the others), the requests each model keeps waiting before it refuses more (the client tries another
    server) and the longest wait in a queue before a request is refused; ``device``: cpu, or
    cuda with onnxruntime-gpu in the server's Python; ``ort_threads``: intra-op threads per session (0:
    ONNX Runtime's default). Folders of this repository's model names in ``out_dir`` are replaced;
    anything else there is left alone.
    """
    if min(max_batch, instances) < 1 or min(queue_delay_us, ort_threads) < 0:
        raise UsageError("max_batch and instances must be >= 1; queue_delay_us and ort_threads >= 0")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"device must be cpu or cuda, got {device!r}")
    manifest = read_manifest(export_dir)
    bounds = (bounds or RequestBounds()).with_audio_limit(manifest.data.get("max_audio_s"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = model_configs(
        manifest.model,
        max_batch=max_batch,
        instances=instances,
        queue_delay_us=queue_delay_us,
        decoupled_streaming=decoupled_streaming,
        bounds=bounds,
        device=device,
        ort_threads=ort_threads,
    )
    replace_model_dirs(out, MODEL_NAMES + RETIRED)  # a stale canary_qwen_stream from an earlier run must go too
    # The encoder and decoder the export has ONNX Runtime run (fp16, int8, int4 where it chose one).
    files = {
        model: (code, tuple(manifest.onnx_name(a) if a in ("encoder", "decoder") else a for a in artifacts))
        for model, (code, artifacts) in _MODEL_FILES.items()
    }
    counts = write_models(out, manifest, configs, files)
    write_repo_info(
        out,
        "onnx",
        manifest.root,
        configs,
        {
            "max_batch": max_batch,
            "instances": instances,
            "queue_delay_us": queue_delay_us,
            "decoupled_streaming": decoupled_streaming,
            **asdict(bounds),
            "device": device,
            "ort_threads": ort_threads,
        },
        counts,
    )
    check_ensemble(out, raise_on_problems=True)
    return out
