"""vLLM backend: greedy tokens identical to the torch reference (through the LoRA adapter and through the merged
checkpoint, mixed lengths, early eos), and LLM mode equal to Hugging Face greedy on the base Qwen3.

vLLM runs in its own venv (``.venv-vllm``, made by scripts/setup.sh); elsewhere these tests skip.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import CHECKPOINT_VARIANTS, boost_token

from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.decoding import until_eos
from canary_qwen.export.artifacts import export_all
from canary_qwen.model.prompt import Turn, dialogue_ids
from canary_qwen.model.synthetic import make_checkpoint
from canary_qwen.model.tokenizer import QwenTokenizer

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm (scripts/setup.sh)")
from canary_qwen.backends.vllm import VllmBackend, lora_rank_cap  # noqa: E402
from canary_qwen.errors import BackendUnavailable  # noqa: E402

VLLM_HEAD_DIM = 32  # vLLM's CPU attention has no kernel for tiny's 16
KV_CACHE_GIB = 0.0625
BUDGET = 24


def _engine(export_dir) -> VllmBackend:
    return VllmBackend(export_dir, kv_cache_gib=KV_CACHE_GIB)


def _hf_greedy(model_dir, ids: list[int], tok, budget: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=budget,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    return until_eos(out[0, len(ids) :].tolist(), tok.eos_id)


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """Tiny (seed 0) exported with the base Qwen3 and the LoRA as an adapter: vLLM applies it per request."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("vllm") / "ckpt", "tiny", seed=0, head_dim=VLLM_HEAD_DIM)
    return ckpt, export_all(ckpt, tmp_path_factory.mktemp("vllm-export"), progress=False, lora_adapter=True)


@pytest.fixture(scope="class")
def lora_engine(lora_export):
    engine = _engine(lora_export[1].root)
    yield engine
    engine.close()


class TestOneEngineForBothModes:
    """One engine on llm_base + the adapter (closed after these: vLLM runs one in-process engine at a time)."""

    def test_lora_adapter_tokens_identical_to_reference(self, lora_export, lora_engine, clips):
        want = [t.token_ids for t in TorchBackend(str(lora_export[0])).transcribe(clips, max_new_tokens=BUDGET)]
        got = lora_engine.transcribe(clips, max_new_tokens=BUDGET)
        assert lora_engine.engine.lora is not None
        assert [t.token_ids for t in got] == want

    def test_per_clip_budgets_and_zero_budget(self, lora_export, lora_engine, clips):
        budgets = [5, 0, BUDGET, 1]
        want = TorchBackend(str(lora_export[0])).transcribe(clips, max_new_tokens=budgets)
        got = lora_engine.transcribe(clips, max_new_tokens=budgets)
        assert [t.token_ids for t in got] == [t.token_ids for t in want]
        assert [t.text for t in got] == [t.text for t in want]

    def test_a_clip_too_long_for_the_engine_is_refused_and_nothing_is_left_running(self, lora_engine, clips):
        from conftest import make_clip

        from canary_qwen.errors import InputError

        with pytest.raises(InputError, match="positions .* the engine holds 2048"):
            lora_engine.transcribe([clips[0], make_clip(170.0, 1)], max_new_tokens=4)  # 2125 frames
        assert not lora_engine.engine.busy

    def test_llm_mode_equals_transformers_greedy_on_base(self, lora_export, lora_engine):
        messages = ["Summarise: the cat sat on the mat.", "hello", "What is 2 + 2?"]
        tok = lora_engine.tokenizer
        manifest = lora_export[1]
        want = [
            _hf_greedy(manifest.artifact("llm_base"), dialogue_ids(tok, [Turn("user", m)]), tok, 16) for m in messages
        ]
        got = lora_engine.answer([[Turn("user", m)] for m in messages], max_new_tokens=16)
        assert [t.token_ids for t in got] == want
        # the merged model (adapter on) answers the first differently: LLM mode really has the adapter off
        assert (
            _hf_greedy(manifest.artifact("llm_merged"), dialogue_ids(tok, [Turn("user", messages[0])]), tok, 16)
            != want[0]
        )

    def test_a_step_mixing_both_modes_gives_each_row_its_own(self, lora_export, lora_engine, clips):
        """Transcriptions and LLM-mode answers admitted together (one running batch, as the served engine has them)
        each get the reference's ids. vLLM 0.32 on a CPU applies the adapter to every row of such a step, so LLM
        rows carry a zero adapter (``zero_adapter``); without it they got the adapter's tokens (measured)."""
        from conftest import dialogue_cases

        from canary_qwen.engines.base import EngineRequest
        from canary_qwen.model.prompt import prompt_ids

        reference = TorchBackend(str(lora_export[0]))
        cases = list(dialogue_cases().values())
        want = [t.token_ids for t in reference.transcribe(clips[:2], max_new_tokens=12)]
        want += [t.token_ids for t in reference.answer(cases, max_new_tokens=12)]
        engine, tok = lora_engine.engine, lora_engine.tokenizer
        frames = lora_engine.encoder(clips[:2])
        requests = [EngineRequest(f"{i}", prompt_ids(tok, None), f, 12) for i, f in enumerate(frames)]
        requests += [EngineRequest(f"{2 + i}", dialogue_ids(tok, c), None, 12) for i, c in enumerate(cases)]
        got: dict[str, list[int]] = {r.request_id: [] for r in requests}
        assert engine.admit(requests) == [None] * len(requests)
        while engine.busy:
            for request_id, new, _ in engine.step():
                got[request_id].extend(new)
        assert [got[r.request_id] for r in requests] == want

    def test_llm_mode_dialogues_equal_the_reference(self, lora_export, lora_engine):
        """vLLM's LLM mode gives the torch reference's ids (the reference gives NeMo's: tests/test_llm_mode.py) for a
        question and for a system turn with two user turns."""
        from conftest import dialogue_cases

        cases = list(dialogue_cases().values())
        want = TorchBackend(str(lora_export[0])).answer(cases, max_new_tokens=16)
        assert [t.token_ids for t in lora_engine.answer(cases, max_new_tokens=16)] == [w.token_ids for w in want]


@pytest.mark.parametrize("variant", [v for v in CHECKPOINT_VARIANTS if v != "qv-lora"])  # qv-lora: above
def test_nemo_parity_variants_identical_to_reference(variant, clips, tmp_path):
    """The other checkpoint variants of the NeMo parity tests (the torch reference equals NeMo on them): LoRA
    on all four attention projections as a vLLM adapter, and xscaling without a LoRA (merged path)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", head_dim=VLLM_HEAD_DIM, **CHECKPOINT_VARIANTS[variant])
    manifest = export_all(ckpt, tmp_path / "export", progress=False, lora_adapter=True)
    want = [t.token_ids for t in TorchBackend(str(ckpt)).transcribe(clips, max_new_tokens=BUDGET)]
    engine = _engine(manifest.root)
    try:
        assert (engine.engine.lora is None) == (variant == "xscaling-no-lora")
        assert [t.token_ids for t in engine.transcribe(clips, max_new_tokens=BUDGET)] == want
    finally:
        engine.close()


def test_lora_rank_caps_are_vllms_own():
    """vLLM 0.32 starts only with a max_lora_rank from its MaxLoRARanks literal: the cap is the smallest that holds
    the adapter's rank, and a rank over them all is one clear error."""
    assert [lora_rank_cap(r) for r in (1, 4, 8, 24, 96, 128, 320)] == [1, 8, 8, 32, 128, 128, 320]
    with pytest.raises(BackendUnavailable, match="rank 600 is over the largest vLLM takes \\(512\\)"):
        lora_rank_cap(600)


@pytest.mark.parametrize("rank", [4, 24, 96])
def test_an_adapter_of_any_rank_transcribes_and_answers(rank, clips, tmp_path):
    """A checkpoint fine-tuned with a LoRA rank that is not one of vLLM's caps: both modes on vLLM equal the torch
    reference (ASR) and Hugging Face greedy on the base Qwen3 (LLM mode)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", head_dim=VLLM_HEAD_DIM, lora_rank=rank)
    manifest = export_all(ckpt, tmp_path / "export", progress=False, lora_adapter=True)
    want = [t.token_ids for t in TorchBackend(str(ckpt)).transcribe(clips, max_new_tokens=BUDGET)]
    engine = _engine(manifest.root)
    try:
        assert engine.engine.lora is not None
        assert [t.token_ids for t in engine.transcribe(clips, max_new_tokens=BUDGET)] == want
        tok = engine.tokenizer
        hf = _hf_greedy(manifest.artifact("llm_base"), dialogue_ids(tok, [Turn("user", "hello")]), tok, 8)
        assert engine.answer([[Turn("user", "hello")]], max_new_tokens=8)[0].token_ids == hf
    finally:
        engine.close()


def test_stdout_carries_only_results(lora_export, clip_files, clips):
    """vLLM logs to stdout unless told otherwise: `transcribe --backend vllm --json` and `ask --json` print their
    JSON alone there."""
    ckpt, manifest = lora_export
    command = [sys.executable, "-m", "canary_qwen.cli"]
    argv = [*command, "transcribe", "--backend", "vllm", "--json", "--model", str(manifest.root)]
    run = subprocess.run([*argv, "--max-new-tokens", "4", *clip_files[:2]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [json.loads(line)["audio"] for line in run.stdout.splitlines()] == clip_files[:2]
    argv = [*command, "ask", "--backend", "vllm", "--json", "--model", str(manifest.root), "--about", clip_files[0]]
    run = subprocess.run([*argv, "--max-new-tokens", "6", "Summarise:"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (answer,) = [json.loads(line) for line in run.stdout.splitlines()]
    heard = TorchBackend(str(ckpt)).transcribe(clips[:1])[0].text
    tok = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
    want = _hf_greedy(
        manifest.artifact("llm_base"), dialogue_ids(tok, [Turn("user", f"Summarise:\n\n{heard}")]), tok, 6
    )
    assert answer == {"text": tok.decode(want).strip(), "token_ids": want, "transcript": heard}


@pytest.fixture(scope="module")
def eos_prone_export(tmp_path_factory):
    """Seed 0 with <|im_end|> boosted x4: of six clips three stop at eos (after 3, 7 and 17 tokens at head_dim 32).
    Exported merged only (no adapter)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("vllm-eos") / "ckpt", "tiny", seed=0, head_dim=VLLM_HEAD_DIM)
    boost_token(ckpt, "<|im_end|>", 4.0)
    return ckpt, export_all(ckpt, tmp_path_factory.mktemp("vllm-eos-export"), progress=False)


def test_merged_checkpoint_tokens_identical_with_early_eos(eos_prone_export, eos_prone_clips):
    ckpt, manifest = eos_prone_export
    want = [t.token_ids for t in TorchBackend(str(ckpt)).transcribe(eos_prone_clips, max_new_tokens=BUDGET)]
    assert any(len(t) < BUDGET for t in want) and any(len(t) == BUDGET for t in want), want
    engine = _engine(manifest.root)
    try:
        assert engine.engine.lora is None
        assert [t.token_ids for t in engine.transcribe(eos_prone_clips, max_new_tokens=BUDGET)] == want
    finally:
        engine.close()


def test_cli_transcribe_and_ask(lora_export, clip_files, clips, capsys):
    """The commands make their own engines, one at a time (vLLM's in-process engine state is global)."""
    from canary_qwen.cli import main

    ckpt, manifest = lora_export
    reference = TorchBackend(str(ckpt))
    assert (
        main(["transcribe", "--backend", "vllm", "--model", str(manifest.root), "--max-new-tokens", "8", *clip_files])
        == 0
    )
    want = reference.transcribe(clips, max_new_tokens=8)
    assert capsys.readouterr().out.splitlines() == [f"{path}\t{t.text}" for path, t in zip(clip_files, want)]

    question = "Summarise this transcript:"
    assert (
        main(
            [
                "ask",
                "--backend",
                "vllm",
                "--model",
                str(manifest.root),
                "--about",
                clip_files[0],
                "--max-new-tokens",
                "12",
                question,
            ]
        )
        == 0
    )
    tok = reference.tokenizer
    heard = reference.transcribe(clips[:1])[0].text
    ids = dialogue_ids(tok, [Turn("user", f"{question}\n\n{heard}")])
    assert (
        capsys.readouterr().out.strip() == tok.decode(_hf_greedy(manifest.artifact("llm_base"), ids, tok, 12)).strip()
    )


def test_a_head_size_vllm_cannot_attend_is_refused_before_vllm_starts(tiny_export, clip_files, capsys):
    """The tiny checkpoint's head size 16 is not among those vLLM's CPU attention has kernels for (its own list,
    CPUAttentionBackend.get_supported_head_sizes): one clear line and exit 2, not a failure inside vLLM's start."""
    from canary_qwen.cli import main

    assert main(["transcribe", "--backend", "vllm", "--model", str(tiny_export), clip_files[0]]) == 2
    err = capsys.readouterr().err
    assert "no kernel for this model's head size 16" in err and "32, 64" in err
    assert len(err.strip().splitlines()) == 1
