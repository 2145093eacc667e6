"""ONNX export: valid graphs TensorRT can parse, parity with the reference, ONNX Runtime end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from canary_qwen.backends.cpu_linear import PackedLinear, cpu_has_bf16_units
from canary_qwen.backends.fast_layers import DenseLinear
from canary_qwen.backends.fast_torch import FastTorchBackend, length_buckets
from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.errors import ArtifactError, BackendUnavailable
from canary_qwen.export.artifacts import export_all
from canary_qwen.export.manifest import read_manifest, sha256
from canary_qwen.export.onnx_export import op_types
from canary_qwen.export.tensorrt_ops import TENSORRT_ONNX_OPS
from canary_qwen.model.generate import splice_audio
from canary_qwen.model.prompt import prompt_ids

ENCODER_REL_TOL = 1e-5
LOGITS_REL_TOL = 1e-5
COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("export"), precision="bf16", progress=False)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return TorchBackend(str(tiny_checkpoint))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["encoder", "encoder_bf16", "decoder"])
def test_graphs_pass_checker_and_shape_inference(exported, name, tmp_path):
    path = exported.artifact(name)
    onnx.checker.check_model(str(path), full_check=True)
    inferred = tmp_path / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    assert onnx.load(str(inferred)).graph.value_info


@pytest.mark.parametrize("name", ["encoder", "encoder_bf16"])
def test_encoder_uses_only_ops_tensorrt_parses(exported, name):
    ops = op_types(exported.artifact(name))
    assert {"STFT", "DFT"}.isdisjoint(ops)
    assert ops <= TENSORRT_ONNX_OPS, f"not parsable by TensorRT: {sorted(ops - TENSORRT_ONNX_OPS)}"
    graph = onnx.load(str(exported.artifact(name))).graph
    types = [t.data_type for t in graph.initializer] + [v.type.tensor_type.elem_type for v in graph.value_info]
    assert COMPLEX.isdisjoint(types)


@pytest.mark.parametrize("name", ["encoder", "encoder_bf16"])
def test_encoder_ranges_are_integer(exported, name, tmp_path):
    """TensorRT's ONNX parser takes Range on integers; a float start/limit derived from shapes goes another path."""
    inferred = tmp_path / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(exported.artifact(name)), str(inferred))
    graph = onnx.load(str(inferred), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    ranges = {n.name: onnx.TensorProto.DataType.Name(types[n.output[0]]) for n in graph.node if n.op_type == "Range"}
    assert ranges and set(ranges.values()) <= {"INT32", "INT64"}, ranges


def test_bf16_encoder_keeps_norms_softmax_and_frontend_in_fp32(exported, tmp_path):
    inferred = tmp_path / "bf16.onnx"
    onnx.shape_inference.infer_shapes_path(str(exported.artifact("encoder_bf16")), str(inferred))
    model = onnx.load(str(inferred))
    dtype = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
    }
    dtype.update({t.name: t.data_type for t in model.graph.initializer})
    nodes = model.graph.node
    for node in nodes:
        if node.op_type in ("LayerNormalization", "Softmax", "Log"):
            assert dtype[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and any(dtype.get(i) == onnx.TensorProto.BFLOAT16 for i in node.input):
            assert all(dtype.get(i) == onnx.TensorProto.BFLOAT16 for i in node.input), node.name
    assert sum(n.op_type == "MatMul" and dtype.get(n.input[1]) == onnx.TensorProto.BFLOAT16 for n in nodes) > 10
    assert dtype["embeddings"] == onnx.TensorProto.BFLOAT16 and dtype["audio"] == onnx.TensorProto.FLOAT


def test_onnx_encoder_matches_reference_on_padded_batch(exported, reference, clips):
    backend = OnnxBackend(exported.root)
    got = backend.encoder(clips)
    want = reference.encode(clips)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert rel_err(g, w.numpy()) < ENCODER_REL_TOL
    for clip, batched in zip(clips, got):  # padding never leaks into a clip's frames
        assert rel_err(backend.encoder([clip])[0], batched) < ENCODER_REL_TOL


def test_onnx_decoder_prefill_logits_match_lora_reference(exported, reference, clips):
    backend = OnnxBackend(exported.root)
    tok = reference.tokenizer
    inputs, valid = splice_audio(
        reference.model, [prompt_ids(tok, None)] * len(clips), reference.encode(clips), tok.placeholder_id
    )
    with torch.no_grad():
        position = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        want = reference.model.logits(reference.model.llm(inputs, position, valid))[:, -1]
    mask = valid.long().numpy()
    positions = np.where(mask == 1, mask.cumsum(1) - 1, 0)
    got, _ = backend.decoder(inputs.numpy(), mask, positions, backend.decoder.empty_caches(len(clips)))
    assert rel_err(got, want.numpy()) < LOGITS_REL_TOL


def test_onnx_tokens_identical_to_torch_and_fast_path(exported, reference, tiny_checkpoint, clips):
    budgets = [24, 5, 17, 24]
    want = [t.token_ids for t in reference.transcribe(clips, max_new_tokens=budgets)]
    assert [t.token_ids for t in OnnxBackend(exported.root).transcribe(clips, max_new_tokens=budgets)] == want
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="fp32", max_slots=2, encoder_batch=3)
    assert [t.token_ids for t in fast.transcribe(clips, max_new_tokens=budgets)] == want


def test_encoder_batches_keep_padding_small():
    seconds = [2.0, 8.0, 7.5, 3.0, 2.1]
    assert length_buckets([int(s * 16000) for s in seconds], max_batch=64) == [[1, 2], [3], [4, 0]]
    assert length_buckets([100] * 5, max_batch=2) == [[0, 1], [2, 3], [4]]
    assert length_buckets([], max_batch=4) == []


def test_fast_path_packs_its_cpu_weights(tiny_checkpoint):
    """The token-identity tests above ran the packed linears: they are in place and compute the same, the LoRA kept
    beside them and added to the rows that run through it (ASR) only."""
    from canary_qwen.model.qwen3 import adapter_off

    assert PackedLinear.available(), "this PyTorch build has no oneDNN linear ops"
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="fp32")
    plain = TorchBackend(str(tiny_checkpoint), dtype="fp32").model
    x = torch.randn(5, plain.llm_cfg.hidden_size)
    ours, theirs = fast.model.llm.layers[1], plain.llm.layers[1]
    # q/k/v and gate/up as one packed matrix each (the base weights): every output is the separate matrices' output.
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, parts in fused.items():
        modules = [getattr(theirs.self_attn if hasattr(theirs.self_attn, p) else theirs.mlp, p) for p in parts]
        assert isinstance(getattr(ours, name), PackedLinear), name
        base = torch.cat([torch.nn.functional.linear(x, m.weight) for m in modules], -1)
        torch.testing.assert_close(getattr(ours, name)(x), base, rtol=1e-5, atol=1e-6)
    # With the LoRA: rows flagged 1 get q/k/v through it, rows flagged 0 without it, in one call.
    qkv = [theirs.self_attn.q_proj, theirs.self_attn.k_proj, theirs.self_attn.v_proj]
    normed = theirs.input_layernorm(x)
    with torch.no_grad():
        adapted = torch.cat([m(normed) for m in qkv], -1)
        with adapter_off(plain):
            unadapted = torch.cat([m(normed) for m in qkv], -1)
        on = torch.tensor([[1.0], [0.0], [1.0], [0.0], [1.0]])
        mixed = ours.qkv_projection(x, on)
    assert not torch.allclose(adapted, unadapted)
    torch.testing.assert_close(mixed[on[:, 0] == 1], adapted[on[:, 0] == 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[on[:, 0] == 0], unadapted[on[:, 0] == 0], rtol=1e-5, atol=1e-6)
    assert isinstance(ours.o_proj, PackedLinear) and isinstance(ours.down_proj, PackedLinear)
    torch.testing.assert_close(ours.o_proj(x), theirs.self_attn.o_proj(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.head(x), x @ plain.output_weight().T, rtol=1e-5, atol=1e-6)
    frames = torch.randn(2, 7, plain.cfg.encoder.d_model)  # encoder linears carry biases and see 3-D input
    ours, theirs = fast.model.encoder.layers[0].feed_forward1.linear1, plain.encoder.layers[0].feed_forward1.linear1
    assert isinstance(ours, PackedLinear) and theirs.bias is not None
    torch.testing.assert_close(ours(frames), theirs(frames), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, torch.nn.Linear) for m in [*fast.model.encoder.modules(), *fast.model.llm.modules()])


def test_fast_path_packs_bf16_weights_where_the_cpu_has_bf16_units(tiny_checkpoint):
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="bf16")
    if not cpu_has_bf16_units():
        assert isinstance(fast.head, DenseLinear)  # emulated bf16 would be slower than fp32: the plain weights stay
        pytest.skip("this CPU has no AVX512-BF16 or AMX units")
    plain = TorchBackend(str(tiny_checkpoint), dtype="bf16", merge_lora=True).model
    x = torch.randn(5, plain.llm_cfg.hidden_size).bfloat16()
    ours, theirs = fast.model.llm.layers[1].down_proj, plain.llm.layers[1].mlp.down_proj
    assert isinstance(ours, PackedLinear) and ours.packed.dtype == torch.bfloat16
    y = torch.randn(5, plain.llm_cfg.intermediate_size).bfloat16()
    # Both accumulate in fp32 and round once to bf16: at most one bf16 step (2**-8 relative) apart.
    torch.testing.assert_close(ours(y), theirs(y), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(fast.head(x), x @ plain.output_weight().T, rtol=2**-7, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_cuda_graph_decode_gives_the_eager_tokens(tiny_checkpoint, clips):
    budgets = [24, 5, 17, 24]
    options = dict(device="cuda", dtype="fp32", max_slots=2)
    graphed = FastTorchBackend(str(tiny_checkpoint), **options).transcribe(clips, max_new_tokens=budgets)
    eager = FastTorchBackend(str(tiny_checkpoint), cuda_graphs=False, **options).transcribe(
        clips, max_new_tokens=budgets
    )
    assert [t.token_ids for t in graphed] == [t.token_ids for t in eager]


@pytest.mark.nemo
def test_onnx_tokens_identical_to_nemo_with_early_eos(eos_prone_checkpoint, eos_prone_clips, tmp_path):
    from nemo_ref import load_nemo, nemo_generate

    manifest = export_all(eos_prone_checkpoint, tmp_path / "export", progress=False)
    want = nemo_generate(load_nemo(eos_prone_checkpoint), eos_prone_clips, 24)
    assert [t.token_ids for t in OnnxBackend(manifest.root).transcribe(eos_prone_clips, max_new_tokens=24)] == want
    fast = FastTorchBackend(str(eos_prone_checkpoint), dtype="fp32", max_slots=4)
    assert [t.token_ids for t in fast.transcribe(eos_prone_clips, max_new_tokens=24)] == want


def test_manifest_describes_every_artifact(exported):
    data = exported.data
    assert data["precision"] == "bf16" and data["trt_encoder"] == "encoder_bf16"
    assert set(data["artifacts"]) == {"encoder", "encoder_bf16", "decoder", "embed_tokens", "tokenizer", "llm_merged"}
    for entry in data["artifacts"].values():
        for f in entry["files"]:
            path = exported.root / f["path"]
            assert path.stat().st_size == f["bytes"] and sha256(path) == f["sha256"]
    model = data["model"]
    assert model["default_prompt_ids"].count(model["placeholder_id"]) == 1
    assert model["max_audio_frames"] == 500  # 40 s at 12.5 frames/s
    assert {"torch", "onnx", "onnxruntime"} <= set(data["versions"])


def test_manifest_errors_are_clear(tmp_path, exported):
    with pytest.raises(ArtifactError, match="not an export directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    data = dict(exported.data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(tmp_path).artifact("encoder")


def test_onnx_backend_rejects_cuda_without_gpu_provider(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        OnnxBackend(exported.root, device="cuda")


def test_fast_path_keeps_tokens_with_many_more_clips_than_slots(reference, tiny_checkpoint):
    from conftest import make_clip

    many = [make_clip(0.3 + 0.37 * i, 10 + i) for i in range(9)]
    budgets = [3 + 4 * (i % 5) for i in range(9)]
    want = [t.token_ids for t in reference.transcribe(many, max_new_tokens=budgets)]
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="fp32", max_slots=3, encoder_batch=4)
    assert [t.token_ids for t in fast.transcribe(many, max_new_tokens=budgets)] == want
    assert set(fast.timings) == {"encode", "prefill", "decode"}


def test_scattered_external_data_is_consolidated_into_one_file(exported, tmp_path):
    """Graphs over 2 GB come out of the exporter as one file per tensor; they must end up as one .data file."""
    from canary_qwen.export.onnx_export import _consolidate_external_data

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    model = onnx.load(str(exported.artifact("encoder")))
    onnx.save_model(
        model,
        str(scratch / "encoder.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(scratch.iterdir())) > 20
    written = _consolidate_external_data(scratch, tmp_path / "encoder.onnx")
    assert [p.name for p in written] == ["encoder.onnx", "encoder.onnx.data"]
    onnx.checker.check_model(str(written[0]))
    from conftest import make_clip

    from canary_qwen.backends.onnx_runtime import OnnxEncoder

    clip = make_clip(1.5, 7)
    np.testing.assert_array_equal(
        OnnxEncoder(written[0])([clip])[0], OnnxEncoder(exported.artifact("encoder"))([clip])[0]
    )
