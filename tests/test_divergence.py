"""The reduced-precision divergence report on the tiny checkpoint."""

from __future__ import annotations

import math

import pytest

from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.bench.divergence import (
    QUESTIONS,
    explain,
    first_difference,
    forced_logits,
    run_paths,
    summary,
    tie_ratio,
)
from canary_qwen.errors import UsageError
from canary_qwen.model.prompt import Turn

BUDGET = 12


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 7]) == 2  # one side stopped at eos
    assert first_difference([], []) is None


def test_teacher_forced_logits_follow_greedy_decoding(tiny_checkpoint, clips):
    reference = TorchBackend(str(tiny_checkpoint), dtype="fp32")
    tokens = reference.transcribe(clips[:2], max_new_tokens=BUDGET)
    for clip, out in zip(clips, tokens):
        for k in (0, 3, len(out.token_ids) - 1):
            assert int(forced_logits(reference, clip, out.token_ids[:k]).argmax()) == out.token_ids[k]


def test_teacher_forced_logits_follow_greedy_answers_in_llm_mode(tiny_checkpoint):
    """LLM mode: the dialogue's prompt with the LoRA off; the same forward with it on would pick other tokens."""
    reference = TorchBackend(str(tiny_checkpoint), dtype="fp32")
    dialogues = [[Turn("user", q)] for q in QUESTIONS[:2]]
    for dialogue, out in zip(dialogues, reference.answer(dialogues, max_new_tokens=BUDGET)):
        for k in (0, 3, len(out.token_ids) - 1):
            assert int(forced_logits(reference, dialogue, out.token_ids[:k]).argmax()) == out.token_ids[k]


def test_llm_mode_paths_in_fp32_do_not_part_and_nemo_is_refused(tiny_checkpoint):
    dialogues = [[Turn("user", q)] for q in QUESTIONS]
    tokens = run_paths(str(tiny_checkpoint), dialogues, BUDGET, "fp32", "cpu", nemo=False)
    found = explain(str(tiny_checkpoint), dialogues, tokens, "fp32", "cpu")
    assert [(d.path, d.step) for d in found] == [("torch-fast", None)] * len(dialogues)
    assert summary(found, unit="dialogues") == "torch-fast: 4 of 4 dialogues token-identical to the reference"
    with pytest.raises(UsageError, match="LLM mode"):
        run_paths(str(tiny_checkpoint), dialogues, BUDGET, "fp32", "cpu", nemo=True)


def test_fp32_paths_do_not_part(tiny_checkpoint, clips):
    tokens = run_paths(str(tiny_checkpoint), clips, BUDGET, "fp32", "cpu", nemo=False)
    found = explain(str(tiny_checkpoint), clips, tokens, "fp32", "cpu")
    assert [(d.path, d.step) for d in found] == [("torch-fast", None)] * len(clips)
    assert summary(found) == f"torch-fast: {len(clips)} of {len(clips)} clips token-identical to the reference"


def test_a_known_divergence_is_located_and_measured(tiny_checkpoint, clips):
    """A path that takes the runner-up token at step 3, and one that stops (eos) at step 5."""
    reference = TorchBackend(str(tiny_checkpoint), dtype="fp32")
    ref = [t.token_ids for t in reference.transcribe(clips[:1], max_new_tokens=BUDGET)]
    logits = forced_logits(reference, clips[0], ref[0][:3])
    top2 = logits.topk(2)
    runner_up = ref[0][:3] + [int(top2.indices[1])] + ref[0][4:]
    tokens = {"reference": ref, "runner-up": [runner_up], "stopped": [ref[0][:5]]}
    changed, stopped = explain(str(tiny_checkpoint), clips[:1], tokens, "fp32", "cpu")
    assert (changed.step, changed.reference_token, changed.path_token) == (3, ref[0][3], runner_up[3])
    assert changed.fp32_gap == pytest.approx(float(top2.values[0] - top2.values[1])) and changed.fp32_gap > 0
    assert changed.logit_error == 0 and changed.fp32_choice == "reference"  # fp32 against itself: no rounding
    assert (stopped.step, stopped.path_token) == (5, None)
    at_five = forced_logits(reference, clips[0], ref[0][:5])
    assert stopped.fp32_gap == pytest.approx(float(at_five[ref[0][5]] - at_five[reference.tokenizer.eos_id]))
    assert "runner-up: 0 of 1 clips token-identical" in summary([changed, stopped])


def test_bf16_divergences_are_explained(tiny_checkpoint, clips):
    """torch-fast in bf16 (oneDNN-packed bf16 weights on CPUs with bf16 units) against the bf16 reference:
    identical, or parted where the two tokens' fp32 logits are within the bf16 rounding error."""
    tokens = run_paths(str(tiny_checkpoint), clips, BUDGET, "bf16", "cpu", nemo=False)
    found = explain(str(tiny_checkpoint), clips, tokens, "bf16", "cpu")
    assert len(found) == len(clips)
    for d in found:
        if d.step is None:
            assert tokens["torch-fast"][d.clip] == tokens["reference"][d.clip]
            continue
        assert tokens["torch-fast"][d.clip][: d.step] == tokens["reference"][d.clip][: d.step]
        assert d.reference_token != d.path_token
        assert math.isfinite(d.fp32_gap) and d.logit_error > 0 and d.fp32_choice in ("reference", "path", "other")
        assert tie_ratio(d) <= 1, d
    assert summary(found).startswith("torch-fast: ")
