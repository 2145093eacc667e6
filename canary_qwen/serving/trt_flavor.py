"""The ``trt`` flavour of the Triton model repository, for NVIDIA's NGC Triton + TensorRT-LLM containers
(``tritonserver:<yy.mm>-trtllm-python-py3``, TensorRT-LLM 1.2.x inside). Its two engine models' configs
(``encoder``, a TensorRT plan; ``tensorrt_llm``, the C++ ``tensorrtllm`` backend) are ``trt_models``'.

Every text parses as ``tritonclient.grpc.model_config_pb2.ModelConfig``.

:func:`generate_trt_repo` writes the whole repository around those two: ``preprocessing`` (checks AUDIO,
tokenizes PROMPT; the onnx flavour's model plus AUDIO_LENGTH), ``prompt_table`` (frames -> fake ids +
prompt embedding table, python), ``postprocessing`` (ids -> TEXT), the ``canary_qwen`` ensemble
preprocessing -> encoder -> prompt_table -> tensorrt_llm -> postprocessing, and the ``canary_qwen_stream``
python model calling those (BLS) inside its ``execute``, one stream per instance, with the onnx flavour's public
interface. With streaming, ``tensorrt_llm`` is decoupled
(streaming needs it, and one engine serves both models), which makes the ensemble decoupled too:
Triton then serves it over gRPC streaming and HTTP generate_stream, not plain infer calls
(``TritonClient`` reads a decoupled model to its final response by itself); ``decoupled_streaming=False``
keeps it callable by plain HTTP/gRPC infer, without ``canary_qwen_stream``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

from ..bounds import RequestBounds
from ..defaults import ENGINE_DIR_IN_SERVER, KV_CACHE_FRACTION
from ..errors import ArtifactError, UsageError
from ..export.manifest import read_manifest
from ..export.tensorrt.llm_engine import default_engine_paths, engine_limits, read_engine_config
from .config_check import check_ensemble
from .repo_files import (
    ENSEMBLE,
    POSTPROCESSING,
    PREPROCESSING,
    STREAM,
    VERSION,
    audio_inputs,
    ensemble_outputs,
    ensemble_step,
    io_block,
    link_or_copy,
    max_new_tokens_input,
    python_model,
    replace_model_dirs,
    tensor,
    write_models,
    write_repo_info,
)
from .trt_models import ENCODER, ENCODER_PLAN, TENSORRT_LLM, encoder_config, tensorrt_llm_config, triton_dtype

PROMPT_TABLE = "prompt_table"
MODEL_NAMES = (PREPROCESSING, ENCODER, PROMPT_TABLE, TENSORRT_LLM, POSTPROCESSING, ENSEMBLE, STREAM)
_MODEL_FILES = {
    PREPROCESSING: ("preprocessing.py", ("tokenizer",)),
    PROMPT_TABLE: ("prompt_table.py", ()),
    POSTPROCESSING: ("postprocessing.py", ("tokenizer",)),
    STREAM: ("trt_stream.py", ("tokenizer",)),
}
# tensorrt_llm inputs the prompt_table model fills, with their data types ("table": the engine's dtype)
TABLE_OUTPUTS = (
    ("input_ids", "TYPE_INT32", [-1]),
    ("input_lengths", "TYPE_INT32", [1]),
    ("request_output_len", "TYPE_INT32", [1]),
    ("end_id", "TYPE_INT32", [1]),
    ("pad_id", "TYPE_INT32", [1]),
    ("prompt_embedding_table", "table", [-1, "H"]),
    ("prompt_vocab_size", "TYPE_INT32", [1]),
    ("prompt_table_extra_ids", "TYPE_UINT64", [-1]),
    ("streaming", "TYPE_BOOL", [1]),
)


def _python_configs(
    *,
    max_batch,
    hidden,
    embeddings_type,
    table_type,
    vocab_size,
    table_dtype,
    bounds: RequestBounds,
    decoupled_streaming,
    stream_instances,
    min_samples,
) -> dict[str, str]:
    table_outputs = [
        tensor(n, table_type if t == "table" else t, [hidden if d == "H" else d for d in dims])
        for n, t, dims in TABLE_OUTPUTS
    ]
    configs = {
        PREPROCESSING: python_model(
            PREPROCESSING,
            max_batch,
            audio_inputs(),
            [
                tensor("PROMPT_IDS", "TYPE_INT64", [-1]),
                tensor("SAMPLES", "TYPE_FP32", [-1]),
                tensor("AUDIO_LENGTH", "TYPE_INT64", [1]),
            ],
            # one clip per request; clips padded up to the encoder plan's profile minimum
            params={**bounds.parameters(), "min_samples": min_samples, "rows_per_request": 1},
        ),
        PROMPT_TABLE: python_model(
            PROMPT_TABLE,
            max_batch,
            [
                tensor("PROMPT_IDS", "TYPE_INT64", [-1]),
                tensor("EMBEDDINGS", embeddings_type, [-1, hidden]),
                tensor("EMBEDDING_LENGTH", "TYPE_INT64", [1]),
                max_new_tokens_input(),
            ],
            table_outputs,
            params={"vocab_size": vocab_size, "table_dtype": table_dtype, **bounds.parameters()},
        ),
        POSTPROCESSING: python_model(
            POSTPROCESSING,
            max_batch,
            [
                tensor("OUTPUT_IDS", "TYPE_INT32", [-1, -1]),
                tensor("SEQUENCE_LENGTH", "TYPE_INT32", [-1]),
            ],
            [tensor("TEXT", "TYPE_STRING", [1]), tensor("TOKEN_IDS", "TYPE_INT64", [-1])],
        ),
        ENSEMBLE: _ensemble_config(max_batch),
    }
    if decoupled_streaming:
        # No dynamic batcher: each instance streams one request at a time, inside execute (models/trt_stream.py)
        configs[STREAM] = python_model(
            STREAM,
            max_batch,
            audio_inputs() + [max_new_tokens_input()],
            ensemble_outputs(),
            instances=stream_instances,
            decoupled=True,
            params={
                **bounds.parameters(),
                "encoder_model": ENCODER,
                "llm_model": TENSORRT_LLM,
                "prompt_table_model": PROMPT_TABLE,
                "min_samples": min_samples,
            },
        )
    return configs


def _ensemble_config(max_batch: int) -> str:
    table = {name: name for name, _, _ in TABLE_OUTPUTS}
    steps = [
        ensemble_step(
            PREPROCESSING,
            {"AUDIO": "AUDIO", "PROMPT": "PROMPT"},
            {"PROMPT_IDS": "prompt_ids", "SAMPLES": "samples", "AUDIO_LENGTH": "audio_length"},
        ),
        ensemble_step(
            ENCODER,
            {"audio": "samples", "audio_lengths": "audio_length"},
            {"embeddings": "embeddings", "embedding_lengths": "embedding_lengths"},
        ),
        ensemble_step(
            PROMPT_TABLE,
            {
                "PROMPT_IDS": "prompt_ids",
                "EMBEDDINGS": "embeddings",
                "EMBEDDING_LENGTH": "embedding_lengths",
                "MAX_NEW_TOKENS": "MAX_NEW_TOKENS",
            },
            table,
        ),
        ensemble_step(TENSORRT_LLM, table, {"output_ids": "output_ids", "sequence_length": "sequence_length"}),
        ensemble_step(
            POSTPROCESSING,
            {"OUTPUT_IDS": "output_ids", "SEQUENCE_LENGTH": "sequence_length"},
            {"TEXT": "TEXT", "TOKEN_IDS": "OUTPUT_IDS"},
        ),
    ]
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + io_block("input", audio_inputs() + [max_new_tokens_input()])
        + io_block("output", ensemble_outputs())
        + "ensemble_scheduling {\n  step [\n"
        + ",\n".join(steps)
        + "\n  ]\n}\n"
    )


def _engines(export_dir, engines_dir) -> tuple[Path, Path]:
    paths = default_engine_paths(export_dir, engines_dir)
    plan, llm = paths["encoder"], paths["llm_engine"]
    missing = [str(p) for p in (plan, llm / "config.json") if not p.is_file()]
    if missing:
        raise ArtifactError(
            f"the trt flavour needs built engines; missing {', '.join(missing)}. Build them with "
            "`canary-qwen build-engines --artifacts EXPORT_DIR` (TensorRT 10.14 and TensorRT-LLM 1.2 on a GPU)"
        )
    return plan, llm


def _engine_bounds(bounds: RequestBounds, limits) -> RequestBounds:
    """``bounds`` with the token limit the LLM engine holds: the new tokens it was built for (max_seq_len -
    max_input_len) at most; a default budget over that is refused."""
    engine_tokens = limits.max_seq_len - limits.max_input_len
    if bounds.max_new_tokens > engine_tokens:
        raise UsageError(
            f"max_new_tokens {bounds.max_new_tokens} is over the {engine_tokens} new tokens the LLM engine was built "
            "for (max_seq_len - max_input_len): lower it or rebuild the engine"
        )
    return replace(bounds, max_new_tokens_limit=min(bounds.max_new_tokens_limit, engine_tokens))


def generate_trt_repo(
    export_dir,
    out_dir,
    *,
    engines_dir=None,
    max_batch: int | None = None,
    encoder_instances: int = 1,
    llm_instances: int = 1,
    queue_delay_us: int = 1000,
    decoupled_streaming: bool = True,
    stream_instances: int | None = None,
    bounds: RequestBounds | None = None,
    kv_cache_free_gpu_mem_fraction: float = KV_CACHE_FRACTION,
    enable_kv_cache_reuse: bool = True,
    engine_dir_in_server: str = ENGINE_DIR_IN_SERVER,
) -> Path:
    """Write the trt-flavour model repository for ``export_dir`` (with engines from ``canary-qwen
    build-engines``: ``EXPORT/trt/encoder.plan`` and ``EXPORT/trt/llm_engine/``, or ``engines_dir``
    holding the same names) to ``out_dir``; returns it.

    The engines are hard-linked (copied across file systems) into the repository: the plan as
    ``encoder/1/model.plan``, the LLM engine into ``tensorrt_llm/1/``. ``tensorrt_llm`` opens its engine
    by absolute path (``gpt_model_path``): ``engine_dir_in_server`` is that folder as the server sees it, by
    default ``/models/tensorrt_llm/1`` (the repository mounted at ``/models``); a server started on the
    repository where it is written needs the absolute ``OUT_DIR/tensorrt_llm/1`` instead. The export's engine
    build record (``build-engines``) gives the encoder plan's profile minimum the clips are padded to.
    ``max_batch`` defaults to, and may not exceed, the LLM engine's max batch size. ``stream_instances``: instances
    of ``canary_qwen_stream``, each serving one stream at a time (default: ``max_batch``, the streams the engine
    decodes together). ``bounds``: the longest clip (default: the export's max_audio_s) and the token budgets; a
    request may ask for at most the new tokens the LLM engine was built for (max_seq_len - max_input_len), less
    where ``bounds`` say less. Queue bounds are not applied here: TensorRT-LLM schedules its own requests.
    """
    manifest = read_manifest(export_dir)
    plan, llm = _engines(export_dir, engines_dir)
    min_samples = int(manifest.engine_build()["encoder_profile"]["min_samples"])
    limits = engine_limits(read_engine_config(llm))
    max_batch = limits.max_batch_size if max_batch is None else max_batch
    if not 1 <= max_batch <= limits.max_batch_size:
        raise UsageError(
            f"max_batch must be in 1..{limits.max_batch_size} (the LLM engine's max batch size), got {max_batch}"
        )
    stream_instances = max_batch if stream_instances is None else stream_instances
    if min(encoder_instances, llm_instances, stream_instances) < 1 or queue_delay_us < 0:
        raise UsageError("instances must be >= 1, queue_delay_us >= 0")
    bounds = _engine_bounds(bounds or RequestBounds(), limits).with_audio_limit(manifest.data.get("max_audio_s"))
    max_audio_s = bounds.audio_s
    frames = math.ceil(max_audio_s * manifest.model["frames_per_second"])
    if frames > limits.max_prompt_vocab_size:
        raise UsageError(
            f"clips of {max_audio_s:g} s give {frames} audio frames, but the LLM engine takes at most "
            f"{limits.max_prompt_vocab_size} per request (max_prompt_embedding_table_size / max_batch_size): "
            "lower max_audio_s or rebuild the engine"
        )
    hidden = manifest.model["hidden_size"]
    if hidden != limits.hidden_size:
        raise UsageError(
            f"the LLM engine has hidden size {limits.hidden_size}, the export {hidden}: they come from different models"
        )
    embeddings_dtype = "bfloat16" if manifest.data.get("trt_encoder", "encoder").endswith("bf16") else "float32"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    replace_model_dirs(out, MODEL_NAMES)
    engine_home = out / TENSORRT_LLM / VERSION
    configs = _python_configs(
        max_batch=max_batch,
        hidden=hidden,
        embeddings_type=triton_dtype(embeddings_dtype),
        table_type=triton_dtype(limits.dtype),
        vocab_size=limits.vocab_size,
        table_dtype=limits.dtype,
        bounds=bounds,
        decoupled_streaming=decoupled_streaming,
        stream_instances=stream_instances,
        min_samples=min_samples,
    )
    configs[ENCODER] = encoder_config(
        max_batch=max_batch,
        instances=encoder_instances,
        queue_delay_us=queue_delay_us,
        hidden_size=hidden,
        embeddings_dtype=embeddings_dtype,
    )
    configs[TENSORRT_LLM] = tensorrt_llm_config(
        engine_dir=engine_dir_in_server,
        max_batch=max_batch,
        engine_dtype=limits.dtype,
        decoupled=decoupled_streaming,
        instances=llm_instances,
        kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
        enable_kv_cache_reuse=enable_kv_cache_reuse,
    )
    counts = write_models(out, manifest, configs, _MODEL_FILES)
    engine_files = [(plan, out / ENCODER / VERSION / ENCODER_PLAN)]
    engine_files += [(f, engine_home / f.name) for f in sorted(llm.iterdir()) if f.is_file()]
    for src, dst in engine_files:
        counts[link_or_copy(src, dst)] += 1
    write_repo_info(
        out,
        "trt",
        manifest.root,
        configs,
        {
            "max_batch": max_batch,
            "encoder_instances": encoder_instances,
            "llm_instances": llm_instances,
            "queue_delay_us": queue_delay_us,
            "decoupled_streaming": decoupled_streaming,
            "stream_instances": stream_instances,
            **asdict(bounds),
            "engine_dtype": limits.dtype,
            "embeddings_dtype": embeddings_dtype,
            "vocab_size": limits.vocab_size,
            "llm_engine": str(llm.resolve()),
            "encoder_plan": str(plan.resolve()),
            "engine_dir_in_server": engine_dir_in_server,
            "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
        },
        counts,
    )
    check_ensemble(out, raise_on_problems=True)
    return out
