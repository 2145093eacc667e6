"""Quantized exports for ONNX Runtime (``export --quantize``, ``--target jetson``) on the tiny checkpoint:
the graphs hold the quantized ops, ONNX Runtime runs them through the unchanged backend, and where greedy
tokens part from the fp32 reference the divergence report shows the quantization error could swap them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from canary_qwen.backends.onnx_runtime import OnnxBackend, OnnxEncoder
from canary_qwen.bench.divergence import agreement, explain, summary, tie_ratio
from canary_qwen.errors import UsageError
from canary_qwen.export.artifacts import export_all

pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBitsQuantizer needs onnx-ir (the [export] extra)")

BUDGET = 24
# fp16 keeps 11 significant bits (bf16: 8, whose encoder graph is 1.1e-2 - 1.4e-2 from fp32 in docs/accuracy.md).
FP16_ENCODER_REL_TOL = 1e-2
# Share of the fp32 reference's greedy tokens the int8 decoder reproduces before its first parting, on the
# four test clips (measured 0.68 at 24 tokens: random tiny weights leave small logit gaps).
INT8_MIN_AGREEMENT = 0.5


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint, tmp_path_factory):
    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("int8"), quantize="int8", progress=False)


@pytest.fixture(scope="module")
def jetson_export(tiny_checkpoint, tmp_path_factory):
    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("jetson"), target="jetson", progress=False)


@pytest.fixture(scope="module")
def fp32_tokens(tiny_checkpoint, clips):
    from canary_qwen.backends.torch_ref import TorchBackend

    return [t.token_ids for t in TorchBackend(str(tiny_checkpoint)).transcribe(clips, max_new_tokens=BUDGET)]


def weight_matmuls(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(MatMuls whose second input is a stored weight, MatMulNBits nodes)."""
    weights = {t.name for t in graph.initializer}
    plain = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    return plain, [n for n in graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("fixture, bits", [("int8_export", 8), ("jetson_export", 4)])
def test_every_decoder_weight_matmul_is_quantized(request, fixture, bits):
    manifest = request.getfixturevalue(fixture)
    path = manifest.onnx_graph("decoder")
    assert path.name == f"decoder_int{bits}.onnx" and path.with_name(path.name + ".data").is_file()
    onnx.checker.check_model(str(path))
    plain, quantized = weight_matmuls(onnx.load(str(path)).graph)
    layers = manifest.model["num_hidden_layers"]
    assert not plain
    assert len(quantized) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and the output layer
    assert {a.i for n in quantized for a in n.attribute if a.name == "bits"} == {bits}
    assert manifest.data["onnx"]["quantization"]["bits"] == bits
    # The fp32 graph stays (TensorRT-LLM builds from llm_merged, not from these graphs).
    assert not weight_matmuls(onnx.load(str(manifest.artifact("decoder"))).graph)[1]


def test_int8_decoder_agrees_with_fp32_and_its_partings_are_near_ties(int8_export, tiny_checkpoint, clips, fp32_tokens):
    backend = OnnxBackend(int8_export.root)
    assert backend.dtype == "int8"
    tokens = [t.token_ids for t in backend.transcribe(clips, max_new_tokens=BUDGET)]
    share = agreement(tokens, fp32_tokens)
    print(f"int8 decoder: {share:.2f} of the fp32 reference's tokens before the first parting")
    assert share >= INT8_MIN_AGREEMENT
    found = explain(
        str(tiny_checkpoint),
        clips,
        {"reference": fp32_tokens, "onnx": tokens},
        "fp32",
        "cpu",
        export=str(int8_export.root),
    )
    print(summary(found))
    for d in found:
        if d.step is None:
            continue
        assert tokens[d.clip][: d.step] == fp32_tokens[d.clip][: d.step]
        # The int8 logits are within logit_error of fp32 on both tokens, so a swap needs gap <= 2 x error.
        assert d.logit_error > 0 and tie_ratio(d) <= 2, d


def test_jetson_profile_runs_fp16_encoder_and_int4_decoder(jetson_export, clips, fp32_tokens):
    data = jetson_export.data
    assert data["target"] == "jetson" and data["precision"] == "fp16" and data["trt_encoder"] == "encoder_fp16"
    assert data["onnx"]["encoder"] == "encoder_fp16"
    fp16 = OnnxEncoder(jetson_export.onnx_graph("encoder"))(clips)
    fp32 = OnnxEncoder(jetson_export.artifact("encoder"))(clips)
    errors = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(fp16, fp32)]
    print(f"fp16 encoder embeddings vs fp32: max relative error {max(errors):.2e}")
    assert 0 < max(errors) < FP16_ENCODER_REL_TOL
    backend = OnnxBackend(jetson_export.root)
    tokens = [t.token_ids for t in backend.transcribe(clips, max_new_tokens=BUDGET)]
    assert backend.dtype == "int4" and any(tokens) and all(len(t) <= BUDGET for t in tokens)
    print(f"jetson (fp16 encoder, int4 decoder): {agreement(tokens, fp32_tokens):.2f} of the fp32 tokens kept")


def test_triton_onnx_repository_carries_the_graphs_the_export_chose(jetson_export, tmp_path):
    from canary_qwen.export.manifest import read_manifest
    from canary_qwen.serving.onnx_flavor import generate_onnx_repo

    repo = generate_onnx_repo(jetson_export.root, tmp_path / "repo")
    for model, role, name in (("encoder", "encoder", "encoder_fp16"), ("llm", "decoder", "decoder_int4")):
        served = read_manifest(repo / model / "1")
        assert served.onnx_graph(role).name == f"{name}.onnx" and list(served.data["artifacts"])[0] == name


def test_unknown_quantization_and_target_are_usage_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(UsageError, match="unknown quantization 'int2'"):
        export_all(tiny_checkpoint, tmp_path, quantize="int2", progress=False)
    with pytest.raises(UsageError, match="unknown target 'orin'"):
        export_all(tiny_checkpoint, tmp_path, target="orin", progress=False)
