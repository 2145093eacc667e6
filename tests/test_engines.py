"""The in-process engines behind the engine flavours and the OpenAI server's local mode: torch-fast's scheduler
and ONNX Runtime in batches, each driven by an EngineLoop the way the servers drive them (threads submitting,
sinks receiving), against the reference's tokens."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_clip

from canary_qwen.backends.engines import open_engine, positions_for
from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.engines import EngineLoop
from canary_qwen.errors import InputError, Overloaded, UsageError
from canary_qwen.model.prompt import prompt_ids

BUDGETS = (0, 1, 3, 7, 20, 20, 5, 12)
MAX_AUDIO_S = 6.0
LIMIT = 600


class Collect:
    """A sink that keeps what it is sent; ``stop_after``: it reports its caller gone after that many tokens."""

    def __init__(self, stop_after: int | None = None):
        self.ids: list[int] = []
        self.error: Exception | None = None
        self.calls_after_end = 0
        self.stop_after = stop_after
        self.done = threading.Event()
        self.finished_at: float | None = None

    def send(self, ids, finished):
        if self.done.is_set():
            self.calls_after_end += 1
        self.ids.extend(ids)
        if finished:
            self.finished_at = time.monotonic()
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def cancelled(self):
        return self.stop_after is not None and len(self.ids) >= self.stop_after


@pytest.fixture(scope="module")
def clips():
    return [make_clip(0.4 + 0.6 * i, 300 + i) for i in range(len(BUDGETS))]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clips):
    return TorchBackend(str(tiny_checkpoint)).transcribe(clips, max_new_tokens=list(BUDGETS))


@pytest.fixture(scope="module")
def fast_loop(tiny_checkpoint):
    # LLM-mode bounds small enough that a row is sized by the longest clip and budget (the refusal test needs that)
    llm = dict(max_answer_tokens=16, max_answer_tokens_limit=16, max_prompt_tokens=32)
    bounds = RequestBounds(max_audio_s=MAX_AUDIO_S, max_new_tokens_limit=LIMIT, **llm)
    loop = EngineLoop(
        lambda: open_engine("torch-fast", str(tiny_checkpoint), max_batch=4, bounds=bounds),
        name="torch-fast",
        max_pending=12,
    )
    yield loop
    loop.close()


def _submit_all(loop, clips, budgets):
    ids = prompt_ids(loop.tokenizer, None)
    sinks = [Collect() for _ in clips]
    with ThreadPoolExecutor(len(clips)) as pool:  # submitted from many threads at once, as a server does
        list(pool.map(lambda i: loop.submit(ids, clips[i], budgets[i], sinks[i]), range(len(clips))))
    for s in sinks:
        assert s.done.wait(60)
    return sinks


def test_torch_fast_engine_gives_the_reference_tokens_with_more_requests_than_slots(fast_loop, clips, reference):
    """8 requests over 4 slots, budgets 0 to 20: each its reference tokens, nothing sent after the last piece."""
    sinks = _submit_all(fast_loop, clips, BUDGETS)
    assert [s.ids for s in sinks] == [r.token_ids for r in reference]
    assert all(s.error is None and s.calls_after_end == 0 for s in sinks)
    assert fast_loop.pending == 0


def test_a_request_that_arrives_while_others_decode_joins_them(fast_loop, clips):
    """A short request sent while a 400-token decode runs finishes long before it: it joined the running batch."""
    ids = prompt_ids(fast_loop.tokenizer, None)
    long, short = Collect(), Collect()
    fast_loop.submit(ids, clips[3], 400, long)
    deadline = time.monotonic() + 30
    while len(long.ids) < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    fast_loop.submit(ids, clips[2], 3, short)
    assert short.done.wait(30) and long.done.wait(60)
    assert len(long.ids) == 400  # the tiny checkpoint never emits eos on these clips
    assert short.finished_at < long.finished_at and len(short.ids) == 3


def test_a_cancelled_request_stops_decoding_and_frees_its_slot(fast_loop, clips):
    ids = prompt_ids(fast_loop.tokenizer, None)
    gone = [Collect(stop_after=5) for _ in range(4)]  # every slot taken by a caller that leaves after 5 tokens
    for sink in gone:
        fast_loop.submit(ids, clips[4], LIMIT - 100, sink)
    deadline = time.monotonic() + 30
    while fast_loop.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fast_loop.pending == 0 and not fast_loop.engine.busy  # no slot still decodes for a caller that left
    assert all(5 <= len(s.ids) < 20 for s in gone)
    assert _submit_all(fast_loop, clips[:1], [3])[0].ids  # the engine serves on


def test_refusals_leave_the_other_requests_untouched(fast_loop, clips, reference):
    ids = prompt_ids(fast_loop.tokenizer, None)
    too_long, good = Collect(), Collect()
    wordy = prompt_ids(fast_loop.tokenizer, "Transcribe the following recording word for word. " * 10)
    assert len(wordy) > 64  # more text than the cache keeps room for beside the longest clip and budget
    fast_loop.submit(wordy, make_clip(MAX_AUDIO_S, 9), LIMIT, too_long)
    fast_loop.submit(ids, clips[5], BUDGETS[5], good)
    assert too_long.done.wait(30) and good.done.wait(30)
    assert isinstance(too_long.error, InputError)  # handed over as the exception, not as its text
    assert "positions" in str(too_long.error) and "fewer tokens" in str(too_long.error)
    assert good.ids == reference[5].token_ids
    with pytest.raises(InputError, match=">= 0"):
        fast_loop.submit(ids, clips[0], -1, Collect())


def test_llm_mode_rows_share_the_loop_with_clips(fast_loop, clips, reference, tiny_checkpoint):
    """A text-only dialogue (source None: LLM mode) submitted among clips gets the local ``answer``'s tokens, and the
    clips their transcriptions."""
    from canary_qwen.backends.fast_torch import FastTorchBackend
    from canary_qwen.model.prompt import Turn, dialogue_ids

    turns = [Turn("user", "Summarise the call.")]
    want = FastTorchBackend(str(tiny_checkpoint)).answer([turns], max_new_tokens=12)[0].token_ids
    ids = prompt_ids(fast_loop.tokenizer, None)
    answer, heard = Collect(), [Collect() for _ in clips[:3]]
    fast_loop.submit(ids, clips[0], BUDGETS[0], heard[0])
    fast_loop.submit(dialogue_ids(fast_loop.tokenizer, turns), None, 12, answer)
    for clip, budget, sink in zip(clips[1:3], BUDGETS[1:3], heard[1:]):
        fast_loop.submit(ids, clip, budget, sink)
    assert answer.done.wait(60) and all(h.done.wait(60) for h in heard)
    assert answer.error is None and answer.ids == want
    assert [h.ids for h in heard] == [r.token_ids for r in reference[:3]]


def test_a_full_loop_refuses_at_once(tiny_checkpoint, clips):
    bounds = RequestBounds(max_audio_s=2, max_new_tokens_limit=LIMIT)
    loop = EngineLoop(
        lambda: open_engine("torch-fast", str(tiny_checkpoint), max_batch=1, bounds=bounds),
        name="one slot",
        max_pending=2,
    )
    try:
        ids, held = prompt_ids(loop.tokenizer, None), [Collect(stop_after=50), Collect(stop_after=50)]
        for sink in held:
            loop.submit(ids, clips[0], LIMIT - 100, sink)
        with pytest.raises(Overloaded, match="already holds 2 requests"):
            loop.submit(ids, clips[0], 3, Collect())
        deadline = time.monotonic() + 30
        while loop.pending and time.monotonic() < deadline:  # both callers leave after 50 tokens
            time.sleep(0.01)
        assert loop.pending == 0
        assert _submit_all(loop, clips[:1], [2])[0].ids  # room again
    finally:
        loop.close()


def test_onnx_engine_in_batches_gives_the_reference_tokens(tiny_export, clips, reference):
    loop = EngineLoop(lambda: open_engine("onnx", str(tiny_export), max_batch=3), name="onnx")
    try:
        sinks = _submit_all(loop, clips, BUDGETS)
    finally:
        loop.close()
    assert [s.ids for s in sinks] == [r.token_ids for r in reference]


def test_a_served_onnx_engine_runs_without_the_cpu_arena_and_a_local_backend_with_it(tiny_export):
    """The arena only grows under a server's varied batch shapes (docs/deployment.md, the soak); one-shot runs
    keep it for its speed."""
    served = open_engine("onnx", str(tiny_export)).backend
    local = OnnxBackend(tiny_export)
    for backend, arena in ((served, False), (local, True)):
        for session in (backend.encoder.session, backend.decoder.session):
            assert session.get_session_options().enable_cpu_mem_arena is arena


def test_engine_sizes_and_choices_are_checked(tiny_export):
    assert positions_for(40.0, 512) == 500 + 64 + 512  # 40 s are 500 encoder frames (80 ms each)
    with pytest.raises(UsageError, match="no in-process engine 'trt'"):
        open_engine("trt", str(tiny_export))
    with pytest.raises(UsageError, match="onnx runs in its export's precision"):
        open_engine("onnx", str(tiny_export), dtype="bf16")


def test_on_a_cpu_a_clips_frames_do_not_depend_on_the_clips_beside_it(tiny_checkpoint):
    """What makes served answers the local ones: an engine admits clips in whatever groups they arrive, and on
    a CPU each clip's frames come out bit for bit the same in any group (padded batches differ by a few ulps,
    which int8 turns into other tokens at near-ties)."""
    import torch

    from canary_qwen.backends.fast_torch import FastTorchBackend

    fast = FastTorchBackend(str(tiny_checkpoint), dtype="fp32")
    near = [make_clip(s, 40 + i) for i, s in enumerate((2.0, 2.1, 2.2, 2.3))]  # one length bucket: padded together
    alone = [fast.encode([c])[0] for c in near]
    together = fast.encode(near)
    assert all(torch.equal(a, t) for a, t in zip(alone, together))


def test_the_engine_is_made_on_the_thread_that_steps_it(tiny_checkpoint):
    """A second OpenMP team (one engine loaded on one thread, stepped on another) slows every parallel region on a
    small CPU (engines/loop.py): the loop makes its engine itself, and says why when it cannot."""
    made_on = []

    def make():
        made_on.append(threading.current_thread())
        return open_engine("torch-fast", str(tiny_checkpoint), max_batch=1)

    loop = EngineLoop(make, name="own thread")
    try:
        assert [t.name for t in made_on] == ["own thread"] and made_on[0] is not threading.current_thread()
    finally:
        loop.close()
    with pytest.raises(UsageError, match="max_batch"):
        EngineLoop(lambda: open_engine("torch-fast", str(tiny_checkpoint), max_batch=0), name="refused")
