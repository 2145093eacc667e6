"""The trt flavour's model repository: generated around built engines, every config parsed and the ensemble
wiring checked, the prompt_table outputs consistent with the tensorrt_llm inputs, and its python models
(preprocessing, prompt_table, postprocessing) run in the real bundled Triton server. The encoder plan and
the tensorrt_llm model need TensorRT / TensorRT-LLM on a GPU and are not served here."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import make_clip, running_server, write_engines

from canary_qwen.bounds import RequestBounds
from canary_qwen.errors import ArtifactError, InputError, UsageError
from canary_qwen.export.artifacts import export_all
from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.protocol import prompt_table
from canary_qwen.protocol.trt_requests import generated_rows, tensorrt_llm_inputs
from canary_qwen.serving import trt_flavor
from canary_qwen.serving.config_check import check_ensemble, parse_model_config

pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
MAX_BATCH = 4
ENGINE_VOCAB = 1024  # the engine's embedding rows (> the tiny tokenizer's ids): fake ids start here


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint, tmp_path_factory):
    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("export"), progress=False).root


@pytest.fixture(scope="module")
def trt_repo(export_dir, tmp_path_factory):
    manifest = read_manifest(export_dir)
    write_engines(export_dir / "trt", manifest, vocab_size=ENGINE_VOCAB)
    return trt_flavor.generate_trt_repo(
        export_dir, tmp_path_factory.mktemp("trt") / "repo", max_batch=MAX_BATCH, bounds=RequestBounds(max_audio_s=8.0)
    )


def configs(repo):
    return {d.name: parse_model_config(d / "config.pbtxt") for d in repo.iterdir() if (d / "config.pbtxt").is_file()}


def test_every_config_parses_and_the_ensemble_is_wired(trt_repo, export_dir):
    cfgs = configs(trt_repo)
    assert sorted(cfgs) == sorted(trt_flavor.MODEL_NAMES)
    assert check_ensemble(trt_repo) == []
    assert cfgs["encoder"].platform == "tensorrt_plan" and cfgs["tensorrt_llm"].backend == "tensorrtllm"
    assert cfgs["tensorrt_llm"].model_transaction_policy.decoupled  # streaming needs it
    assert cfgs["canary_qwen_stream"].model_transaction_policy.decoupled
    assert all(c.max_batch_size == MAX_BATCH for c in cfgs.values())
    steps = [s.model_name for s in cfgs["canary_qwen"].ensemble_scheduling.step]
    assert steps == ["preprocessing", "encoder", "prompt_table", "tensorrt_llm", "postprocessing"]
    # same public interface as the onnx flavour
    ens = cfgs["canary_qwen"]
    assert [i.name for i in ens.input] == ["AUDIO", "PROMPT", "MAX_NEW_TOKENS"] and [o.name for o in ens.output] == [
        "TEXT",
        "OUTPUT_IDS",
    ]
    # engines linked in; by default tensorrt_llm finds its engine where the repository is mounted at /models
    assert os.path.samefile(trt_repo / "encoder/1/model.plan", export_dir / "trt/encoder.plan")
    assert os.path.samefile(trt_repo / "tensorrt_llm/1/rank0.engine", export_dir / "trt/llm_engine/rank0.engine")
    assert cfgs["tensorrt_llm"].parameters["gpt_model_path"].string_value == "/models/tensorrt_llm/1"
    info = json.loads((trt_repo / "canary_qwen_repo.json").read_text())
    assert info["flavor"] == "trt" and info["settings"]["engine_dtype"] == "bfloat16"


def test_without_streaming_nothing_is_decoupled(export_dir, tmp_path):
    repo = trt_flavor.generate_trt_repo(
        export_dir, tmp_path / "repo", decoupled_streaming=False, engine_dir_in_server="/srv/repo/tensorrt_llm/1"
    )
    cfgs = configs(repo)
    assert "canary_qwen_stream" not in cfgs and not cfgs["tensorrt_llm"].model_transaction_policy.decoupled
    assert cfgs["canary_qwen"].max_batch_size == 8  # the engine's
    assert cfgs["tensorrt_llm"].parameters["gpt_model_path"].string_value == "/srv/repo/tensorrt_llm/1"
    with pytest.raises(UsageError, match="absolute path"):  # the backend does not resolve it against the repository
        trt_flavor.generate_trt_repo(export_dir, tmp_path / "rel", engine_dir_in_server="repo/tensorrt_llm/1")


def test_prompt_table_outputs_are_what_tensorrt_llm_takes(trt_repo, export_dir):
    cfgs = configs(trt_repo)
    table_out = {o.name: o for o in cfgs["prompt_table"].output}
    llm_in = {i.name: i for i in cfgs["tensorrt_llm"].input}
    info = read_manifest(export_dir).model
    prompt = np.array([[1, 2, info["placeholder_id"], 3]], dtype=np.int64)
    frames = np.random.default_rng(0).standard_normal((1, 6, info["hidden_size"])).astype(np.float32)
    arrays = tensorrt_llm_inputs(
        prompt,
        frames,
        np.array([5]),
        [16],
        placeholder_id=info["placeholder_id"],
        vocab_size=ENGINE_VOCAB,
        table_dtype="bfloat16",
        end_id=info["eos_id"],
        pad_id=info["pad_id"],
    )
    assert set(arrays) == set(table_out)
    for name, array in arrays.items():
        want = pb2.DataType.Name(table_out[name].data_type)
        got = (
            "TYPE_BF16"
            if array.dtype == ml_dtypes.bfloat16
            else "TYPE_" + {"int32": "INT32", "uint64": "UINT64", "bool": "BOOL"}[array.dtype.name]
        )
        assert got == want == pb2.DataType.Name(llm_in[name].data_type), name
        assert array.shape[0] == 1 and len(array.shape) - 1 == len(table_out[name].dims), name
    # only the 5 valid frames become the table, addressed by fake ids from the engine's vocab size on
    assert arrays["input_ids"].tolist() == [[1, 2, *range(ENGINE_VOCAB, ENGINE_VOCAB + 5), 3]]
    np.testing.assert_array_equal(arrays["prompt_embedding_table"][0], frames[0, :5].astype(ml_dtypes.bfloat16))
    assert arrays["prompt_vocab_size"].tolist() == [[5]] and arrays["request_output_len"].tolist() == [[16]]
    assert (arrays["prompt_table_extra_ids"][0, 2:7] > 0).all() and arrays["prompt_table_extra_ids"][
        0, [0, 1, 7]
    ].sum() == 0
    assert arrays["streaming"].tolist() == [[False]]


def test_requests_with_more_than_one_row_are_refused(export_dir):
    info = read_manifest(export_dir).model
    prompt = np.array([[info["placeholder_id"]]] * 2)
    frames = np.zeros((2, 6, info["hidden_size"]), np.float32)
    with pytest.raises(InputError, match="one clip per request"):
        tensorrt_llm_inputs(
            prompt,
            frames,
            np.array([6, 6]),
            [8, 8],
            placeholder_id=info["placeholder_id"],
            vocab_size=ENGINE_VOCAB,
            table_dtype="bfloat16",
            end_id=0,
            pad_id=0,
        )


def test_generated_rows_cut_at_length_and_eos():
    ids = np.array([[[5, 6, 9, 7, 0]], [[8, 8, 8, 0, 0]]], np.int32)  # [B, beams, N]
    assert generated_rows(ids, np.array([[5], [3]]), end_id=9) == [[5, 6], [8, 8, 8]]
    assert generated_rows(ids, None, end_id=42) == [[5, 6, 9, 7, 0], [8, 8, 8, 0, 0]]


def test_missing_engines_and_too_large_batches_are_clear_errors(export_dir, tmp_path):
    with pytest.raises(ArtifactError, match="canary-qwen build-engines"):
        trt_flavor.generate_trt_repo(export_dir, tmp_path / "a", engines_dir=tmp_path / "none")
    with pytest.raises(ValueError, match=r"max_batch must be in 1\.\.8"):
        trt_flavor.generate_trt_repo(export_dir, tmp_path / "b", max_batch=9)
    with pytest.raises(ValueError, match="at most 500 per request"):  # 41 s -> 513 frames
        trt_flavor.generate_trt_repo(export_dir, tmp_path / "c", bounds=RequestBounds(max_audio_s=41.0))


# -- the python models in the real server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def python_models_server(trt_repo, tmp_path_factory):
    """The trt repository's python models alone (the engines cannot load without a GPU)."""
    repo = tmp_path_factory.mktemp("trt_python") / "repo"
    for name in ("preprocessing", "prompt_table", "postprocessing"):
        shutil.copytree(trt_repo / name, repo / name)
    with running_server(repo, repo.parent / "server") as server:
        yield server


def infer(server, model, arrays: dict, outputs):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inputs = []
        for name, (array, dtype) in arrays.items():
            inp = httpclient.InferInput(name, list(array.shape), dtype or np_to_triton_dtype(array.dtype))
            inp.set_data_from_numpy(array)
            inputs.append(inp)
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
        return {o: result.as_numpy(o) for o in outputs}
    finally:
        client.close()


@pytest.mark.triton
def test_served_preprocessing_and_prompt_table_build_the_protocol(python_models_server, export_dir):
    info = read_manifest(export_dir).model
    clip = make_clip(1.3, 5)[None]
    pre = infer(
        python_models_server, "preprocessing", {"AUDIO": (clip, None)}, ["PROMPT_IDS", "SAMPLES", "AUDIO_LENGTH"]
    )
    assert pre["AUDIO_LENGTH"].tolist() == [[clip.shape[1]]]
    np.testing.assert_array_equal(pre["SAMPLES"], clip)
    frames = np.random.default_rng(1).standard_normal((1, 7, info["hidden_size"])).astype(np.float32)
    names = [n for n, _, _ in trt_flavor.TABLE_OUTPUTS]
    out = infer(
        python_models_server,
        "prompt_table",
        {
            "PROMPT_IDS": (pre["PROMPT_IDS"], None),
            "EMBEDDINGS": (frames, None),
            "EMBEDDING_LENGTH": (np.array([[7]], np.int64), None),
            "MAX_NEW_TOKENS": (np.array([[12]], np.int32), None),
        },
        names,
    )
    want = prompt_table.build_request(
        pre["PROMPT_IDS"][0].tolist(),
        frames[0],
        placeholder_id=info["placeholder_id"],
        vocab_size=ENGINE_VOCAB,
        dtype="bfloat16",
    )
    assert out["input_ids"][0].tolist() == want.input_ids.tolist()
    np.testing.assert_array_equal(out["prompt_table_extra_ids"][0], want.prompt_table_extra_ids)
    # bf16 crossed the python backend through DLPack and came back as the same values
    np.testing.assert_array_equal(
        np.asarray(out["prompt_embedding_table"][0], np.float32), want.prompt_embedding_table.astype(np.float32)
    )
    assert out["prompt_vocab_size"].tolist() == [[7]] and out["request_output_len"].tolist() == [[12]]
    assert out["end_id"].tolist() == [[info["eos_id"]]] and out["pad_id"].tolist() == [[info["pad_id"]]]


@pytest.mark.triton
def test_served_postprocessing_reads_tensorrt_llm_outputs(python_models_server, export_dir):
    manifest = read_manifest(export_dir)
    tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
    eos = manifest.model["eos_id"]
    ids = np.array([[[40, 41, 42, eos, 43]]], np.int32)
    out = infer(
        python_models_server,
        "postprocessing",
        {"OUTPUT_IDS": (ids, None), "SEQUENCE_LENGTH": (np.array([[5]], np.int32), None)},
        ["TEXT", "TOKEN_IDS"],
    )
    assert out["TOKEN_IDS"].tolist() == [[40, 41, 42]]
    assert out["TEXT"][0][0].decode() == tokenizer.decode([40, 41, 42]).strip()


@pytest.mark.triton
def test_served_prompt_table_refuses_a_prompt_without_placeholder(python_models_server, export_dir):
    from tritonclient.utils import InferenceServerException

    info = read_manifest(export_dir).model
    with pytest.raises(InferenceServerException, match="placeholder"):
        infer(
            python_models_server,
            "prompt_table",
            {
                "PROMPT_IDS": (np.array([[1, 2]], np.int64), None),
                "EMBEDDINGS": (np.zeros((1, 3, info["hidden_size"]), np.float32), None),
                "EMBEDDING_LENGTH": (np.array([[3]], np.int64), None),
            },
            ["input_ids"],
        )
