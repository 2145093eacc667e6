"""The trt flavour against TensorRT-LLM 1.2's Triton backend contract (``trtllm_contract``, read from its source):
every ``tensorrt_llm`` config we generate loads, every request we send it is one the backend answers. Then the
whole trt repository in the real bundled Triton server, with the two engine models as stand-ins that keep the
contract (``standins/``): ensemble, streaming model and embeddings client give the onnx flavour's tokens."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import trtllm_contract
from conftest import make_clip, running_server, write_engines

from canary_qwen.backends.onnx_runtime import OnnxBackend, OnnxEncoder
from canary_qwen.bounds import RequestBounds
from canary_qwen.client.embeddings import trtllm_request_arrays
from canary_qwen.errors import InputError
from canary_qwen.export.artifacts import export_all
from canary_qwen.export.manifest import read_manifest
from canary_qwen.export.tensorrt.encoder_engine import pad_to_min_samples
from canary_qwen.model.prompt import prompt_ids
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.protocol.trt_requests import tensorrt_llm_inputs
from canary_qwen.serving import trt_flavor, trt_models
from canary_qwen.serving.config_check import parse_model_config

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
STANDINS = Path(__file__).parent / "standins"
MAX_AUDIO_S = 8.0


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    root = export_all(tiny_checkpoint, tmp_path_factory.mktemp("export"), progress=False).root
    manifest = read_manifest(root)
    # an fp32 engine with the model's own vocabulary: the stand-in's tokens can then equal the onnx flavour's
    write_engines(
        root / "trt",
        manifest,
        max_batch=4,
        dtype="float32",
        vocab_size=manifest.model["vocab_size"],
        max_new_tokens=2048,
    )
    return root


def tensorrt_llm_configs(export_dir, tmp_path):
    """Every tensorrt_llm config the generator writes, across its options and the engine dtypes, with the dtype."""
    manifest = read_manifest(export_dir)
    engines = {"float32": None}  # the export's own trt/ (the module fixture's fp32 engine)
    for dtype in ("bfloat16", "float16"):
        engines[dtype] = write_engines(
            tmp_path / dtype, manifest, max_batch=4, dtype=dtype, vocab_size=manifest.model["vocab_size"]
        )
    variants = [
        dict(),
        dict(decoupled_streaming=False),
        dict(enable_kv_cache_reuse=False, max_batch=2),
        dict(kv_cache_free_gpu_mem_fraction=0.3, engine_dir_in_server="/opt/repo/tensorrt_llm/1"),
    ]
    configs = []
    for i, options in enumerate(variants):
        for dtype, engines_dir in engines.items():
            repo = trt_flavor.generate_trt_repo(
                export_dir, tmp_path / f"{i}-{dtype}", engines_dir=engines_dir, **options
            )
            configs.append((parse_model_config(repo / "tensorrt_llm/config.pbtxt"), dtype))
    for dtype in engines:
        text = trt_models.tensorrt_llm_config(engine_dir="/m/llm", max_batch=16, engine_dtype=dtype)
        configs.append((parse_model_config(text), dtype))
    return configs


def test_every_generated_tensorrt_llm_config_loads_in_the_1_2_backend(export_dir, tmp_path):
    for cfg, engine_dtype in tensorrt_llm_configs(export_dir, tmp_path):
        assert trtllm_contract.config_problems(cfg, engine_dtype) == []
        # the backend's own template declares these inputs; the ones we send must all be declared
        declared = {i.name for i in cfg.input}
        assert set(trtllm_contract.INPUTS_EVERY_REQUEST_MUST_SEND) <= declared
        assert set(trtllm_contract.OUTPUTS_EVERY_REQUEST_MUST_ASK_FOR) <= {o.name for o in cfg.output}


def test_the_contract_catches_what_the_backend_refuses():
    """The checker itself: a config without the parameters read with no fallback, a multi-row request to a model
    that is not decoupled, a request asking for output_ids alone, extra ids of the wrong length."""
    cfg = pb2.ModelConfig(backend="tensorrtllm")
    cfg.parameters["gpt_model_path"].string_value = "/e"
    cfg.parameters["gpt_model_type"].string_value = "inflight_fused_batching"
    assert [p for p in trtllm_contract.config_problems(cfg) if "Cannot find parameter" in p] == [
        f"Cannot find parameter with name: {n}"
        for n in sorted(trtllm_contract.PARAMETERS_READ_WITHOUT_FALLBACK - {"gpt_model_type"})
    ]
    two_rows = {
        "input_ids": np.zeros((2, 5), np.int32),
        "input_lengths": np.array([[5], [5]], np.int32),
        "request_output_len": np.array([[4], [4]], np.int32),
        "prompt_table_extra_ids": np.zeros((2, 4), np.uint64),
    }
    problems = trtllm_contract.request_problems(two_rows, ["output_ids"], decoupled=False, kv_cache_reuse=True)
    assert any("Batch size > 1" in p for p in problems) and any("sequence_length" in p for p in problems)
    assert any("prompt_table_extra_ids has 4 values for 5" in p for p in problems)
    table_only = {**two_rows, "prompt_embedding_table": np.zeros((2, 3, 8), np.float32)}
    del table_only["prompt_table_extra_ids"]
    assert any(
        "extra ids must be provided" in p
        for p in trtllm_contract.request_problems(table_only, ["output_ids"], decoupled=True, kv_cache_reuse=True)
    )


def ensemble_llm_step(cfg):
    return next(s for s in cfg.ensemble_scheduling.step if s.model_name == trt_models.TENSORRT_LLM)


def test_every_request_the_trt_flavour_builds_keeps_the_contract(export_dir, tmp_path):
    """The ensemble's tensorrt_llm step (prompt_table's outputs, the outputs the step maps) and the embeddings
    client's request, for each generated config."""
    info = read_manifest(export_dir).model
    tok = QwenTokenizer(read_manifest(export_dir).artifact("tokenizer"), info["audio_locator_tag"])
    prompt = np.array([prompt_ids(tok, None)], np.int64)
    frames = np.random.default_rng(0).standard_normal((1, 9, info["hidden_size"])).astype(np.float32)
    for decoupled in (True, False):
        repo = trt_flavor.generate_trt_repo(export_dir, tmp_path / str(decoupled), decoupled_streaming=decoupled)
        llm_cfg = parse_model_config(repo / "tensorrt_llm/config.pbtxt")
        step = ensemble_llm_step(parse_model_config(repo / "canary_qwen/config.pbtxt"))
        inputs = tensorrt_llm_inputs(
            prompt,
            frames,
            np.array([7]),
            [16],
            placeholder_id=info["placeholder_id"],
            vocab_size=info["vocab_size"],
            table_dtype="float32",
            end_id=info["eos_id"],
            pad_id=info["pad_id"],
        )
        assert set(step.input_map) == set(inputs)
        contract = dict(
            decoupled=llm_cfg.model_transaction_policy.decoupled, kv_cache_reuse=trtllm_contract.kv_cache_reuse(llm_cfg)
        )
        assert trtllm_contract.request_problems(inputs, list(step.output_map), **contract) == []
        arrays, _ = trtllm_request_arrays(
            prompt[0].tolist(),
            frames[0],
            placeholder_id=info["placeholder_id"],
            end_id=info["eos_id"],
            pad_id=info["pad_id"],
            vocab_size=info["vocab_size"],
            table_dtype="float32",
        )
        assert trtllm_contract.request_problems(arrays, ["output_ids", "sequence_length"], **contract) == []
    with pytest.raises(InputError, match="one clip per request"):  # never a multi-row request
        tensorrt_llm_inputs(
            np.repeat(prompt, 2, 0),
            np.repeat(frames, 2, 0),
            np.array([7, 7]),
            [16, 16],
            placeholder_id=info["placeholder_id"],
            vocab_size=info["vocab_size"],
            table_dtype="float32",
            end_id=info["eos_id"],
            pad_id=info["pad_id"],
        )


def test_padding_to_the_plan_minimum_keeps_the_frames(export_dir):
    """What the trt preprocessing and the direct runner do to a clip under the plan's profile minimum: ONNX Runtime
    gives the same valid frames for the padded clip as for the clip itself."""
    manifest = read_manifest(export_dir)
    minimum = manifest.engine_build()["encoder_profile"]["min_samples"]
    clip = make_clip(0.05, 3)[None]
    padded = pad_to_min_samples(clip, minimum)
    assert padded.shape == (1, minimum) and not padded[0, clip.shape[1] :].any()
    encoder = OnnxEncoder(manifest.artifact("encoder"))
    lengths = np.array([clip.shape[1]], np.int64)
    want, n_want = encoder.session.run(None, {"audio": clip, "audio_lengths": lengths})
    got, n_got = encoder.session.run(None, {"audio": padded, "audio_lengths": lengths})
    assert n_got.tolist() == n_want.tolist()
    np.testing.assert_allclose(got[0, : n_got[0]], want[0, : n_want[0]], rtol=1e-5, atol=1e-5)


# -- in the real server, with stand-ins for the two engines ------------------------------------------------------
def standin_repo(export_dir, out: Path, trace_dir: Path | None = None, **options) -> Path:
    """The trt repository as generated, then the two engine models swapped for python stand-ins that serve the same
    config (backend changed only): TensorRT and TensorRT-LLM cannot run here. ``trace_dir``: where the tensorrt_llm
    stand-in records each request's decoded token count and whether it was stopped."""
    repo = trt_flavor.generate_trt_repo(
        export_dir,
        out,
        bounds=RequestBounds(max_audio_s=MAX_AUDIO_S, max_new_tokens_limit=2048),
        engine_dir_in_server=str((out / "tensorrt_llm/1").resolve()),
        **options,
    )
    for name, code, extra in (
        ("tensorrt_llm", "tensorrt_llm_model.py", ["trtllm_contract.py"]),
        ("encoder", "encoder_model.py", []),
    ):
        config = repo / name / "config.pbtxt"
        text = config.read_text().replace('backend: "tensorrtllm"', 'backend: "python"')
        text = text.replace('platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"', 'backend: "python"')
        text = text.replace("kind: KIND_GPU", "kind: KIND_CPU")
        params = {
            "export_dir": export_dir,
            **({"trace_dir": trace_dir} if name == "tensorrt_llm" and trace_dir else {}),
        }
        config.write_text(
            text + "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())
        )
        shutil.copy(STANDINS / code, repo / name / "1" / "model.py")
        for f in extra:
            shutil.copy(Path(__file__).parent / f, repo / name / "1" / f)
    return repo


@pytest.fixture(scope="module")
def served(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("standin")
    (out / "trace").mkdir()
    with running_server(standin_repo(export_dir, out / "repo", out / "trace"), out / "server") as server:
        server.trace_dir = out / "trace"
        yield server
        assert server.stop() == 0  # in time: every stream, the cancelled one too, was closed


def reference_tokens(export_dir, clip):
    return OnnxBackend(export_dir).transcribe([clip], max_new_tokens=24)[0]


@pytest.mark.triton
def test_served_ensemble_and_stream_give_the_onnx_tokens(served, export_dir):
    from canary_qwen.client.triton import TritonClient

    clips = [make_clip(1.3, 5), make_clip(0.05, 6)]  # the second is under the encoder plan's profile minimum
    with TritonClient(served.grpc_url, "grpc") as client:
        for clip in clips:
            want = reference_tokens(export_dir, clip)
            text, ids = client.infer(clip, max_new_tokens=24, with_ids=True)
            assert ids == want.token_ids and text == want.text
            assert "".join(client.stream(clip, max_new_tokens=24)) == want.text


@pytest.mark.triton
def test_served_embeddings_client_drives_tensorrt_llm_directly(served, export_dir):
    from canary_qwen.client.embeddings import EmbeddingsClient

    clip = make_clip(0.05, 7)
    client = EmbeddingsClient(served.grpc_url, "grpc", export_dir=export_dir)
    try:
        assert client.transcribe(clip, max_new_tokens=24).token_ids == reference_tokens(export_dir, clip).token_ids
    finally:
        client.client.close()


@pytest.mark.triton
def test_served_ensemble_refuses_two_clips_in_one_request(served):
    from canary_qwen.client.errors import InferenceError
    from canary_qwen.client.triton import TritonClient

    with TritonClient(served.grpc_url, "grpc") as client:
        arrays = {"AUDIO": np.stack([make_clip(1.0, 1), make_clip(1.0, 2)])}
        with pytest.raises(InferenceError, match="1 clip per request"):
            list(client.stream_results("canary_qwen", arrays))


@pytest.mark.triton
def test_served_concurrent_streams_each_join_to_the_onnx_text(served, export_dir):
    """8 streams at once on the stream model's 4 instances (one stream each, the rest queued): every stream's
    pieces join to its clip's text, and the server keeps serving."""
    from canary_qwen.client.triton import TritonClient

    clips = [make_clip(0.3 + 0.35 * i, 600 + i) for i in range(8)]
    want = [reference_tokens(export_dir, clip).text for clip in clips]

    def one(clip):
        with TritonClient(served.grpc_url, "grpc", timeout_s=120) as client:
            return "".join(client.stream(clip, max_new_tokens=24))

    with ThreadPoolExecutor(len(clips)) as pool:
        assert list(pool.map(one, clips)) == want
    assert served.is_alive() and served.dead_stubs() == []


@pytest.mark.triton
def test_served_cancelled_stream_stops_tensorrt_llm(served):
    """A reader that leaves after two pieces of a 2,000-token stream: the stream model tells tensorrt_llm to stop
    that request (a stop request under its id), which ends it long before its budget."""
    from canary_qwen.client.triton import TritonClient

    budget = 2000
    with TritonClient(served.grpc_url, "grpc", timeout_s=60) as client:
        pieces = client.stream(make_clip(1.75, 503), max_new_tokens=budget)
        next(pieces), next(pieces)
        pieces.close()
    deadline = time.monotonic() + 30
    stopped = []
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.2)
        records = [json.loads(f.read_text()) for f in served.trace_dir.glob("*.json")]
        stopped = [r for r in records if r["stopped"]]
    assert len(stopped) == 1 and stopped[0]["decoded"] < budget / 4, stopped
