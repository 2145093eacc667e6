"""LLM mode (the speech LoRA off, text-only dialogues) against NeMo 3.0 itself, as the model card runs it:
``with model.llm.disable_adapter(): model.generate(prompts=[turns])``. The torch reference and torch-fast fp32 give
NeMo's greedy ids for a question, a question about a clip (its transcript from ASR mode), and a dialogue with a
system turn; ``ask --json`` prints them."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from conftest import dialogue_cases
from nemo_ref import load_nemo, nemo_answer, nemo_dialogue_ids, nemo_generate

from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.errors import InputError
from canary_qwen.model.prompt import Turn, about, dialogue_ids

pytestmark = pytest.mark.nemo
BUDGET = 20
CASES = dialogue_cases()


def nemo_turns(turns: list[Turn]) -> list[dict]:
    return [asdict(t) for t in turns]


@pytest.fixture(scope="module")
def nemo(tiny_checkpoint):
    """NeMo on the tiny checkpoint; system turns need the ``qwen3`` formatter (``qwen``, the checkpoint's, has
    user and assistant only; for inference the two write user and assistant turns alike: checked below)."""
    model = load_nemo(tiny_checkpoint)
    model.cfg.prompt_format = "qwen3"
    return model


@pytest.fixture(scope="module", params=["torch", "torch-fast"])
def ours(request, tiny_checkpoint):
    backend = TorchBackend if request.param == "torch" else FastTorchBackend
    return backend(str(tiny_checkpoint), dtype="fp32")


@pytest.mark.parametrize("case", list(CASES))
def test_dialogue_ids_are_nemos(nemo, ours, case):
    turns = nemo_turns(CASES[case])
    assert dialogue_ids(ours.tokenizer, CASES[case]) == nemo_dialogue_ids(nemo, turns)
    if case == "question":  # the checkpoint's own format writes a user turn the same way
        assert nemo_dialogue_ids(nemo, turns, "qwen") == nemo_dialogue_ids(nemo, turns)


def test_nemos_qwen_format_has_no_system_turn(nemo):
    """Why system turns follow ``qwen3``: the checkpoint's ``qwen`` formatter refuses them."""
    with pytest.raises(AssertionError, match="available roles"):
        nemo_dialogue_ids(nemo, nemo_turns(CASES["system-two-turns"]), "qwen")


@pytest.mark.parametrize("case", list(CASES))
def test_answers_are_nemos_llm_mode(nemo, ours, case):
    want = nemo_answer(nemo, nemo_turns(CASES[case]), BUDGET)
    (got,) = ours.answer([CASES[case]], max_new_tokens=BUDGET)
    assert got.token_ids == want


def test_a_question_about_a_clip_is_nemos(nemo, ours, clips):
    """The model card's flow: the transcript from ASR mode (LoRA on), then the question and transcript in LLM mode."""
    (heard_ids,) = nemo_generate(nemo, clips[2:3], BUDGET)
    transcript = nemo.tokenizer.ids_to_text(heard_ids).strip()
    (heard,) = ours.transcribe(clips[2:3], max_new_tokens=BUDGET)
    assert heard.token_ids == heard_ids and heard.text == transcript
    turns = [Turn("user", about("Summarise this:", transcript))]
    want = nemo_answer(nemo, nemo_turns(turns), BUDGET)
    assert ours.answer([turns], max_new_tokens=BUDGET)[0].token_ids == want


def test_several_dialogues_in_one_call_answer_as_alone(ours):
    """Left-padded (torch) or batched continuously (torch-fast): each dialogue gets the tokens it gets alone."""
    dialogues = list(CASES.values())
    alone = [ours.answer([d], max_new_tokens=BUDGET)[0].token_ids for d in dialogues]
    assert [a.token_ids for a in ours.answer(dialogues, max_new_tokens=BUDGET)] == alone


def test_llm_mode_leaves_the_adapter_out(ours, nemo):
    """Not degenerate: the same question with the adapter on (NeMo's generate outside disable_adapter) differs."""
    import copy

    turns = nemo_turns(CASES["question"])
    prompt = nemo_dialogue_ids(nemo, turns)
    (row,) = nemo.generate(prompts=[copy.deepcopy(turns)], max_new_tokens=BUDGET).tolist()
    assert row[len(prompt) :][:BUDGET] != ours.answer([CASES["question"]], max_new_tokens=BUDGET)[0].token_ids


@pytest.mark.parametrize(
    "turns, match",
    [
        ([], "no turns"),
        ([Turn("user", "hi"), Turn("assistant", "hello")], "must end with a user turn"),
        ([Turn("robot", "hi")], "unknown role"),
        ([Turn("user", "what is <|audioplaceholder|>?")], "audio placeholder"),
    ],
)
def test_bad_dialogues_are_refused(ours, turns, match):
    with pytest.raises(InputError, match=match):
        ours.answer([turns], max_new_tokens=4)


def test_ask_json_prints_nemos_ids(nemo, tiny_checkpoint, clip_files, clips, capsys):
    """`ask --about FILE --system TEXT --json` (default backend torch-fast): NeMo's ids for the same dialogue."""
    from canary_qwen.cli import main

    question, system = "Summarise this:", "Be brief."
    argv = ["ask", "--model", str(tiny_checkpoint), "--about", clip_files[2], "--system", system, "--json"]
    assert main([*argv, "--max-new-tokens", str(BUDGET), question]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    transcript = nemo.tokenizer.ids_to_text(nemo_generate(nemo, clips[2:3], 128)[0]).strip()
    turns = [Turn("system", system), Turn("user", about(question, transcript))]
    want = nemo_answer(nemo, nemo_turns(turns), BUDGET)
    assert row == {"text": nemo.tokenizer.ids_to_text(want).strip(), "token_ids": want, "transcript": transcript}
