"""torch-fast on a CPU gives a sequence the same logits, bit for bit, whichever sequences share its prefill or
decode batch: a served request's answer (its batch set by arrival order) is then the local one. Bitwise, because
at a near-tie (random weights have many) any last-bit difference turns into another token."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from canary_qwen.backends.cpu_linear import Int8Linear
from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.engines.base import EngineRequest
from canary_qwen.model.prompt import prompt_ids

DTYPES = [
    "fp32",
    "bf16",
    pytest.param("int8", marks=pytest.mark.skipif(not Int8Linear.available(), reason="no oneDNN int8 matmul here")),
]


@pytest.fixture(scope="module", params=DTYPES)
def backend(request, tiny_checkpoint):
    return FastTorchBackend(str(tiny_checkpoint), dtype=request.param)


@pytest.fixture(scope="module")
def rows(backend, clips):
    """The clips' spliced prompts, lengths all different."""
    ids = prompt_ids(backend.tokenizer, None)
    with torch.inference_mode():
        spliced = [backend.splice(ids, frames) for frames in backend.encode(clips)]
    assert len({r.shape[0] for r in spliced}) == len(spliced)
    return spliced


def prefill(backend, rows, which: list[int], max_len: int):
    cache = backend.forward.cache(len(which), max_len)
    with torch.inference_mode():
        logits = backend.forward.prefill(cache, list(range(len(which))), [rows[i] for i in which])
    return logits, cache


def test_prefill_logits_do_not_depend_on_the_sequences_prefilled_with_it(backend, rows):
    max_len = max(r.shape[0] for r in rows) + 8
    alone = [prefill(backend, rows, [i], max_len)[0][0] for i in range(len(rows))]
    together, _ = prefill(backend, rows, list(range(len(rows))), max_len)
    reordered, _ = prefill(backend, rows, list(reversed(range(len(rows)))), max_len)
    for i in range(len(rows)):
        assert torch.equal(together[i], alone[i]), f"clip {i}"
        assert torch.equal(reordered[len(rows) - 1 - i], alone[i]), f"clip {i} (reversed batch)"


def test_decode_logits_do_not_depend_on_the_other_slots(backend, rows):
    """Slot 0 (the shortest clip) decodes one token alone, next to a longer running sequence, and next
    to an idle slot: the longer one sets how far a batched attention would reach."""
    shortest = min(range(len(rows)), key=lambda i: rows[i].shape[0])
    longest = max(range(len(rows)), key=lambda i: rows[i].shape[0])
    max_len = rows[longest].shape[0] + 8
    n = rows[shortest].shape[0]
    with torch.inference_mode():
        logits, cache = prefill(backend, rows, [shortest], max_len)
        alone = backend.forward.decode(cache, logits.argmax(-1), torch.ones(1, dtype=torch.long), [n])[0]
        logits, cache = prefill(backend, rows, [shortest, longest], max_len)
        lengths = [n, rows[longest].shape[0]]
        pair = backend.forward.decode(copy.deepcopy(cache), logits.argmax(-1), torch.ones(2, dtype=torch.long), lengths)
        idle = backend.forward.decode(cache, logits.argmax(-1), torch.tensor([1, 0]), [n, 0])
    assert torch.equal(pair[0], alone)
    assert torch.equal(idle[0], alone)


def test_random_arrival_groups_give_the_tokens_of_one_transcribe_call(backend, clips):
    """The engine fed the clips one to three at a time between steps, in three random orders."""
    budgets = [12, 0, 9, 16]
    local = [t.token_ids for t in backend.transcribe(clips, max_new_tokens=budgets)]
    ids = prompt_ids(backend.tokenizer, None)
    for seed in range(3):
        rnd = random.Random(seed)
        waiting = [i for i in range(len(clips)) if budgets[i]]
        rnd.shuffle(waiting)
        engine = backend.engine(slots=len(clips), max_len=256)
        got: dict[int, list[int]] = {i: [] for i in waiting}
        while waiting or engine.busy:
            if waiting and (not engine.busy or rnd.random() < 0.5):
                size = rnd.randint(1, 3)
                group, waiting = waiting[:size], waiting[size:]
                sources = [np.asarray(clips[i], dtype=np.float32) for i in group]
                engine.admit([EngineRequest(str(i), ids, a, budgets[i]) for i, a in zip(group, sources)])
            for request_id, new, _ in engine.step():
                got[int(request_id)].extend(new)
        engine.close()
        assert {i: got.get(i, []) for i in range(len(clips))} == dict(enumerate(local)), f"seed {seed}"
