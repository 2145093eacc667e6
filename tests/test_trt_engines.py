"""TensorRT / TensorRT-LLM paths: build command lines, Triton trt-flavour configs, and (where TensorRT and
a GPU exist) engine builds and runs. TensorRT 10.14 and TensorRT-LLM 1.2.x cannot be installed on most
machines: the build/run tests skip with the MissingDependencyError that names what is missing."""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from canary_qwen.backends.base import pad_waveforms
from canary_qwen.errors import ArtifactError, MissingDependencyError
from canary_qwen.export.manifest import BUILD_KEYS, read_manifest, record_engine_build
from canary_qwen.export.tensorrt import import_tensorrt, import_tensorrt_llm, tensorrt_environment
from canary_qwen.export.tensorrt.encoder_engine import EncoderProfile
from canary_qwen.export.tensorrt.llm_engine import (
    CONVERT_SCRIPT_PATHS,
    EXAMPLES_ENV,
    engine_limits,
    engine_sizes,
    find_convert_script,
    trtllm_build_commands,
)
from canary_qwen.protocol.prompt_table import build_request, triton_request_inputs
from canary_qwen.serving import trt_models

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None

# The tensorrt_llm inputs a Canary-Qwen request fills (TensorRT-LLM 1.2 template
# triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt names them; the rest stay unset).
REQUEST_INPUTS = (
    "input_ids",
    "input_lengths",
    "request_output_len",
    "end_id",
    "pad_id",
    "streaming",
    "prompt_embedding_table",
    "prompt_vocab_size",
    "prompt_table_extra_ids",
)


def option(command: list[str], flag: str) -> str:
    assert command.count(flag) == 1, f"{flag} appears {command.count(flag)} times in {command}"
    return command[command.index(flag) + 1]


def parse(text: str):
    return text_format.Parse(text, pb2.ModelConfig())


# -- trtllm-build / convert_checkpoint.py command lines ------------------------------------------------
@pytest.fixture
def script(tmp_path):
    path = tmp_path / "examples" / CONVERT_SCRIPT_PATHS[0]
    path.parent.mkdir(parents=True)
    path.write_text("# stand-in for TensorRT-LLM's examples/models/core/qwen/convert_checkpoint.py\n")
    return path


def test_build_commands_carry_derived_sizes(script, tmp_path):
    convert, build = trtllm_build_commands(
        tmp_path / "llm_merged",
        tmp_path / "engine",
        max_batch=192,
        max_audio_frames=500,
        convert_script=script,
        python="python3",
    )
    assert convert[:2] == ["python3", str(script)]
    assert option(convert, "--model_dir") == str(tmp_path / "llm_merged")
    assert option(convert, "--output_dir") == str(tmp_path / "engine_checkpoint")
    assert option(convert, "--dtype") == "bfloat16"
    assert option(convert, "--tp_size") == "1" and option(convert, "--pp_size") == "1"

    assert build[0] == "trtllm-build"
    assert option(build, "--checkpoint_dir") == str(tmp_path / "engine_checkpoint")
    assert option(build, "--output_dir") == str(tmp_path / "engine")
    assert option(build, "--max_batch_size") == "192"
    assert option(build, "--max_prompt_embedding_table_size") == str(192 * 500)
    assert option(build, "--max_input_len") == str(500 + 64)
    assert option(build, "--max_seq_len") == str(500 + 64 + 128)
    assert option(build, "--max_num_tokens") == "32768"  # 192 * 564 capped
    assert option(build, "--max_beam_width") == "1"
    assert option(build, "--kv_cache_type") == "paged"
    assert option(build, "--remove_input_padding") == "enable"
    assert option(build, "--context_fmha") == "enable"
    assert option(build, "--use_paged_context_fmha") == "enable"
    assert option(build, "--gemm_plugin") == "auto"
    assert option(build, "--gpt_attention_plugin") == "auto"
    assert "--paged_kv_cache" not in build  # deprecated in 1.x for --kv_cache_type
    flags = {a for a in build if a.startswith("--")}
    assert flags == {
        "--checkpoint_dir",
        "--output_dir",
        "--max_batch_size",
        "--max_input_len",
        "--max_seq_len",
        "--max_num_tokens",
        "--max_beam_width",
        "--max_prompt_embedding_table_size",
        "--kv_cache_type",
        "--remove_input_padding",
        "--context_fmha",
        "--use_paged_context_fmha",
        "--gemm_plugin",
        "--gpt_attention_plugin",
        "--workers",
    }


def test_build_commands_options(script, tmp_path):
    convert, build = trtllm_build_commands(
        "m",
        tmp_path / "e",
        max_batch=4,
        max_audio_frames=100,
        max_prompt_text_tokens=32,
        max_new_tokens=16,
        dtype="float16",
        checkpoint_dir=tmp_path / "ck",
        convert_script=script,
        timing_cache=tmp_path / "t.cache",
        max_num_tokens=999,
        workers=2,
    )
    assert option(convert, "--dtype") == "float16" and option(convert, "--output_dir") == str(tmp_path / "ck")
    assert option(build, "--max_prompt_embedding_table_size") == "400"
    assert option(build, "--max_input_len") == "132" and option(build, "--max_seq_len") == "148"
    assert option(build, "--max_num_tokens") == "999"
    assert option(build, "--input_timing_cache") == option(build, "--output_timing_cache") == str(tmp_path / "t.cache")
    assert option(build, "--workers") == "2" and option(convert, "--workers") == "2"
    # Small batches: every prompt of the batch fits one step.
    assert engine_sizes(max_batch=4, max_audio_frames=100, max_prompt_text_tokens=32).max_num_tokens == 4 * 132
    with pytest.raises(ValueError, match="'int8' is no precision to hold tensors in"):
        trtllm_build_commands("m", "e", max_batch=1, max_audio_frames=1, dtype="int8", convert_script=script)
    with pytest.raises(ValueError, match="max_audio_frames must be >= 1"):
        engine_sizes(max_batch=1, max_audio_frames=0)


def test_convert_script_lookup(script, tmp_path, monkeypatch):
    examples = script.parents[3]
    assert find_convert_script(examples) == script
    monkeypatch.setenv(EXAMPLES_ENV, str(examples))
    assert find_convert_script() == script
    convert, _ = trtllm_build_commands("m", tmp_path / "e", max_batch=2, max_audio_frames=10)
    assert convert[1] == str(script)
    monkeypatch.delenv(EXAMPLES_ENV)
    legacy = tmp_path / "old" / CONVERT_SCRIPT_PATHS[1]
    legacy.parent.mkdir(parents=True)
    legacy.write_text("")
    assert find_convert_script(tmp_path / "old") == legacy


def test_convert_script_missing_names_what_to_get(tmp_path, monkeypatch):
    monkeypatch.delenv(EXAMPLES_ENV, raising=False)
    if HAVE_TRTLLM or Path("/app/tensorrt_llm/examples").is_dir():
        pytest.skip("a TensorRT-LLM examples folder exists here")
    with pytest.raises(
        MissingDependencyError, match=r"TensorRT-LLM 1\.2\.x's examples/models/core/qwen/convert_checkpoint\.py"
    ):
        trtllm_build_commands("m", tmp_path / "e", max_batch=2, max_audio_frames=10, examples_dir=tmp_path)


def test_engine_limits_from_engine_config():
    config = {
        "pretrained_config": {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "dtype": "bfloat16",
            "architecture": "Qwen3ForCausalLM",
        },
        "build_config": {
            "max_batch_size": 192,
            "max_input_len": 564,
            "max_seq_len": 692,
            "max_prompt_embedding_table_size": 96000,
        },
    }
    limits = engine_limits(config)
    assert limits.vocab_size == 151936 and limits.max_prompt_vocab_size == 500 and limits.dtype == "bfloat16"


# -- Triton trt flavour ----------------------------------------------------------------------------------
TYPE_TO_NUMPY = {"TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64, "TYPE_BOOL": np.bool_, "TYPE_FP16": np.float16}


def test_tensorrt_llm_config_parses_with_the_real_inputs():
    text = trt_models.tensorrt_llm_config(
        engine_dir="/models/llm_engine",
        max_batch=64,
        engine_dtype="bfloat16",
        queue_delay_us=100,
        kv_cache_free_gpu_mem_fraction=0.85,
    )
    cfg = parse(text)
    assert cfg.name == "tensorrt_llm" and cfg.backend == "tensorrtllm" and cfg.max_batch_size == 64
    assert not cfg.model_transaction_policy.decoupled
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert list(cfg.dynamic_batching.preferred_batch_size) == [64]
    inputs = {t.name: t for t in cfg.input}
    assert list(inputs) == [row[0] for row in trt_models.TENSORRT_LLM_INPUTS]
    for name in REQUEST_INPUTS:
        assert name in inputs
    dt = pb2.DataType.Name
    assert dt(inputs["input_ids"].data_type) == "TYPE_INT32" and list(inputs["input_ids"].dims) == [-1]
    assert inputs["input_ids"].allow_ragged_batch and inputs["input_ids"].optional
    assert not inputs["input_lengths"].optional and list(inputs["input_lengths"].reshape.shape) == []
    assert inputs["input_lengths"].HasField("reshape")
    assert not inputs["request_output_len"].optional
    assert dt(inputs["prompt_embedding_table"].data_type) == "TYPE_BF16"
    assert (
        list(inputs["prompt_embedding_table"].dims) == [-1, -1] and inputs["prompt_embedding_table"].allow_ragged_batch
    )
    assert dt(inputs["prompt_table_extra_ids"].data_type) == "TYPE_UINT64" and list(
        inputs["prompt_table_extra_ids"].dims
    ) == [-1]
    assert dt(inputs["prompt_vocab_size"].data_type) == "TYPE_INT32" and inputs["prompt_vocab_size"].HasField("reshape")
    assert dt(inputs["streaming"].data_type) == "TYPE_BOOL"
    assert dt(inputs["draft_logits"].data_type) == "TYPE_FP32"
    assert dt(inputs["encoder_input_features"].data_type) == "TYPE_FP16"
    assert "${" not in text
    outputs = {t.name: t for t in cfg.output}
    assert dt(outputs["output_ids"].data_type) == "TYPE_INT32" and list(outputs["output_ids"].dims) == [-1, -1]
    assert "sequence_length" in outputs and "kv_cache_reused_blocks" in outputs
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["gpt_model_path"] == "/models/llm_engine"
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85"
    assert params["enable_kv_cache_reuse"] == "true"
    assert params["max_beam_width"] == "1" and params["exclude_input_in_output"] == "true"
    assert params["batch_scheduler_policy"] == "max_utilization"
    assert (
        cfg.instance_group[0].count == 1 and pb2.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == "KIND_CPU"
    )


def test_tensorrt_llm_config_streaming_and_options():
    cfg = parse(
        trt_models.tensorrt_llm_config(
            engine_dir="/e",
            max_batch=8,
            decoupled=True,
            engine_dtype="float16",
            enable_kv_cache_reuse=False,
            max_tokens_in_paged_kv_cache=4096,
            gpu_device_ids="0",
            batch_scheduler_policy="guaranteed_no_evict",
        )
    )
    assert cfg.model_transaction_policy.decoupled
    inputs = {t.name: t for t in cfg.input}
    assert pb2.DataType.Name(inputs["prompt_embedding_table"].data_type) == "TYPE_FP16"
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["enable_kv_cache_reuse"] == "false" and params["max_tokens_in_paged_kv_cache"] == "4096"
    assert params["gpu_device_ids"] == "0" and params["batch_scheduler_policy"] == "guaranteed_no_evict"
    with pytest.raises(ValueError, match="batching_strategy"):
        trt_models.tensorrt_llm_config(engine_dir="/e", max_batch=8, batching_strategy="static")
    with pytest.raises(ValueError, match="kv_cache_free_gpu_mem_fraction"):
        trt_models.tensorrt_llm_config(engine_dir="/e", max_batch=8, kv_cache_free_gpu_mem_fraction=1.5)


def test_request_tensors_fit_the_tensorrt_llm_config():
    """A request built by the prompt-table protocol has exactly the names, dtypes and shapes the config declares."""
    cfg = parse(trt_models.tensorrt_llm_config(engine_dir="/e", max_batch=8, engine_dtype="float16", decoupled=True))
    inputs = {t.name: t for t in cfg.input}
    emb = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    req = build_request([1, 2, 99, 3], emb, placeholder_id=99, vocab_size=151936, dtype="float16")
    tensors = triton_request_inputs(req, max_new_tokens=32, end_id=151645, pad_id=151643, streaming=True)
    assert set(tensors) == set(REQUEST_INPUTS)
    for name, array in tensors.items():
        declared = inputs[name]
        assert array.dtype == TYPE_TO_NUMPY[pb2.DataType.Name(declared.data_type)], name
        dims = list(declared.dims)
        assert array.shape[0] == 1 and len(array.shape) == len(dims) + 1, name  # batch dimension first
        assert all(d == -1 or d == s for d, s in zip(dims, array.shape[1:])), name


def test_encoder_config_parses():
    cfg = parse(
        trt_models.encoder_config(max_batch=32, instances=2, queue_delay_us=500, embeddings_dtype="bfloat16", gpus=[0])
    )
    assert cfg.name == "encoder" and cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.max_batch_size == 32 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    inputs = {t.name: t for t in cfg.input}
    outputs = {t.name: t for t in cfg.output}
    dt = pb2.DataType.Name
    assert list(inputs) == ["audio", "audio_lengths"] and list(outputs) == ["embeddings", "embedding_lengths"]
    assert dt(inputs["audio"].data_type) == "TYPE_FP32" and list(inputs["audio"].dims) == [-1]
    assert dt(inputs["audio_lengths"].data_type) == "TYPE_INT64" and inputs["audio_lengths"].HasField("reshape")
    assert dt(outputs["embeddings"].data_type) == "TYPE_BF16" and list(outputs["embeddings"].dims) == [-1, 2048]
    assert dt(outputs["embedding_lengths"].data_type) == "TYPE_INT64" and outputs["embedding_lengths"].HasField(
        "reshape"
    )
    group = cfg.instance_group[0]
    assert group.count == 2 and pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU" and list(group.gpus) == [0]
    with pytest.raises(ValueError, match="'int8' is no precision to hold tensors in"):
        trt_models.encoder_config(max_batch=1, embeddings_dtype="int8")


# -- engines (TensorRT / TensorRT-LLM and a GPU) -------------------------------------------------------
def require(importer):
    try:
        return importer()
    except MissingDependencyError as e:
        pytest.skip(str(e))


def test_missing_tensorrt_is_a_clear_error(tmp_path):
    if HAVE_TRT:
        pytest.skip("tensorrt is installed here")
    from canary_qwen.backends.trt import TrtEncoder
    from canary_qwen.export.tensorrt.encoder_engine import build_encoder_engine

    with pytest.raises(MissingDependencyError, match=r"TensorRT 10\.14.*NVIDIA GPU") as err:
        build_encoder_engine(tmp_path / "encoder.onnx", tmp_path / "encoder.plan")
    assert err.value.package == "tensorrt"
    with pytest.raises(MissingDependencyError, match=r"TensorRT 10\.14"):
        TrtEncoder(tmp_path / "encoder.plan")


def test_missing_tensorrt_llm_is_a_clear_error(script, tmp_path):
    if HAVE_TRTLLM:
        pytest.skip("tensorrt_llm is installed here")
    from canary_qwen.backends.trt import TrtLlmBackend
    from canary_qwen.export.tensorrt.llm_engine import build_llm_engine

    with pytest.raises(MissingDependencyError, match=r"TensorRT-LLM 1\.2\.x.*NVIDIA GPU") as err:
        build_llm_engine(tmp_path / "m", tmp_path / "e", max_batch=2, max_audio_frames=10, convert_script=script)
    assert err.value.package == "tensorrt_llm"
    with pytest.raises(MissingDependencyError, match=r"TensorRT-LLM 1\.2\.x"):
        TrtLlmBackend(tmp_path)


def require_gpu(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip(f"{what} needs an NVIDIA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def tensorrt_gpu():
    require(import_tensorrt)
    require_gpu("TensorRT")


@pytest.fixture(scope="module")
def tensorrt_llm_gpu():
    require(import_tensorrt_llm)
    require_gpu("TensorRT-LLM")


@pytest.fixture(scope="module")
def bf16_export(tensorrt_gpu, tiny_checkpoint, tmp_path_factory):
    from canary_qwen.export.artifacts import export_all

    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("trt-export"), precision="bf16", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("graph, tol", [("encoder", 1e-3), ("encoder_bf16", 3e-2)])  # TF32 / bf16 against fp32
def test_encoder_engine_matches_onnx(bf16_export, clips, tmp_path, graph, tol):
    from canary_qwen.backends.onnx_runtime import OnnxEncoder
    from canary_qwen.backends.trt import TrtEncoder
    from canary_qwen.export.tensorrt.encoder_engine import build_encoder_engine

    cache = tmp_path / "timing.cache"
    plan = build_encoder_engine(
        bf16_export.artifact(graph),
        tmp_path / "encoder.plan",
        max_batch=4,
        max_samples=4 * 16000,
        opt_samples=3 * 16000,
        timing_cache_path=cache,
    )
    assert cache.stat().st_size > 0
    encoder = TrtEncoder(plan)
    got = encoder(clips)
    want = OnnxEncoder(bf16_export.artifact("encoder"))(clips)  # the fp32 graph on ONNX Runtime
    for g, w in zip(got, want):
        assert tuple(g.shape) == w.shape
        err = np.abs(g.float().cpu().numpy() - w).max() / np.abs(w).max()
        assert err < tol
    embeds, lengths = encoder.run(*pad_waveforms(clips))
    assert lengths.tolist() == [len(w) for w in want] and embeds.shape[0] == len(clips)


@pytest.fixture(scope="module")
def fp32_export(tensorrt_llm_gpu, tiny_checkpoint, tmp_path_factory):
    from canary_qwen.export.artifacts import export_all

    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("trtllm-export"), precision="fp32", progress=False)


@pytest.mark.slow
def test_trtllm_tokens_match_torch_reference(fp32_export, tiny_checkpoint, clips):
    from canary_qwen.backends.torch_ref import TorchBackend
    from canary_qwen.backends.trt import TrtLlmBackend
    from canary_qwen.export.tensorrt.llm_engine import build_llm_engine, default_engine_paths

    paths = default_engine_paths(fp32_export.root)
    try:
        build_llm_engine(
            fp32_export.artifact("llm_merged"),
            paths["llm_engine"],
            max_batch=4,
            max_audio_frames=fp32_export.model["max_audio_frames"],
            max_new_tokens=24,
            dtype="float32",
        )
    except MissingDependencyError as e:  # e.g. no convert_checkpoint.py (not in the wheel)
        pytest.skip(str(e))
    record_engine_build(fp32_export.root, tensorrt_environment())  # what build-engines records
    backend = TrtLlmBackend(fp32_export.root, device="cuda")
    got = backend.transcribe(clips, max_new_tokens=[24, 5, 24, 1])
    want = TorchBackend(str(tiny_checkpoint)).transcribe(clips, max_new_tokens=[24, 5, 24, 1])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


# -- TrtLlmBackend's executor protocol, against a stand-in tensorrt_llm (no GPU, no TensorRT-LLM) -----------
class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeExecutor:
    """Answers each request with tokens 10, 11, ... and eos after ``eos_after[len(requests so far)]`` tokens.

    Responses wait in one queue per request id under one lock, as in TensorRT-LLM's executor
    (``cpp/tensorrt_llm/executor/executorImpl.cpp``, 1.2.0rc2; ``executor.h``): ``await_responses()`` without ids
    blocks until any response is ready and hands over (and removes) the ready responses of every request;
    ``await_responses(ids)`` blocks until each id has one and returns a list per id, taking only those.
    ``barrier``: enqueuing callers wait for each other, so both have requests in flight before either awaits."""

    def __init__(self, eos_id: int, eos_after: list[int]):
        self.eos_id, self.eos_after, self.requests = eos_id, eos_after, []
        self.ready: dict[int, list] = {}
        self.cond = threading.Condition()
        self.barrier: threading.Barrier | None = None

    def enqueue_requests(self, requests):
        ids = []
        with self.cond:
            for r in requests:
                rid = 1000 + len(self.requests)
                n = self.eos_after[len(self.requests)]
                tokens = [10 + k for k in range(min(n, r.max_tokens))] + ([self.eos_id] if n < r.max_tokens else [])
                self.requests.append(r)
                result = _Obj(is_final=True, output_token_ids=[tokens])
                self.ready[rid] = [_Obj(request_id=rid, has_error=lambda: False, error_msg="", result=result)]
                ids.append(rid)
            self.cond.notify_all()
        if self.barrier is not None:
            self.barrier.wait()
        return ids

    def await_responses(self, ids=None):
        with self.cond:
            if ids is None:
                self.cond.wait_for(lambda: any(self.ready.values()))
                return [r for rid in list(self.ready) for r in self.ready.pop(rid)][::-1]  # any order
            self.cond.wait_for(lambda: all(self.ready.get(i) for i in ids))
            return [self.ready.pop(i) for i in ids]

    def cancel_request(self, request_id):
        pass


@pytest.fixture
def fake_trtllm(monkeypatch, fp32_plain_export):
    import sys
    import types

    import torch

    from canary_qwen.backends import onnx_runtime

    info = fp32_plain_export.model
    state = {"loaded": []}

    class RecordedEncoder(onnx_runtime.OnnxEncoder):  # notes when the encoder loads, relative to the executor
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            state["loaded"].append("encoder")

    monkeypatch.setattr(onnx_runtime, "OnnxEncoder", RecordedEncoder)

    class Runner:
        dtype = torch.float32

        @classmethod
        def from_dir(cls, engine_dir, **kwargs):
            runner = cls()
            runner.kwargs = kwargs
            runner.executor = FakeExecutor(info["eos_id"], state["eos_after"])
            state["loaded"].append("llm")
            state["runner"] = runner
            return runner

    executor = types.ModuleType("tensorrt_llm.bindings.executor")
    executor.OutputConfig = lambda: _Obj(exclude_input_from_output=False)
    executor.SamplingConfig = lambda **kw: _Obj(**kw)
    executor.Request = lambda **kw: _Obj(**kw)
    executor.PromptTuningConfig = lambda **kw: _Obj(**kw)
    bindings = types.ModuleType("tensorrt_llm.bindings")
    bindings.executor = executor
    runtime = types.ModuleType("tensorrt_llm.runtime")
    runtime.ModelRunnerCpp = Runner
    root = types.ModuleType("tensorrt_llm")
    root.__version__ = "1.2.0"
    for name, module in (
        ("tensorrt_llm", root),
        ("tensorrt_llm.runtime", runtime),
        ("tensorrt_llm.bindings", bindings),
        ("tensorrt_llm.bindings.executor", executor),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    record = {"tensorrt": None, "tensorrt_llm": root.__version__, "compute_capability": None}
    record_engine_build(fp32_plain_export.root, {**record, "encoder_profile": asdict(EncoderProfile())})
    engine = fp32_plain_export.root / "trt" / "llm_engine"
    engine.mkdir(parents=True, exist_ok=True)
    (engine / "config.json").write_text(
        json.dumps(
            {
                "pretrained_config": {
                    "vocab_size": info["vocab_size"],
                    "hidden_size": info["hidden_size"],
                    "dtype": "float32",
                },
                "build_config": {
                    "max_batch_size": 4,
                    "max_input_len": info["max_audio_frames"] + 64,
                    "max_seq_len": info["max_audio_frames"] + 64 + 128,
                    "max_prompt_embedding_table_size": 4 * info["max_audio_frames"],
                },
            }
        )
    )
    return state


@pytest.fixture(scope="module")
def fp32_plain_export(tiny_checkpoint, tmp_path_factory):
    from canary_qwen.export.artifacts import export_all

    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("fake-trtllm-export"), precision="fp32", progress=False)


def test_backend_drives_the_executor_with_the_protocol(fake_trtllm, fp32_plain_export, clips):
    from canary_qwen.backends.onnx_runtime import OnnxEncoder
    from canary_qwen.backends.trt import TrtLlmBackend
    from canary_qwen.model.prompt import prompt_ids

    fake_trtllm["eos_after"] = [3, 50, 0, 50]
    backend = TrtLlmBackend(fp32_plain_export.root, device="cuda")
    backend.table_device = "cpu"  # the stand-in executor takes host tensors
    assert fake_trtllm["runner"].kwargs["kv_cache_enable_block_reuse"] is True
    info, tok = fp32_plain_export.model, backend.tokenizer
    out = backend.transcribe(clips, max_new_tokens=[8, 5, 8, 0])
    assert [t.token_ids for t in out] == [[10, 11, 12], [10, 11, 12, 13, 14], [], []]
    assert set(backend.timings) == {"encoder", "llm"}

    sent = fake_trtllm["runner"].executor.requests
    assert len(sent) == 3  # the zero-budget clip is not enqueued
    assert [r.max_tokens for r in sent] == [8, 5, 8]
    frames = OnnxEncoder(fp32_plain_export.artifact("encoder"))(clips)
    prompt = prompt_ids(tok, None)
    at = prompt.index(tok.placeholder_id)
    extra_seen = set()
    for r, f in zip(sent, frames):
        t = len(f)
        ids = r.input_token_ids
        assert ids == prompt[:at] + list(range(info["vocab_size"], info["vocab_size"] + t)) + prompt[at + 1 :]
        assert r.end_id == info["eos_id"] and r.pad_id == info["pad_id"]
        assert r.output_config.exclude_input_from_output and r.sampling_config.beam_width == 1
        ptc = r.prompt_tuning_config
        np.testing.assert_allclose(ptc.embedding_table.numpy(), f, rtol=1e-6, atol=1e-6)
        extra = ptc.input_token_extra_ids
        assert len(extra) == len(ids) and extra[:at] == [0] * at and extra[at + t :] == [0] * (len(prompt) - at - 1)
        assert len(set(extra[at : at + t])) == 1 and extra[at] >= 1
        extra_seen.add(extra[at])
    assert len(extra_seen) == 3  # one id per clip


def test_backend_refuses_clips_longer_than_the_engine_allows(fake_trtllm, fp32_plain_export, clips):
    from canary_qwen.backends.trt import TrtLlmBackend
    from canary_qwen.protocol.prompt_table import PromptTableError

    config_path = fp32_plain_export.root / "trt" / "llm_engine" / "config.json"
    config = json.loads(config_path.read_text())
    config["build_config"]["max_prompt_embedding_table_size"] = 4 * 10  # 10 frames (0.8 s) per request
    config_path.write_text(json.dumps(config))
    fake_trtllm["eos_after"] = [1] * 4
    backend = TrtLlmBackend(fp32_plain_export.root, device="cuda")
    backend.table_device = "cpu"
    with pytest.raises(PromptTableError, match="per-request limit of 10"):
        backend.transcribe(clips, max_new_tokens=4)
    with pytest.raises(ValueError, match="device must be cuda"):
        TrtLlmBackend(fp32_plain_export.root, device="cpu")


def test_build_engines_sizes_both_engines_from_the_manifest(fp32_plain_export, monkeypatch, tmp_path):
    """`canary-qwen build-engines` wiring, with the two builders (which need TensorRT) recorded instead of run."""
    from canary_qwen.export.tensorrt import build
    from canary_qwen.export.tensorrt import encoder_engine as trt_encoder
    from canary_qwen.export.tensorrt import llm_engine as trtllm

    calls = {}

    def record(name):
        def builder(source, out, **options):
            calls[name] = (Path(source), Path(out), options)
            return Path(out)

        return builder

    monkeypatch.setattr(build, "import_tensorrt", lambda: None)
    monkeypatch.setattr(build, "import_tensorrt_llm", lambda: None)
    monkeypatch.setattr(trt_encoder, "build_encoder_engine", record("encoder"))
    monkeypatch.setattr(trtllm, "build_llm_engine", record("llm"))
    manifest = fp32_plain_export
    built = build.build_engines(manifest.root, timing_cache=tmp_path / "cache", log=lambda *_: None)
    trt = manifest.root / "trt"
    assert built == {"encoder": trt / "encoder.plan", "llm": trt / "llm_engine"}
    onnx_path, _, enc = calls["encoder"]
    assert onnx_path == manifest.artifact("encoder")  # fp32 export: the fp32 graph
    assert enc["max_batch"] == manifest.data["max_batch"] and enc["max_samples"] == int(
        manifest.data["max_audio_s"] * 16000
    )
    assert enc["timing_cache_path"] == tmp_path / "cache"
    merged, _, llm = calls["llm"]
    assert merged == manifest.artifact("llm_merged") and llm["dtype"] == "float32"
    assert (
        llm["max_batch"] == manifest.data["max_batch"] and llm["max_audio_frames"] == manifest.model["max_audio_frames"]
    )
    assert llm["checkpoint_dir"] == trt / "llm_checkpoint" and llm["timing_cache"] == f"{tmp_path / 'cache'}.llm"
    # what loading needs is recorded: the versions and GPU the engines are tied to, the plan's profile
    record = read_manifest(manifest.root).engine_build()
    assert set(BUILD_KEYS) <= set(record)
    profile_keys = ("min_samples", "max_samples", "max_batch")
    assert {k: enc[k] for k in profile_keys} == {k: record["encoder_profile"][k] for k in profile_keys}
    calls.clear()
    assert set(build.build_engines(manifest.root, only="llm", max_batch=2, log=lambda *_: None)) == {"llm"}
    assert set(calls) == {"llm"} and calls["llm"][2]["max_batch"] == 2


def test_backend_loads_the_encoder_before_sizing_the_kv_cache(fake_trtllm, fp32_plain_export):
    """The executor takes its KV-cache share of the GPU memory free when it loads: the encoder must be in first,
    and the default share must leave room for it (TensorRT-LLM's own default is 0.9)."""
    from canary_qwen.backends.trt import TrtLlmBackend

    fake_trtllm["eos_after"] = []
    TrtLlmBackend(fp32_plain_export.root, device="cuda")
    assert fake_trtllm["loaded"] == ["encoder", "llm"]
    assert fake_trtllm["runner"].kwargs["kv_cache_free_gpu_memory_fraction"] < 0.9
    TrtLlmBackend(fp32_plain_export.root, device="cuda", kv_cache_free_gpu_memory_fraction=0.3)
    assert fake_trtllm["runner"].kwargs["kv_cache_free_gpu_memory_fraction"] == 0.3


def test_two_callers_on_one_backend_each_get_their_own_tokens(fake_trtllm, fp32_plain_export, clips):
    """Both callers have requests in flight before either awaits; each must still receive its own responses."""
    from canary_qwen.backends.trt import TrtLlmBackend

    fake_trtllm["eos_after"] = [2, 5]
    backend = TrtLlmBackend(fp32_plain_export.root, device="cuda")
    backend.table_device = "cpu"
    backend.runner.executor.barrier = threading.Barrier(2)
    results = {}

    def call(i):
        results[i] = backend.transcribe([clips[i]], max_new_tokens=8)[0].token_ids

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a caller never got its response"
    assert sorted(results.values()) == [[10, 11], [10, 11, 12, 13, 14]]


def test_backend_refuses_engines_built_for_another_tensorrt_llm(fake_trtllm, fp32_plain_export):
    from canary_qwen.backends.trt import TrtLlmBackend

    build = read_manifest(fp32_plain_export.root).engine_build()
    record_engine_build(fp32_plain_export.root, {**build, "tensorrt_llm": "1.1.0"})
    with pytest.raises(ArtifactError, match=r"TensorRT-LLM 1\.1\.0 \(found 1\.2\.0\).*build-engines"):
        TrtLlmBackend(fp32_plain_export.root, device="cuda")
    assert fake_trtllm["loaded"] == []  # refused before loading anything
