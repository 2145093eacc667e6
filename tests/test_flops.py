"""The benchmark's work model: analytic FLOP counts against PyTorch's own FLOP counter on the
reference modules, the full-size figures against FACTS §6, and the datasheet peaks by GPU name."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from canary_qwen.bench.flops import (
    Work,
    WorkModel,
    encoder_frames,
    encoder_macs,
    llm_macs,
    llm_pair_macs,
    llm_token_macs,
    peak_tflops,
    roofline_fields,
)
from canary_qwen.model.config import parse_llm_config, parse_salm_config
from canary_qwen.model.mel import feature_lengths
from canary_qwen.model.salm import load_model
from canary_qwen.model.synthetic import qwen3_config, salm_config


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    # merged: LoRA adds no arithmetic once folded in (the fast paths run it merged)
    model, _, _ = load_model(str(tiny_checkpoint), dtype=torch.float32, device="cpu", merge_lora=True)
    return model, WorkModel.from_checkpoint(str(tiny_checkpoint))


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("samples", [16000, 16160 * 2 + 37, 55_555])
def test_encoder_flops_equal_pytorchs_count(tiny, samples):
    model, work = tiny
    cfg = model.cfg
    audio = torch.randn(1, samples)
    mel, _ = model.mel(audio, torch.tensor([samples]))
    valid = int(feature_lengths(torch.tensor(samples), cfg.preprocessor.hop_length))
    mel = mel[..., :valid]  # the batch's own frames only: no padding is work

    def run():
        enc, lens = model.encoder(mel, torch.tensor([valid]))
        assert enc.shape[1] == int(lens[0]) == encoder_frames(samples, cfg.preprocessor, cfg.encoder)[1]
        model.proj(enc)

    assert 2 * encoder_macs(samples, cfg.preprocessor, cfg.encoder, cfg.output_dim) == counted(run)
    assert work.clip(samples, 1).encoder == counted(run)


@pytest.mark.parametrize("length", [1, 7, 40])
def test_llm_token_and_pair_costs_equal_pytorchs_count(tiny, length):
    """The reference runs full-square attention (causal by mask), so it spends pair cost on L x L pairs.

    PyTorch's counter skips the CPU's fused attention kernel; the math kernel is plain matmuls it counts.
    """
    model, _ = tiny
    llm = model.llm_cfg
    embeds = torch.randn(1, length, llm.hidden_size)
    positions = torch.arange(length)[None]
    with sdpa_kernel(SDPBackend.MATH):
        hidden = counted(lambda: model.llm(embeds, positions, torch.ones(1, length, dtype=torch.bool)))
    assert hidden == 2 * (length * llm_token_macs(llm) + length * length * llm_pair_macs(llm))
    assert counted(lambda: model.logits(embeds[:, -1])) == 2 * llm.hidden_size * llm.vocab_size


def test_causal_prefill_and_decode_sum_over_pairs(tiny):
    model, _ = tiny
    llm = model.llm_cfg
    token, pair, output = llm_token_macs(llm), llm_pair_macs(llm), llm.hidden_size * llm.vocab_size
    prefill, decode = llm_macs(llm, 10, 4)
    assert prefill == 10 * token + pair * sum(range(1, 11)) + output
    # three decode steps at positions 10, 11, 12 attend over 11, 12, 13 keys
    assert decode == 3 * (token + output) + pair * (11 + 12 + 13)
    assert llm_macs(llm, 10, 1)[1] == llm_macs(llm, 10, 0)[1] == 0


def test_full_size_work_matches_facts(tiny):
    """FACTS §6: ~74 GFLOP per audio second (encoder ~21, prefill ~41, decode ~12) at 3.5 tokens/s."""
    _, tiny_work = tiny
    salm = parse_salm_config(salm_config("full"))
    llm = parse_llm_config(qwen3_config("full", 151936, 151643, 151645))
    full = WorkModel(salm.preprocessor, salm.encoder, salm.output_dim, llm, tiny_work.text_tokens)
    seconds = 10
    per_s = full.clip(seconds * 16000, math.ceil(3.5 * seconds)).scaled(1e-9 / seconds)
    assert per_s.encoder == pytest.approx(21, rel=0.1)
    assert per_s.prefill == pytest.approx(41, rel=0.1)
    assert per_s.decode == pytest.approx(12, rel=0.1)
    assert per_s.total == pytest.approx(74, rel=0.05)


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "bf16", 835.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA H100 80GB HBM3", "fp32", None),
        ("Orin (nvgpu)", "bf16", None),
        (None, "bf16", None),
    ],
)
def test_datasheet_peaks(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak


def test_roofline_fields():
    work = Work(encoder=2e12, prefill=5e12, decode=1e12)
    fields = roofline_fields(work, audio_s=100.0, wall_s=4.0, rtfx=25.0, peak=800.0)
    assert fields["gflop_per_audio_s"] == pytest.approx(
        {"encoder": 20.0, "prefill": 50.0, "decode": 10.0, "total": 80.0}
    )
    assert fields["model_tflops"] == pytest.approx(2.0)
    assert fields["rtfx_limit"] == pytest.approx(10_000)
    assert fields["of_limit"] == pytest.approx(0.0025)
    off_gpu = roofline_fields(work, audio_s=100.0, wall_s=4.0, rtfx=25.0, peak=None)
    assert (
        off_gpu["rtfx_limit"] is None and off_gpu["of_limit"] is None and off_gpu["model_tflops"] == pytest.approx(2.0)
    )
