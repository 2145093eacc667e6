"""The prompt-table protocol that carries audio frames into a TensorRT-LLM engine (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from canary_qwen.protocol.prompt_table import (
    QWEN3_VOCAB_SIZE,
    PromptTableError,
    build_request,
    check_distinct_extra_ids,
    content_extra_id,
    expand_placeholder,
    extra_ids_for,
    fake_ids,
    resolve_dtype,
    triton_request_inputs,
    validate_request,
)

V = 100  # a small vocabulary: fake ids start at 100
P = 7  # the placeholder id (a text-range id, like 151669 < 151936)
PROMPT = [1, 2, P, 3, 4]


# The tensorrt_llm model's input types in TensorRT-LLM 1.2's template
# (triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt); the table is the model dtype.
TENSORRT_LLM_INPUT_TYPES = {
    "input_ids": np.int32,
    "input_lengths": np.int32,
    "request_output_len": np.int32,
    "end_id": np.int32,
    "pad_id": np.int32,
    "streaming": np.bool_,
    "prompt_embedding_table": None,
    "prompt_vocab_size": np.int32,
    "prompt_table_extra_ids": np.uint64,
}


def frames(t: int, h: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, h)).astype(np.float32)


def requests_for(prompts, embs, extra_ids=None):
    """One request per clip, as the trt backend builds them, checked for extra-id collisions."""
    reqs = [
        build_request(p, e, placeholder_id=P, vocab_size=V, extra_id=None if extra_ids is None else extra_ids[i])
        for i, (p, e) in enumerate(zip(prompts, embs))
    ]
    check_distinct_extra_ids(reqs)
    return reqs


def test_real_model_constants():
    assert QWEN3_VOCAB_SIZE == 151936
    # The real placeholder (len(tokenizer) = 151669) is a text-range id, below the fake ids.
    ids, at = expand_placeholder([151644, 872, 151669, 151645], 151669, 3, QWEN3_VOCAB_SIZE)
    assert ids.tolist() == [151644, 872, 151936, 151937, 151938, 151645] and at == 2


def test_single_request_exact_layout():
    emb = frames(3)
    req = build_request(PROMPT, emb, placeholder_id=P, vocab_size=V, extra_id=42)
    assert req.input_ids.dtype == np.int32
    assert req.input_ids.tolist() == [1, 2, 100, 101, 102, 3, 4]
    assert req.prompt_table_extra_ids.dtype == np.uint64
    assert req.prompt_table_extra_ids.tolist() == [0, 0, 42, 42, 42, 0, 0]
    assert req.prompt_vocab_size == 3 and req.extra_id == 42 and req.audio_offset == 2
    assert req.input_length == 7 and req.hidden_size == 4
    np.testing.assert_array_equal(req.prompt_embedding_table, emb)  # row t is fake id V + t
    assert req.prompt_embedding_table.dtype == np.float32
    # Row lookup as the engine does it: token - vocab_size.
    rows = req.input_ids[req.input_ids >= V] - V
    np.testing.assert_array_equal(req.prompt_embedding_table[rows], emb)
    req.validate(V, hidden_size=4, max_prompt_vocab_size=3, require_extra_ids=True)


def test_placeholder_at_the_ends():
    assert expand_placeholder([P, 5], P, 2, V)[0].tolist() == [100, 101, 5]
    assert expand_placeholder([5, P], P, 1, V)[0].tolist() == [5, 100]
    assert expand_placeholder([P], P, 2, V)[0].tolist() == [100, 101]


def test_default_extra_id_is_a_content_hash():
    a = build_request(PROMPT, frames(3, seed=1), placeholder_id=P, vocab_size=V)
    again = build_request(PROMPT, frames(3, seed=1), placeholder_id=P, vocab_size=V)
    other = build_request(PROMPT, frames(3, seed=2), placeholder_id=P, vocab_size=V)
    assert a.extra_id == again.extra_id  # the same clip may reuse its cached blocks
    assert a.extra_id != other.extra_id  # another clip never does
    assert 1 <= a.extra_id < 2**64
    assert a.prompt_table_extra_ids.tolist() == [0, 0] + [a.extra_id] * 3 + [0, 0]
    # dtype and shape are part of the identity, not only the bytes.
    assert content_extra_id(np.zeros((2, 4), np.float32)) != content_extra_id(np.zeros((4, 2), np.float32))


def test_dtype_cast_float16_and_bfloat16():
    emb = frames(2)
    half = build_request(PROMPT, emb, placeholder_id=P, vocab_size=V, dtype="float16")
    assert half.prompt_embedding_table.dtype == np.float16
    np.testing.assert_array_equal(half.prompt_embedding_table, emb.astype(np.float16))
    bf16 = build_request(PROMPT, emb, placeholder_id=P, vocab_size=V, dtype="bfloat16")
    assert bf16.prompt_embedding_table.dtype.name == "bfloat16"
    assert resolve_dtype("bf16") == bf16.prompt_embedding_table.dtype
    np.testing.assert_allclose(bf16.prompt_embedding_table.astype(np.float32), emb, rtol=1e-2)
    assert bf16.extra_id != half.extra_id
    bf16.validate(V, dtype="bfloat16")
    with pytest.raises(PromptTableError, match="model dtype"):
        bf16.validate(V, dtype="float16")


def test_batch_of_three_lengths():
    embs = [frames(2, seed=1), frames(5, seed=2), frames(1, seed=3)]
    reqs = requests_for([PROMPT] * 3, embs, [11, 12, 13])
    assert [r.input_ids.tolist() for r in reqs] == [
        [1, 2, 100, 101, 3, 4],
        [1, 2, 100, 101, 102, 103, 104, 3, 4],
        [1, 2, 100, 3, 4],
    ]
    assert [r.prompt_table_extra_ids.tolist() for r in reqs] == [
        [0, 0, 11, 11, 0, 0],
        [0, 0, 12, 12, 12, 12, 12, 0, 0],
        [0, 0, 13, 0, 0],
    ]
    assert [r.prompt_vocab_size for r in reqs] == [2, 5, 1]
    for r, e in zip(reqs, embs):
        np.testing.assert_array_equal(r.prompt_embedding_table, e)  # one table per request, no padding


def test_batch_default_ids_distinct_and_per_request_prompts():
    embs = [frames(2, seed=1), frames(2, seed=2), frames(3, seed=3)]
    reqs = requests_for([PROMPT] * 3, embs)
    assert len({r.extra_id for r in reqs}) == 3 and all(r.extra_id >= 1 for r in reqs)
    prompts = [[P, 9], PROMPT, [5, P]]
    reqs = requests_for(prompts, embs, [1, 2, 3])
    assert [r.input_ids.tolist() for r in reqs] == [[100, 101, 9], [1, 2, 100, 101, 3, 4], [5, 100, 101, 102]]
    assert [r.audio_offset for r in reqs] == [0, 2, 1]


def test_batch_refuses_shared_id_for_different_audio():
    embs = [frames(2, seed=1), frames(2, seed=2)]
    with pytest.raises(PromptTableError, match="mix"):
        requests_for([PROMPT] * 2, embs, [5, 5])
    same = requests_for([PROMPT] * 2, [embs[0], embs[0].copy()], [5, 5])
    assert [r.extra_id for r in same] == [5, 5]  # the same audio may share


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([1, 2, 3], "exactly one audio placeholder"),
        ([P, 1, P], "exactly one audio placeholder"),
        ([1, 150, P], "not text tokens"),
        ([-1, P], "not text tokens"),
    ],
)
def test_build_errors_on_prompt(prompt, match):
    with pytest.raises(PromptTableError, match=match):
        build_request(prompt, frames(2), placeholder_id=P, vocab_size=V)


def test_build_errors_on_embeddings_and_ids():
    with pytest.raises(PromptTableError, match=r"\[T, H\]"):
        build_request(PROMPT, np.zeros(4, np.float32), placeholder_id=P, vocab_size=V)
    with pytest.raises(PromptTableError, match="T >= 1"):
        build_request(PROMPT, np.zeros((0, 4), np.float32), placeholder_id=P, vocab_size=V)
    with pytest.raises(PromptTableError, match="uint64 >= 1"):
        build_request(PROMPT, frames(2), placeholder_id=P, vocab_size=V, extra_id=0)
    with pytest.raises(PromptTableError, match="uint64 >= 1"):
        extra_ids_for(np.array([1, 100]), V, 2**64)
    with pytest.raises(PromptTableError, match="int32"):
        fake_ids(2**31 - 2, 5)
    with pytest.raises(PromptTableError, match="unknown table dtype"):
        resolve_dtype("int8x")


def _valid():
    r = build_request(PROMPT, frames(3), placeholder_id=P, vocab_size=V, extra_id=9)
    return r.input_ids, r.prompt_embedding_table, r.prompt_vocab_size, r.prompt_table_extra_ids


def test_validate_accepts_triton_shapes():
    ids, table, n, extra = _valid()
    validate_request(ids, table[None], n, extra[None], vocab_size=V, hidden_size=4)  # [1, T, H], [1, L]


def test_validate_fake_ids_out_of_range():
    ids, table, n, extra = _valid()
    bad = ids.copy()
    bad[4] = V + 3  # the table serves 100..102
    with pytest.raises(PromptTableError, match=r"fake ids \[103\] at positions \[4\] are out of range"):
        validate_request(bad, table, n, extra, vocab_size=V)
    with pytest.raises(PromptTableError, match="negative"):
        validate_request(np.array([-1, 100], np.int32), table, n, None, vocab_size=V)


def test_validate_rows_vs_prompt_vocab_size():
    ids, table, n, extra = _valid()
    with pytest.raises(PromptTableError, match="3 rows but prompt_vocab_size is 4"):
        validate_request(ids, table, 4, extra, vocab_size=V)
    with pytest.raises(PromptTableError, match="3 rows but prompt_vocab_size is 2"):
        validate_request(ids, table, 2, extra, vocab_size=V)


def test_validate_hidden_size_and_limits():
    ids, table, n, extra = _valid()
    with pytest.raises(PromptTableError, match="4 values, the model's hidden size is 2048"):
        validate_request(ids, table, n, extra, vocab_size=V, hidden_size=2048)
    with pytest.raises(PromptTableError, match="per-request limit of 2"):
        validate_request(ids, table, n, extra, vocab_size=V, max_prompt_vocab_size=2)
    with pytest.raises(PromptTableError, match=r"must be \[T, H\]"):
        validate_request(ids, table[None, None], n, extra, vocab_size=V)


def test_validate_extra_ids():
    ids, table, n, extra = _valid()
    with pytest.raises(PromptTableError, match="one extra id per input token"):
        validate_request(ids, table, n, extra[:-1], vocab_size=V)
    zeroed = extra.copy()
    zeroed[3] = 0
    with pytest.raises(PromptTableError, match=r"positions \[3\] have extra id 0"):
        validate_request(ids, table, n, zeroed, vocab_size=V)
    with pytest.raises(PromptTableError, match="non-negative"):
        validate_request(ids, table, n, extra.astype(np.int64) * -1, vocab_size=V)
    with pytest.raises(PromptTableError, match="KV-cache reuse"):
        validate_request(ids, table, n, None, vocab_size=V, require_extra_ids=True)
    validate_request(ids, table, n, None, vocab_size=V)  # fine without reuse


def test_triton_request_inputs():
    req = build_request(PROMPT, frames(3), placeholder_id=P, vocab_size=V, dtype="float16", extra_id=9)
    inputs = triton_request_inputs(req, max_new_tokens=128, end_id=151645, pad_id=151643, streaming=True)
    assert set(inputs) == set(TENSORRT_LLM_INPUT_TYPES)
    assert inputs["input_ids"].tolist() == [[1, 2, 100, 101, 102, 3, 4]]
    assert inputs["input_lengths"].tolist() == [[7]] and inputs["request_output_len"].tolist() == [[128]]
    assert inputs["end_id"].tolist() == [[151645]] and inputs["pad_id"].tolist() == [[151643]]
    assert inputs["streaming"].tolist() == [[True]]
    assert inputs["prompt_embedding_table"].shape == (1, 3, 4) and inputs["prompt_embedding_table"].dtype == np.float16
    assert inputs["prompt_vocab_size"].tolist() == [[3]]
    assert inputs["prompt_table_extra_ids"].tolist() == [[0, 0, 9, 9, 9, 0, 0]]
    for name, dtype in TENSORRT_LLM_INPUT_TYPES.items():
        if dtype is not None:
            assert inputs[name].dtype == dtype, name
    assert "streaming" not in triton_request_inputs(req, max_new_tokens=1, end_id=0, pad_id=0)
