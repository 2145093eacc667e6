"""What TensorRT-LLM 1.2's Triton backend (``backend: "tensorrtllm"``) demands of a model config and of every
request, as read from its source. TensorRT-LLM cannot be installed or run here, so the tests check each
``tensorrt_llm`` config we generate and each request we send to that model against these facts, and a stand-in
model (``standins/tensorrt_llm_model.py``) applies the same checks inside the real Triton server.

Source: NVIDIA/TensorRT-LLM, ``triton_backend/inflight_batcher_llm/src/``: ``model_instance_state.cc`` and the
template ``triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt`` at 1.2.0rc8 (commit
0c8de69a1ca6); ``utils.cc`` at c8c6df08 (the same functions at 19290813); ``model_state.cc`` at 5cdd6921.
Nothing here is taken from our own code: the values are the backend's.
"""

from __future__ import annotations

import os

import numpy as np

# model_state.cc, ModelState::GetParameter<std::string>: a key missing from `parameters` throws
# "Cannot find parameter with name: <name>". model_instance_state.cc reads these with no try/catch, so a missing
# one fails the instance ("unexpected error when creating modelInstanceState"):
#   getBatchingTypeFromParams()          -> gpt_model_type
#   getGuidedDecodingConfigFromParams()  -> tokenizer_dir, xgrammar_tokenizer_info_path, guided_decoding_backend
PARAMETERS_READ_WITHOUT_FALLBACK = frozenset(
    {"gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"}
)
# getBatchingTypeFromParams(): anything else throws "Invalid gpt_model_type".
GPT_MODEL_TYPES = frozenset({"V1", "v1", "inflight_batching", "inflight_fused_batching"})
# getGuidedDecodingConfigFromParams(): guided decoding stays off when the backend or the info path is empty or
# still the template's placeholder; otherwise the info path must exist and the backend must be "xgrammar".
GUIDED_DECODING_OFF_VALUES = {
    "guided_decoding_backend": ("", "${guided_decoding_backend}"),
    "xgrammar_tokenizer_info_path": ("", "${xgrammar_tokenizer_info_path}"),
}
# model_state.cc, GetParameter<bool>: exactly these strings; any other throws, and the try/catch around each
# boolean parameter in model_instance_state.cc then silently keeps the backend's default.
TRUE_STRINGS = frozenset({"True", "true", "TRUE", "1"})
BOOL_STRINGS = TRUE_STRINGS | {"False", "false", "FALSE", "0"}
# getKvCacheConfigFromParams(): "enable_kv_cache_reuse is not specified, will be set to true".
KV_CACHE_REUSE_DEFAULT = True
BOOL_PARAMETERS = frozenset(
    {
        "enable_kv_cache_reuse",
        "enable_chunked_context",
        "exclude_input_in_output",
        "kv_cache_onboard_blocks",
        "normalize_log_probs",
        "enable_trt_overlap",
        "multi_block_mode",
        "enable_context_fmha_fp32_acc",
        "cuda_graph_mode",
        "speculative_decoding_fast_logits",
    }
)
# GetParameter<float> is std::stof, GetParameter<int32_t> std::stoi (a bad value: silently the default).
FLOAT_PARAMETERS = frozenset(
    {
        "kv_cache_free_gpu_mem_fraction",
        "cross_kv_cache_fraction",
        "gpu_weights_percent",
        "lora_cache_gpu_memory_fraction",
    }
)
INT_PARAMETERS = frozenset(
    {
        "max_beam_width",
        "max_tokens_in_paged_kv_cache",
        "sink_token_length",
        "num_nodes",
        "iter_stats_max_iterations",
        "request_stats_max_iterations",
        "cancellation_check_period_ms",
        "stats_check_period_ms",
        "recv_poll_period_ms",
        "cuda_graph_cache_size",
    }
)
# getSchedulerConfigFromParams(): anything else logs a warning and uses guaranteed_no_evict.
SCHEDULER_POLICIES = frozenset({"max_utilization", "guaranteed_no_evict"})
# ModelInstanceState ctor: TLLM_CHECK_WITH_INFO(std::filesystem::exists(gpt_model_path)) with the string as given
# (no resolution against the model repository); a failed check leaves the path empty and the load fails with
# "Both encoder and decoder model paths are empty".
ENGINE_PATH_PARAMETER = "gpt_model_path"
# batch_manager promptTuningBuffers.cpp: the engine's table buffer is allocated in modelConfig.getDataType() and
# each request's prompt_embedding_table is copied into it, so the declared input type must be the engine's dtype
# (pretrained_config.dtype of the engine's config.json, in Triton's type names).
TABLE_TYPE_FOR_ENGINE_DTYPE = {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}

# fillTritonResponse(): "%s tensor must be present in list of output tensors" for output_ids and for
# sequence_length: every response to a request that does not ask for both is an error.
OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR = ("output_ids", "sequence_length")
# createRequestsFromInputTensors(): "request_output_len is not present in the request"; input_ids (or
# encoder_input_features) must be there.
INPUTS_EVERY_REQUEST_MUST_SEND = ("input_ids", "request_output_len")
# createRequestsFromInputTensors(): "Batch size > 1 requires the tensorrt_llm backend to be using decoupled
# transaction policy"; "Streaming is only supported if model is deployed using decoupled mode."
MULTI_ROW_NEEDS_DECOUPLED = STREAMING_NEEDS_DECOUPLED = True
# enqueue() -> handleStopRequest(), before any other check: a request whose `stop` input is true cancels the requests
# enqueued under the same Triton request id ("Trying to stop a request but request ID is not provided" without one)
# and gets one empty final response. WaitForCancel() also cancels a request whose response factory reports the
# client cancelled, every cancellation_check_period_ms (default 100).
STOP_INPUT = "stop"
# splitBatchInputsTensors(): with more than one row each input_ids row is cut at input_lengths[row]; every other
# tensor (prompt_embedding_table, prompt_table_extra_ids) is only sliced by row, never cut.
# getPromptTuningConfigFromTensors(): prompt_table_extra_ids is used only when its length equals the row's input
# token count, else it is dropped without a word (and with KV-cache reuse the executor then refuses the request).
INPUTS_MATCHING_INPUT_IDS_LENGTH = ("input_lengths", "prompt_table_extra_ids")
# The executor, batch_manager LlmRequest::validate (llmRequest.cpp): with enable_kv_cache_reuse and a prompt table,
# "Input token extra ids must be provided when enabling kv cache reuse with prompt table".
EXTRA_IDS_NEEDED_WITH_KV_CACHE_REUSE = ("prompt_embedding_table", "prompt_table_extra_ids")


def _param(cfg, name):
    return cfg.parameters[name].string_value if name in cfg.parameters else None


def kv_cache_reuse(cfg) -> bool:
    """Whether the backend runs ``cfg`` with KV-cache block reuse (a malformed value keeps the default)."""
    value = _param(cfg, "enable_kv_cache_reuse")
    return KV_CACHE_REUSE_DEFAULT if value not in BOOL_STRINGS else value in TRUE_STRINGS


def config_problems(cfg, engine_dtype: str | None = None) -> list[str]:
    """What would make the 1.2 backend refuse to load ``cfg`` (a ``ModelConfig``) or silently ignore a setting;
    ``engine_dtype``: the engine's (``pretrained_config.dtype``), to check the prompt table's declared type."""
    problems = []
    if engine_dtype is not None:
        from tritonclient.grpc.model_config_pb2 import DataType

        table = next((i for i in cfg.input if i.name == "prompt_embedding_table"), None)
        declared = None if table is None else DataType.Name(table.data_type)
        if declared != TABLE_TYPE_FOR_ENGINE_DTYPE[engine_dtype]:
            problems.append(f"prompt_embedding_table is declared {declared}, the engine is {engine_dtype}")
    if cfg.backend != "tensorrtllm":
        problems.append(f"backend is {cfg.backend!r}, not tensorrtllm")
    for name in sorted(PARAMETERS_READ_WITHOUT_FALLBACK - set(cfg.parameters)):
        problems.append(f"Cannot find parameter with name: {name}")
    if _param(cfg, "gpt_model_type") not in GPT_MODEL_TYPES | {None}:
        problems.append(f"Invalid gpt_model_type {_param(cfg, 'gpt_model_type')!r}")
    guided = {k: _param(cfg, k) for k in GUIDED_DECODING_OFF_VALUES}
    if all(v is not None and v not in GUIDED_DECODING_OFF_VALUES[k] for k, v in guided.items()):
        problems.append(
            f"guided decoding is switched on ({guided}): the xgrammar tokenizer info must exist in the server"
        )
    for name in BOOL_PARAMETERS & set(cfg.parameters):
        if _param(cfg, name) not in BOOL_STRINGS:
            problems.append(f"Cannot convert {_param(cfg, name)!r} to a boolean ({name})")
    for name in FLOAT_PARAMETERS & set(cfg.parameters):
        try:
            float(_param(cfg, name))
        except ValueError:
            problems.append(f"{name}={_param(cfg, name)!r} is not a float")
    for name in INT_PARAMETERS & set(cfg.parameters):
        if not _param(cfg, name).lstrip("-").isdigit():
            problems.append(f"{name}={_param(cfg, name)!r} is not an integer")
    policy = _param(cfg, "batch_scheduler_policy")
    if policy is not None and policy not in SCHEDULER_POLICIES:
        problems.append(f"batch_scheduler_policy {policy!r} is ignored")
    path = _param(cfg, ENGINE_PATH_PARAMETER)
    if not path:
        problems.append("Both encoder and decoder model paths are empty")
    elif not os.path.isabs(path):
        problems.append(
            f"{ENGINE_PATH_PARAMETER} {path!r} is relative: the backend does not resolve it against the repository"
        )
    return problems


def request_problems(inputs: dict, requested_outputs, *, decoupled: bool, kv_cache_reuse: bool) -> list[str]:
    """What the 1.2 backend would refuse, or silently mis-read, in one request to ``tensorrt_llm``: ``inputs`` by
    name with the batch dimension first (as a client or BLS caller sends them), ``requested_outputs`` the names
    the request asks for; ``decoupled`` and ``kv_cache_reuse`` as the model's config sets them."""
    problems = []
    table, extra = EXTRA_IDS_NEEDED_WITH_KV_CACHE_REUSE
    if kv_cache_reuse and table in inputs and extra not in inputs:
        problems.append("Input token extra ids must be provided when enabling kv cache reuse with prompt table")
    for name in INPUTS_EVERY_REQUEST_MUST_SEND:
        if name not in inputs:
            problems.append(f"{name} is not present in the request")
    for name in OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR:
        if name not in set(requested_outputs):
            problems.append(f"{name} tensor must be present in list of output tensors")
    if "input_ids" not in inputs:
        return problems
    ids = np.asarray(inputs["input_ids"])
    rows = ids.shape[0]
    if rows > 1 and not decoupled:
        problems.append("Batch size > 1 requires the tensorrt_llm backend to be using decoupled transaction policy")
    if "streaming" in inputs and np.asarray(inputs["streaming"]).reshape(-1).any() and not decoupled:
        problems.append("Streaming is only supported if model is deployed using decoupled mode.")
    lengths = np.asarray(inputs.get("input_lengths", [[ids.shape[1]]] * rows)).reshape(rows, -1)[:, 0]
    for row, n in enumerate(lengths):
        if not 0 < int(n) <= ids.shape[1]:
            problems.append(f"row {row}: input_lengths {int(n)} outside input_ids' {ids.shape[1]} tokens")
    for name in INPUTS_MATCHING_INPUT_IDS_LENGTH[1:]:
        if name in inputs:
            width = np.asarray(inputs[name]).reshape(rows, -1).shape[1]
            for row, n in enumerate(lengths):
                if width != int(n):
                    problems.append(
                        f"row {row}: {name} has {width} values for {int(n)} input tokens (silently dropped)"
                    )
    return problems
