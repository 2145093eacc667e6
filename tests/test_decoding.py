"""The decoding core every path calls: the stop rule and the prompt splicer, on numpy and torch alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from canary_qwen.decoding import TokenStreams, greedy_decode, splice_and_pad, token_budgets, until_eos
from canary_qwen.errors import UsageError

EOS, PAD, PLACEHOLDER = 9, 0, 5


def scripted(rows: list[list[int]]):
    """prefill/step over fixed per-row token scripts, recording what each step was fed."""
    fed: list[list[int]] = []
    step_no = [0]

    def prefill():
        return [r[0] for r in rows]

    def step(tokens):
        fed.append(list(tokens))
        step_no[0] += 1
        return [r[min(step_no[0], len(r) - 1)] for r in rows]

    return prefill, step, fed


def test_rows_stop_at_eos_or_budget_and_ended_rows_are_fed_pad():
    prefill, step, fed = scripted([[1, 2, EOS, 3], [4, 4, 4, 4], [EOS, 7, 7, 7]])
    events = []
    out = greedy_decode(prefill, step, [5, 3, 4], EOS, PAD, on_token=lambda *e: events.append(e))
    assert out == [[1, 2], [4, 4, 4], []]
    # As in Hugging Face generate: a row's eos is fed once (the step it came out), pad from then on.
    assert fed == [[1, 4, EOS], [2, 4, PAD]]
    assert (2, None, True) in events and (1, 4, True) in events and (0, None, True) in events
    assert [e for e in events if e[0] == 0] == [(0, 1, False), (0, 2, False), (0, None, True)]


def test_zero_budget_rows_never_run():
    prefill, step, fed = scripted([[1, 2]])
    assert greedy_decode(prefill, step, [0], EOS, PAD) == [[]] and fed == []
    streams = TokenStreams([0, 2], EOS)
    assert streams.done == [True, False] and not streams.all_done
    assert not streams.push(1, 3) and streams.push(1, 4) and streams.tokens == [[], [3, 4]]


def test_budgets_and_until_eos():
    assert token_budgets(4, 3) == [4, 4, 4] and token_budgets([1, 2], 2) == [1, 2]
    with pytest.raises(UsageError, match="3 token budgets for 2 clips"):
        token_budgets([1, 2, 3], 2)
    assert until_eos([1, 2, EOS, 3], EOS) == [1, 2] and until_eos([1, 2], EOS) == [1, 2]


def test_splice_numpy_and_torch_agree_and_left_pad_with_zeros():
    table = np.arange(40, dtype=np.float32).reshape(10, 4) + 1  # no zero rows: padding is recognisable
    prompts = [[1, 2, PLACEHOLDER, 3], [7, PLACEHOLDER, 8, 9, 4]]
    audio = [np.full((3, 4), -1.0, np.float32), np.full((5, 4), -2.0, np.float32)]
    embeds, mask = splice_and_pad(prompts, audio, table.__getitem__, PLACEHOLDER)
    for i, (prompt, frames) in enumerate(zip(prompts, audio)):
        at = prompt.index(PLACEHOLDER)
        want = np.concatenate((table[prompt[:at]], frames, table[prompt[at + 1 :]]))
        pad = embeds.shape[1] - len(want)
        np.testing.assert_array_equal(embeds[i, pad:], want)
        assert not embeds[i, :pad].any() and mask[i].tolist() == [False] * pad + [True] * len(want)
    weights = torch.from_numpy(table)
    t_embeds, t_mask = splice_and_pad(
        prompts, [torch.from_numpy(a).double() for a in audio], lambda ids: weights[torch.from_numpy(ids)], PLACEHOLDER
    )
    assert t_embeds.dtype == torch.float32  # the audio takes the token embeddings' dtype
    np.testing.assert_array_equal(t_embeds.numpy(), embeds)
    np.testing.assert_array_equal(t_mask, mask)
