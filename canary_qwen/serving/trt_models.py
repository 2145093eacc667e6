"""config.pbtxt texts of the ``trt`` flavour's two engine models, for NVIDIA's NGC Triton + TensorRT-LLM containers:

- ``encoder``: the audio encoder as a TensorRT plan (``platform: "tensorrt_plan"``, file ``model.plan``
  built by :func:`canary_qwen.export.tensorrt.encoder_engine.build_encoder_engine`), dynamic batching. Triton
  batches only requests of equal sample counts into one execution (TensorRT inputs are not ragged).
- ``tensorrt_llm``: the C++ ``tensorrtllm`` backend serving the Qwen3 engine (built by
  :func:`canary_qwen.export.tensorrt.llm_engine.build_llm_engine`), with the inputs and outputs of
  TensorRT-LLM's own template (docs/tensorrt-llm.md, "Triton model", says which version); audio goes in
  through ``prompt_embedding_table`` [T, H] and ``prompt_table_extra_ids`` (``canary_qwen.protocol.prompt_table``).
  Streaming needs ``model_transaction_policy { decoupled: true }``.

Every text parses as ``tritonclient.grpc.model_config_pb2.ModelConfig``; ``trt_flavor`` writes the repository
around them.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from ..defaults import KV_CACHE_FRACTION
from ..errors import UsageError
from ..precision import Precision
from .repo_files import io_block, params_block, tensor

ENCODER, TENSORRT_LLM = "encoder", "tensorrt_llm"
ENCODER_PLAN = "model.plan"
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"  # as in the template

# (name, data_type, dims, reshape_to_scalar, optional, allow_ragged_batch), in the template's order.
# "${...}" data types are filled by tensorrt_llm_config().
TENSORRT_LLM_INPUTS = (
    ("input_ids", "TYPE_INT32", (-1,), False, True, True),
    ("encoder_input_features", "${encoder_input_features_data_type}", (-1, -1), False, True, True),
    ("encoder_output_lengths", "TYPE_INT32", (1,), True, True, False),
    ("input_lengths", "TYPE_INT32", (1,), True, False, False),
    ("request_output_len", "TYPE_INT32", (1,), True, False, False),
    ("num_return_sequences", "TYPE_INT32", (1,), True, True, False),
    ("draft_input_ids", "TYPE_INT32", (-1,), False, True, True),
    ("decoder_input_ids", "TYPE_INT32", (-1,), False, True, True),
    ("decoder_input_lengths", "TYPE_INT32", (1,), True, True, False),
    ("draft_logits", "${logits_datatype}", (-1, -1), False, True, True),
    ("draft_acceptance_threshold", "TYPE_FP32", (1,), True, True, False),
    ("end_id", "TYPE_INT32", (1,), True, True, False),
    ("pad_id", "TYPE_INT32", (1,), True, True, False),
    ("stop_words_list", "TYPE_INT32", (2, -1), False, True, True),
    ("bad_words_list", "TYPE_INT32", (2, -1), False, True, True),
    ("embedding_bias", "TYPE_FP32", (-1,), False, True, True),
    ("beam_width", "TYPE_INT32", (1,), True, True, False),
    ("temperature", "TYPE_FP32", (1,), True, True, False),
    ("runtime_top_k", "TYPE_INT32", (1,), True, True, False),
    ("runtime_top_p", "TYPE_FP32", (1,), True, True, False),
    ("runtime_top_p_min", "TYPE_FP32", (1,), True, True, False),
    ("runtime_top_p_decay", "TYPE_FP32", (1,), True, True, False),
    ("runtime_top_p_reset_ids", "TYPE_INT32", (1,), True, True, False),
    ("len_penalty", "TYPE_FP32", (1,), True, True, False),
    ("early_stopping", "TYPE_BOOL", (1,), True, True, False),
    ("repetition_penalty", "TYPE_FP32", (1,), True, True, False),
    ("min_tokens", "TYPE_INT32", (1,), True, True, False),
    ("beam_search_diversity_rate", "TYPE_FP32", (1,), True, True, False),
    ("presence_penalty", "TYPE_FP32", (1,), True, True, False),
    ("frequency_penalty", "TYPE_FP32", (1,), True, True, False),
    ("seed", "TYPE_UINT64", (1,), True, True, False),
    ("return_log_probs", "TYPE_BOOL", (1,), True, True, False),
    ("return_context_logits", "TYPE_BOOL", (1,), True, True, False),
    ("return_generation_logits", "TYPE_BOOL", (1,), True, True, False),
    ("return_perf_metrics", "TYPE_BOOL", (1,), True, True, False),
    ("return_num_input_tokens", "TYPE_BOOL", (1,), True, True, False),
    ("return_num_output_tokens", "TYPE_BOOL", (1,), True, True, False),
    ("exclude_input_in_output", "TYPE_BOOL", (1,), True, True, False),
    ("stop", "TYPE_BOOL", (1,), True, True, False),
    ("streaming", "TYPE_BOOL", (1,), True, True, False),
    ("prompt_embedding_table", "${prompt_embedding_table_data_type}", (-1, -1), False, True, True),
    ("prompt_table_extra_ids", "TYPE_UINT64", (-1,), False, True, True),
    ("prompt_vocab_size", "TYPE_INT32", (1,), True, True, False),
    ("cross_attention_mask", "TYPE_BOOL", (-1, -1), False, True, True),
    ("mrope_rotary_cos_sin", "TYPE_FP32", (-1,), False, True, False),
    ("mrope_position_deltas", "TYPE_INT64", (1,), False, True, False),
    ("lora_task_id", "TYPE_UINT64", (1,), True, True, False),
    ("lora_weights", "TYPE_FP16", (-1, -1), False, True, True),
    ("lora_config", "TYPE_INT32", (-1, 3), False, True, True),
    ("context_phase_params", "TYPE_UINT8", (-1,), False, True, True),
    ("skip_cross_attn_blocks", "TYPE_BOOL", (1,), False, True, True),
    ("retention_token_range_starts", "TYPE_INT32", (-1,), False, True, True),
    ("retention_token_range_ends", "TYPE_INT32", (-1,), False, True, True),
    ("retention_token_range_priorities", "TYPE_INT32", (-1,), False, True, True),
    ("retention_token_range_durations_ms", "TYPE_INT32", (-1,), False, True, True),
    ("retention_decode_priority", "TYPE_INT32", (1,), False, True, True),
    ("retention_decode_duration_ms", "TYPE_INT32", (1,), False, True, True),
    ("guided_decoding_guide_type", "TYPE_STRING", (1,), False, True, True),
    ("guided_decoding_guide", "TYPE_STRING", (1,), False, True, True),
    ("lookahead_window_size", "TYPE_INT32", (1,), False, True, True),
    ("lookahead_ngram_size", "TYPE_INT32", (1,), False, True, True),
    ("lookahead_verification_set_size", "TYPE_INT32", (1,), False, True, True),
)

# (name, data_type, dims), in the template's order.
TENSORRT_LLM_OUTPUTS = (
    ("output_ids", "TYPE_INT32", (-1, -1)),
    ("sequence_length", "TYPE_INT32", (-1,)),
    ("cum_log_probs", "TYPE_FP32", (-1,)),
    ("output_log_probs", "TYPE_FP32", (-1, -1)),
    ("context_logits", "${logits_datatype}", (-1, -1)),
    ("generation_logits", "${logits_datatype}", (-1, -1, -1)),
    ("batch_index", "TYPE_INT32", (1,)),
    ("sequence_index", "TYPE_INT32", (1,)),
    ("context_phase_params", "TYPE_UINT8", (-1,)),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,)),
    ("kv_cache_reused_blocks", "TYPE_INT32", (1,)),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", (1,)),
    ("arrival_time_ns", "TYPE_INT64", (1,)),
    ("first_scheduled_time_ns", "TYPE_INT64", (1,)),
    ("first_token_time_ns", "TYPE_INT64", (1,)),
    ("last_token_time_ns", "TYPE_INT64", (1,)),
    ("acceptance_rate", "TYPE_FP32", (1,)),
    ("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
    ("total_draft_tokens", "TYPE_INT32", (1,)),
    ("num_input_tokens", "TYPE_INT32", (1,)),
    ("num_output_tokens", "TYPE_INT32", (1,)),
)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def triton_dtype(dtype: str) -> str:
    return Precision.parse_float(dtype).triton_type


def encoder_config(
    *,
    max_batch: int,
    instances: int = 1,
    queue_delay_us: int = 1000,
    hidden_size: int = 2048,
    embeddings_dtype: str = "float32",
    name: str = ENCODER,
    gpus: list[int] | None = None,
) -> str:
    """The TensorRT-plan encoder: ``audio`` [B, S] fp32 + ``audio_lengths`` [B] int64 ->
    ``embeddings`` [B, T, H] (the plan's output dtype: fp32, or bf16 for the bf16 graph) + ``embedding_lengths`` [B].

    ``max_batch`` must not exceed the plan's profile maximum. ``[B]`` tensors are ``dims: [1]`` with
    ``reshape: { shape: [ ] }`` (the engine sees [B]).
    """
    if max_batch < 1 or instances < 1:
        raise UsageError("max_batch and instances must be >= 1")
    gpu_list = f" gpus: [ {', '.join(str(g) for g in gpus)} ]" if gpus else ""
    text = (
        f'name: "{name}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "{ENCODER_PLAN}"\n'
        f"max_batch_size: {max_batch}\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
    )
    text += io_block(
        "input",
        [
            tensor("audio", "TYPE_FP32", (-1,)),
            tensor("audio_lengths", "TYPE_INT64", (1,), scalar=True),
        ],
    )
    text += io_block(
        "output",
        [
            tensor("embeddings", triton_dtype(embeddings_dtype), (-1, hidden_size)),
            tensor("embedding_lengths", "TYPE_INT64", (1,), scalar=True),
        ],
    )
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU{gpu_list}\n  }}\n]\n"
    return text


def tensorrt_llm_config(
    *,
    engine_dir: str,
    max_batch: int,
    engine_dtype: str = "bfloat16",
    decoupled: bool = False,
    instances: int = 1,
    queue_delay_us: int = 0,
    max_queue_size: int = 0,
    kv_cache_free_gpu_mem_fraction: float = KV_CACHE_FRACTION,
    enable_kv_cache_reuse: bool = True,
    batching_strategy: str = "inflight_fused_batching",
    batch_scheduler_policy: str = "max_utilization",
    enable_chunked_context: bool = False,
    exclude_input_in_output: bool = True,
    max_tokens_in_paged_kv_cache: int | None = None,
    logits_datatype: str = "TYPE_FP32",
    encoder_input_features_data_type: str = "TYPE_FP16",
    gpu_device_ids: str | None = None,
    name: str = TENSORRT_LLM,
) -> str:
    """The ``tensorrtllm`` C++ backend model (TensorRT-LLM 1.2.x template, ``${...}`` filled).

    ``engine_dir`` is the engine folder as the server sees it (``gpt_model_path``). ``decoupled``: one
    response per token for requests with ``streaming`` true (required for streaming). ``instances``: the
    template runs one CPU-kind instance that owns the GPU(s); more instances mean more executors (use
    ``gpu_device_ids``, ';'-separated per instance). ``enable_kv_cache_reuse`` needs an engine with paged
    context FMHA, and every request with a prompt table must then send ``prompt_table_extra_ids``.
    """
    if not PurePosixPath(engine_dir).is_absolute():
        raise UsageError(
            f"the engine folder as the server sees it must be an absolute path, got {engine_dir!r} "
            "(tensorrt_llm does not resolve gpt_model_path against the model repository)"
        )
    if batching_strategy not in ("inflight_fused_batching", "inflight_batching", "V1"):
        raise UsageError(
            f"batching_strategy must be inflight_fused_batching, inflight_batching or V1, got {batching_strategy!r}"
        )
    if batch_scheduler_policy not in ("max_utilization", "guaranteed_no_evict"):
        raise UsageError(
            f"batch_scheduler_policy must be max_utilization or guaranteed_no_evict, got {batch_scheduler_policy!r}"
        )
    if not 0.0 < kv_cache_free_gpu_mem_fraction <= 1.0:
        raise UsageError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {kv_cache_free_gpu_mem_fraction}")
    if max_batch < 1 or instances < 1:
        raise UsageError("max_batch and instances must be >= 1")
    fill = {
        "${prompt_embedding_table_data_type}": triton_dtype(engine_dtype),
        "${logits_datatype}": triton_dtype(logits_datatype),
        "${encoder_input_features_data_type}": triton_dtype(encoder_input_features_data_type),
    }
    text = (
        f'name: "{name}"\nbackend: "tensorrtllm"\nmax_batch_size: {max_batch}\n\n'
        f"model_transaction_policy {{\n  decoupled: {_flag(decoupled)}\n}}\n\n"
        "dynamic_batching {\n"
        f"    preferred_batch_size: [ {max_batch} ]\n"
        f"    max_queue_delay_microseconds: {queue_delay_us}\n"
        f"    default_queue_policy: {{ max_queue_size: {max_queue_size} }}\n"
        "}\n\n"
    )
    text += io_block(
        "input",
        [tensor(n, fill.get(t, t), d, scalar=s, optional=o, ragged=r) for n, t, d, s, o, r in TENSORRT_LLM_INPUTS],
    )
    text += io_block("output", [tensor(n, fill.get(t, t), d) for n, t, d in TENSORRT_LLM_OUTPUTS])
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind : KIND_CPU\n  }}\n]\n"
    params = {
        "max_beam_width": 1,
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "gpt_model_type": batching_strategy,
        "gpt_model_path": engine_dir,
        "batch_scheduler_policy": batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": _flag(enable_kv_cache_reuse),
        "enable_chunked_context": _flag(enable_chunked_context),
        "exclude_input_in_output": _flag(exclude_input_in_output),
        "executor_worker_path": EXECUTOR_WORKER,
        # read with no default by the 1.2 backend (a missing key fails the load); empty: guided decoding off
        "tokenizer_dir": "",
        "xgrammar_tokenizer_info_path": "",
        "guided_decoding_backend": "",
    }
    if max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = int(max_tokens_in_paged_kv_cache)
    if gpu_device_ids is not None:
        params["gpu_device_ids"] = gpu_device_ids
    return text + params_block(params)


# -- the whole repository --------------------------------------------------------------------------------
