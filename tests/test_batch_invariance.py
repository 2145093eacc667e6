"""torch-fast on a CPU gives a sequence the same logits, bit for bit, whichever sequences share its prefill or
decode batch, in either mode: a served request's answer (its batch set by arrival order, transcriptions and LLM-mode
answers mixed) is then the local one. Bitwise, because at a near-tie (random weights have many) any last-bit
difference turns into another token."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from canary_qwen.backends.cpu_linear import Int8Linear, cpu_has_bf16_units
from canary_qwen.backends.fast_layers import LORA_MIN_ROWS, DenseLinear
from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.engines.base import EngineRequest
from canary_qwen.model.prompt import Turn, dialogue_ids, prompt_ids

DTYPES = [
    "fp32",
    "bf16",
    pytest.param("int8", marks=pytest.mark.skipif(not Int8Linear.available(), reason="no oneDNN int8 matmul here")),
]


@pytest.fixture(scope="module", params=DTYPES)
def backend(request, tiny_checkpoint):
    return FastTorchBackend(str(tiny_checkpoint), dtype=request.param)


QUESTIONS = ["Summarise this call, please.", "What was said about the budget for the next year?"]


def dialogue(question: str) -> list[Turn]:
    return [Turn("user", question)]


@pytest.fixture(scope="module")
def rows(backend, clips):
    """The clips' spliced prompts (ASR rows) then the questions' (LLM rows), lengths all different, and whether each
    runs through the LoRA."""
    ids = prompt_ids(backend.tokenizer, None)
    with torch.inference_mode():
        spliced = [backend.splice(ids, frames) for frames in backend.encode(clips)]
        text = [backend.embed(dialogue_ids(backend.tokenizer, dialogue(q))) for q in QUESTIONS]
    assert len({r.shape[0] for r in spliced + text}) == len(spliced + text)
    return spliced + text, [True] * len(spliced) + [False] * len(text)


def prefill(backend, rows, which: list[int], max_len: int):
    prompts, adapter = rows
    cache = backend.forward.cache(len(which), max_len)
    with torch.inference_mode():
        logits = backend.forward.prefill(
            cache, list(range(len(which))), [prompts[i] for i in which], [adapter[i] for i in which]
        )
    return logits, cache


def test_the_adapter_changes_a_row(backend, rows):
    """Not degenerate: a clip's prompt without the LoRA gives other logits (so the flag reaches the layers)."""
    prompts, _ = rows
    cache = backend.forward.cache(1, prompts[0].shape[0])
    with torch.inference_mode():
        on = backend.forward.prefill(cache, [0], [prompts[0]], [True])
        off = backend.forward.prefill(cache, [0], [prompts[0]], [False])
    assert not torch.equal(on, off)


def test_prefill_logits_do_not_depend_on_the_sequences_prefilled_with_it(backend, rows):
    """Clips and questions prefilled alone, all together, and in reverse order."""
    if backend.dtype == "bf16" and not cpu_has_bf16_units():
        # Measured here (2 threads, no AVX512-BF16): PyTorch's emulated bf16 matmul splits the rows between threads
        # by the row count, and a few rows of a 100-row product (1 of 100, 1 of 199) round otherwise than alone;
        # with one thread none do. Prefill packs every prompt's tokens, so its rows vary with the batch.
        pytest.skip("bf16 on a CPU without bf16 units: the emulated matmul's rows depend on the batch's row count")
    n = len(rows[0])
    max_len = max(r.shape[0] for r in rows[0]) + 8
    alone = [prefill(backend, rows, [i], max_len)[0][0] for i in range(n)]
    together, _ = prefill(backend, rows, list(range(n)), max_len)
    reordered, _ = prefill(backend, rows, list(reversed(range(n))), max_len)
    for i in range(n):
        assert torch.equal(together[i], alone[i]), f"row {i}"
        assert torch.equal(reordered[n - 1 - i], alone[i]), f"row {i} (reversed batch)"


@pytest.mark.parametrize("mode", ["asr", "llm"])
def test_decode_logits_do_not_depend_on_the_other_slots(backend, rows, mode):
    """Slot 0 (the shortest clip, or a question) decodes one token alone, next to the longest row of the other mode
    running, and next to an idle slot: the longer one sets how far a batched attention would reach."""
    prompts, adapter = rows
    mine = [i for i in range(len(prompts)) if adapter[i] == (mode == "asr")]
    others = [i for i in range(len(prompts)) if i not in mine]
    first = min(mine, key=lambda i: prompts[i].shape[0])
    longest = max(others, key=lambda i: prompts[i].shape[0])
    max_len = max(prompts[first].shape[0], prompts[longest].shape[0]) + 8
    n = prompts[first].shape[0]
    forward = backend.forward
    with torch.inference_mode():
        logits, cache = prefill(backend, rows, [first], max_len)
        on = forward.adapter_rows([adapter[first]])
        alone = forward.decode(cache, [0], logits.argmax(-1), on, [n])[0]
        logits, cache = prefill(backend, rows, [first, longest], max_len)
        on = forward.adapter_rows([adapter[first], adapter[longest]])
        lengths = [n, prompts[longest].shape[0]]
        pair = forward.decode(copy.deepcopy(cache), [0, 1], logits.argmax(-1), on, lengths)
        idle = forward.decode(cache, [0], logits.argmax(-1)[:1], on[:1], [n])  # slot 1 left idle
    assert torch.equal(pair[0], alone)
    assert torch.equal(idle[0], alone)


def test_random_arrival_groups_give_the_tokens_of_one_call_per_mode(backend, clips):
    """The engine fed clips and questions mixed, one to three at a time between steps, in three random orders: each
    gets the tokens of one ``transcribe`` call of the clips, or one ``answer`` call of the questions."""
    budgets = [12, 0, 9, 16]
    answer_budgets = [14, 10]
    want = [t.token_ids for t in backend.transcribe(clips, max_new_tokens=budgets)]
    want += [t.token_ids for t in backend.answer([dialogue(q) for q in QUESTIONS], max_new_tokens=answer_budgets)]
    tok = backend.tokenizer
    requests = [(prompt_ids(tok, None), np.asarray(c, dtype=np.float32), b) for c, b in zip(clips, budgets)]
    requests += [(dialogue_ids(tok, dialogue(q)), None, b) for q, b in zip(QUESTIONS, answer_budgets)]
    for seed in range(3):
        rnd = random.Random(seed)
        waiting = [i for i in range(len(requests)) if requests[i][2]]
        rnd.shuffle(waiting)
        engine = backend.engine(slots=len(requests), max_len=256)
        got: dict[int, list[int]] = {i: [] for i in waiting}
        while waiting or engine.busy:
            if waiting and (not engine.busy or rnd.random() < 0.5):
                size = rnd.randint(1, 3)
                group, waiting = waiting[:size], waiting[size:]
                engine.admit([EngineRequest(str(i), *requests[i]) for i in group])
            for request_id, new, _ in engine.step():
                got[int(request_id)].extend(new)
        engine.close()
        assert {i: got.get(i, []) for i in range(len(requests))} == dict(enumerate(want)), f"seed {seed}"


@pytest.mark.parametrize("shape", [(256, 2048), (2048, 128), (1024, 128)])
def test_lora_rows_get_the_same_bits_whatever_their_count(shape):
    """The full-size LoRA's matrices (A of q and v stacked: 2048 -> 256; B: 128 -> 2048 and 1024) on 1 to 40 rows:
    each row gets the bits it gets among 40. MKL's sgemm sums 1-15 rows otherwise than 16 and more on some CPUs
    (an Intel Xeon here), which made 2 of 16 served int8 answers differ from local ones at full size."""
    torch.manual_seed(0)
    lora = DenseLinear(torch.randn(*shape) * 0.02, min_rows=LORA_MIN_ROWS)
    x = torch.randn(40, shape[1])
    with torch.inference_mode():
        among = lora(x)
        for rows in range(1, 41):
            assert torch.equal(lora(x[:rows]), among[:rows]), f"{rows} rows"
