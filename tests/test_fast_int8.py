"""The fast path's int8 mode (``torch-fast`` with dtype int8: int8 weights per output channel, int8
activations per token, oneDNN's int8 matmul): each linear stays within int8 rounding of fp32, one loud
token does not cost the others their precision, and where greedy tokens part from the fp32 reference
the int8 path's own logits show a near-tie its rounding can swap."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from canary_qwen.backends.cpu_linear import (
    Int8Linear,
    bias_silu_quantize_rows,
    quantize_rows,
    replace_linears,
    rms_norm_quantize_rows,
    row_kernel,
    silu_gate_quantize_rows,
)
from canary_qwen.backends.fast_layers import FusedLayer, Int8FeedForward, Int8Layer
from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.bench.divergence import QUESTIONS, agreement, explain, summary, tie_ratio
from canary_qwen.model.prompt import Turn
from canary_qwen.model.salm import load_model
from canary_qwen.model.synthetic import make_checkpoint

pytestmark = pytest.mark.skipif(
    not Int8Linear.available(), reason="this CPU or PyTorch build has no oneDNN int8 matmul with VNNI/AMX"
)

BUDGET = 24
# 127 steps per row on both sides: each product carries ~0.4 % rounding, ~1.2 % over a 256-long dot
# product of random values (measured 1.1e-2 - 1.3e-2 at 1024 - 6144 inputs).
INT8_REL_TOL = 3e-2
# Share of the fp32 reference's greedy tokens kept before the first parting on the four test clips.
INT8_MIN_AGREEMENT = 0.4


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours - exact).norm() / exact.norm())


def test_int8_linear_is_fp32_within_int8_rounding():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 256) * 0.05, torch.randn(96)
    x = torch.randn(3, 7, 256)
    with_bias, without = Int8Linear(weight, bias), Int8Linear(weight)
    assert with_bias(x).shape == (3, 7, 96)
    assert relative_error(with_bias(x), x @ weight.T + bias) < INT8_REL_TOL
    assert relative_error(without(x), x @ weight.T) < INT8_REL_TOL
    residual = torch.randn(3, 7, 96)
    torch.testing.assert_close(with_bias(x, residual=residual), with_bias(x) + residual)
    x[1, 3] = 0  # a zeroed row (a padded frame) gives exactly the bias
    assert torch.equal(with_bias(x)[1, 3], bias) and not without(x)[1, 3].any()


def test_int8_linear_scales_each_token_on_its_own():
    torch.manual_seed(1)
    weight = torch.randn(64, 512) * 0.05
    quiet = torch.randn(6, 512)
    loud = 1000 * torch.randn(1, 512)
    out = Int8Linear(weight)(torch.cat((quiet, loud)))
    # One scale for the whole batch would round the quiet rows to almost nothing (error near 100 %).
    assert relative_error(out[:6], quiet @ weight.T) < INT8_REL_TOL


def _kernel_args(kernel, rows: torch.Tensor) -> tuple:
    if kernel is rms_norm_quantize_rows:
        return rows, torch.rand(rows.shape[1]) + 0.5, 1e-6
    if kernel is silu_gate_quantize_rows:
        return rows, torch.rand(rows.shape[0], 1) + 0.5
    if kernel is bias_silu_quantize_rows:
        return rows, torch.rand(rows.shape[0], 1) + 0.5, torch.randn(rows.shape[1])
    return (rows,)


@pytest.mark.parametrize(
    "kernel", [quantize_rows, rms_norm_quantize_rows, silu_gate_quantize_rows, bias_silu_quantize_rows]
)
def test_row_kernels_compiled_give_the_eager_bytes(kernel):
    """Compiled (one pass per row) and eager give the same bytes but where float rounding puts a value
    at the other side of a .5 step: at most one step apart, and the same scales within float rounding."""
    torch.manual_seed(2)
    for shape in ((1, 64), (5, 300), (40, 2048)):
        rows = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]
        with torch.inference_mode():
            args = _kernel_args(kernel, rows)
            (ours, our_scale), (eager, eager_scale) = row_kernel(kernel)(*args), kernel(*args)
        assert ours.dtype == torch.uint8 and (ours.int() - eager.int()).abs().max() <= 1
        torch.testing.assert_close(our_scale, eager_scale)


@pytest.mark.parametrize(
    "kernel", [quantize_rows, rms_norm_quantize_rows, silu_gate_quantize_rows, bias_silu_quantize_rows]
)
def test_a_row_alone_gets_the_bytes_and_scale_it_gets_among_others(kernel):
    """Bit for bit: a one-clip decode step quantizes one row, a batch many, and their tokens must agree
    (tests/test_batch_invariance.py). With inductor's own one-row kernel, 154 of 512 such rows got other
    rms_norm scales alone than among others (6144 wide; 0 at 1024 and 2048 wide on random rows)."""
    torch.manual_seed(0)
    rows = torch.randn(128, 6144) * torch.logspace(-3, 3, 128)[:, None]
    with torch.inference_mode():
        args = _kernel_args(kernel, rows)
        together = row_kernel(kernel)(*args)
        for i in range(len(rows)):
            alone = row_kernel(kernel)(
                *(a[i : i + 1] if isinstance(a, torch.Tensor) and a.dim() == 2 else a for a in args)
            )
            assert all(torch.equal(x[0], y[i]) for x, y in zip(alone, together)), f"row {i}"


def test_row_kernels_run_eagerly_where_inductor_cannot_compile():
    """Without a working C++ compiler inductor fails at the first call: int8 still runs, slower, and says so."""
    torch._dynamo.reset()
    settings = {"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}
    try:
        with (
            torch._inductor.config.patch(settings),
            pytest.warns(UserWarning, match="quantize_rows runs as eager ops.*torch.compile failed"),
        ):
            quantize = row_kernel.__wrapped__(quantize_rows)
    finally:
        torch._dynamo.reset()
    assert quantize is quantize_rows


@pytest.fixture(scope="module")
def every_projection_lora(tmp_path_factory):
    """A tiny checkpoint with LoRA on all seven projections: the MLP's pairs take Int8Layer's unfused route."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return make_checkpoint(tmp_path_factory.mktemp("lora7") / "ckpt", "tiny", seed=5, lora_targets=targets)


@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "every_projection_lora"])
def test_int8_layer_fuses_without_changing_the_arithmetic(checkpoint, request):
    """``Int8Layer`` (norms, silu(gate) * up and residual adds inside the compiled row kernels) computes what
    the same ``Int8Linear``s give with the steps done one by one, up to float rounding (a swapped byte at a
    .5 step moves an output by ~1e-6 of its size; any misplaced row scale by 100 %), the LoRA's rows (ASR)
    and the others (LLM) mixed in one batch."""
    model, _, _ = load_model(str(request.getfixturevalue(checkpoint)), dtype=torch.float32)
    fused = Int8Layer(model.llm.layers[0], Int8Linear)
    stepwise = copy.copy(fused)
    stepwise.__class__ = FusedLayer
    torch.manual_seed(3)
    x = 3 * torch.randn(50, model.llm_cfg.hidden_size)
    attention = torch.randn(50, fused.n_heads * fused.head_dim)
    on = (torch.arange(50) % 3 != 0).float()[:, None]
    with torch.inference_mode():
        for name, run in (
            ("qkv", lambda layer: layer.qkv_projection(x, on)),
            ("attention", lambda layer: layer.attention_residual(attention, x, on) - x),
            ("mlp", lambda layer: layer.mlp_residual(x, on) - x),
        ):
            assert relative_error(run(fused), run(stepwise)) < 1e-5, name


def test_int8_feed_forward_fuses_without_changing_the_arithmetic(tiny_checkpoint):
    """``Int8FeedForward`` (bias and SiLU inside the second matmul's quantization) computes what the same
    ``Int8Linear``s give step by step, up to float rounding."""
    model, _, _ = load_model(str(tiny_checkpoint), dtype=torch.float32)
    feed_forward = model.encoder.layers[0].feed_forward1
    fused = Int8FeedForward(feed_forward)
    replace_linears(feed_forward, Int8Linear)
    torch.manual_seed(4)
    x = 3 * torch.randn(2, 30, model.encoder.cfg.d_model)
    with torch.inference_mode():
        assert relative_error(fused(x), feed_forward(x)) < 1e-5


def test_fast_path_int8_partings_are_near_ties(tiny_checkpoint, clips):
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="int8")
    assert fast.dtype == "int8" and fast.model.dtype == torch.float32
    modules = [*fast.model.encoder.modules(), *fast.model.llm.modules(), fast.model.proj, fast.head]
    assert not any(isinstance(m, torch.nn.Linear) for m in modules)
    assert isinstance(fast.model.llm.layers[0].down_proj, Int8Linear) and isinstance(fast.head, Int8Linear)
    tokens = [t.token_ids for t in fast.transcribe(clips, max_new_tokens=BUDGET)]
    reference = [
        t.token_ids for t in TorchBackend(str(tiny_checkpoint), dtype="fp32").transcribe(clips, max_new_tokens=BUDGET)
    ]
    share = agreement(tokens, reference)
    print(f"torch-fast int8: {share:.2f} of the fp32 reference's tokens before the first parting")
    assert share >= INT8_MIN_AGREEMENT
    found = explain(str(tiny_checkpoint), clips, {"reference": reference, "torch-fast": tokens}, "int8", "cpu")
    print(summary(found, {"reference": reference, "torch-fast": tokens}))
    for d in found:
        if d.step is None:
            continue
        assert tokens[d.clip][: d.step] == reference[d.clip][: d.step]
        # Both tokens' int8 logits are within logit_error of fp32, so a swap needs gap <= 2 x error.
        assert d.logit_error > 0 and tie_ratio(d) <= 2, d


def test_fast_path_int8_llm_mode_partings_are_near_ties(tiny_checkpoint):
    """LLM mode (the LoRA off) in int8 against the fp32 reference's answers: where they part, the two tokens' fp32
    logits are no further apart than int8's rounding of them."""
    dialogues = [[Turn("user", q)] for q in QUESTIONS]
    fast = FastTorchBackend(str(tiny_checkpoint), dtype="int8")
    tokens = [t.token_ids for t in fast.answer(dialogues, max_new_tokens=BUDGET)]
    reference = TorchBackend(str(tiny_checkpoint), dtype="fp32")
    want = [t.token_ids for t in reference.answer(dialogues, max_new_tokens=BUDGET)]
    assert agreement(tokens, want) >= INT8_MIN_AGREEMENT
    found = explain(str(tiny_checkpoint), dialogues, {"reference": want, "torch-fast": tokens}, "int8", "cpu")
    print(summary(found, {"reference": want, "torch-fast": tokens}, "dialogues"))
    for d in found:
        if d.step is not None:
            assert tokens[d.clip][: d.step] == want[d.clip][: d.step]
            assert d.logit_error > 0 and tie_ratio(d) <= 2, d


def test_int8_from_a_bf16_file_quantizes_what_an_fp32_file_of_the_same_values_gives(tmp_path, tiny_checkpoint, clips):
    """A bf16 checkpoint (as released) loads in bf16, and every matrix becomes fp32 on its way to int8 with
    LoRA merged in fp32 there: the same int8 weights and tokens as from fp32 storage of the same values
    (merging in bf16 would round the merged q/v matrices first)."""
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    for name, dtype in (("as_fp32", torch.float32), ("as_bf16", torch.bfloat16)):
        shutil.copytree(tiny_checkpoint, tmp_path / name)
        rounded = {k: v.bfloat16().to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(rounded, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    from_fp32, from_bf16 = (FastTorchBackend(str(tmp_path / n), dtype="int8") for n in ("as_fp32", "as_bf16"))
    assert from_bf16.model.dtype == torch.float32
    for ours, theirs in zip(from_bf16.model.llm.layers, from_fp32.model.llm.layers):
        torch.testing.assert_close(ours.qkv_proj.weight_scale, theirs.qkv_proj.weight_scale, rtol=0, atol=0)
    assert [t.token_ids for t in from_bf16.transcribe(clips, max_new_tokens=BUDGET)] == [
        t.token_ids for t in from_fp32.transcribe(clips, max_new_tokens=BUDGET)
    ]
