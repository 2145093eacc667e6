"""The torch-fast flavour on the REAL bundled Triton: the fast path in one engine model, serving concurrent
clients (non-streaming and streaming) with the reference's tokens, requests joining the running batch,
cancelled streams freeing their slots, refusals, and a model that cannot load failing `serve` at start."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import (
    make_clip,
    needs_server,
    perf_analyzer,
    plain_infer,
    read_bounds,
    running_server,
    stream_counts,
    wait_for_counts,
)

from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.cli import main
from canary_qwen.client.errors import InferenceError, ServerBusyError
from canary_qwen.client.triton import TritonClient
from canary_qwen.errors import UsageError
from canary_qwen.serving.config_check import check_ensemble, parse_model_config
from canary_qwen.serving.engine_flavor import generate_engine_repo

pytestmark = pytest.mark.triton
SLOTS = 4
BUDGET = 20
TOKEN_LIMIT = 2000  # long decodes make joining and cancellation measurable (the tiny checkpoint never stops early)
MAX_AUDIO_S = 8.0
CLIENTS = 16


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory):
    return generate_engine_repo(
        "torch-fast",
        tiny_checkpoint,
        tmp_path_factory.mktemp("tfast") / "repo",
        max_batch=SLOTS,
        bounds=RequestBounds(
            max_audio_s=MAX_AUDIO_S,
            max_new_tokens=BUDGET,
            max_new_tokens_limit=TOKEN_LIMIT,
            max_queue=32,
            queue_timeout_s=30,
        ),
    )


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, repo.parent / "server") as s:
        yield s
        assert s.stop() == 0  # in time: every request below was closed, cancelled ones too


@pytest.fixture(scope="module")
def clips():
    return [make_clip(0.4 + 0.45 * i, 700 + i) for i in range(8)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return TorchBackend(str(tiny_checkpoint))


def test_repository_is_one_engine_model_streaming_and_a_unary_model_over_it(repo, tiny_checkpoint, tmp_path, capsys):
    assert check_ensemble(repo) == []
    engine = parse_model_config(repo / "canary_qwen_stream" / "config.pbtxt")  # the engine, streaming
    assert engine.model_transaction_policy.decoupled
    assert engine.parameters["engine"].string_value == "torch-fast"
    assert engine.max_batch_size == SLOTS
    # No dynamic batcher: requests reach the engine as they come; the engine and the unary model bound what they hold
    assert not engine.HasField("dynamic_batching")
    assert engine.parameters["max_pending"].string_value == str(SLOTS + 32)
    assert read_bounds(repo / "canary_qwen_stream").max_audio_s == MAX_AUDIO_S
    unary = parse_model_config(repo / "canary_qwen" / "config.pbtxt")  # standard clients' entry: not decoupled
    assert unary.backend == "python" and not unary.model_transaction_policy.decoupled
    assert unary.parameters["engine_model"].string_value == "canary_qwen_stream"
    assert not unary.HasField("dynamic_batching") and unary.parameters["max_pending"].string_value == str(SLOTS + 32)
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["canary_qwen", "canary_qwen_stream"]
    # The checkpoint is linked in NeMo's offline layout: no hub access at load.
    held = repo / "canary_qwen_stream" / "1" / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llm_backbone/config.json"):
        assert (held / name).is_file(), name
    assert (held / "model.safetensors").stat().st_ino == (tiny_checkpoint / "model.safetensors").stat().st_ino
    with pytest.raises(UsageError, match="does not run in 'int4'"):
        generate_engine_repo("torch-fast", tiny_checkpoint, tmp_path / "bad", dtype="int4")
    args = ["triton-repo", "--flavor", "torch-fast", "--artifacts", str(tiny_checkpoint), "--out", str(tmp_path)]
    assert main(args) == 2
    assert "torch-fast takes --model CHECKPOINT" in capsys.readouterr().err


@needs_server
def test_served_tokens_equal_the_reference_for_mixed_lengths_and_budgets(server, clips, reference):
    budgets = [0, 1, 2, 5, 9, 20, 33, 64]
    want = reference.transcribe(clips, max_new_tokens=budgets)
    with TritonClient(server.grpc_url, "grpc", timeout_s=60) as client:
        got = [client.infer(c, max_new_tokens=b, with_ids=True) for c, b in zip(clips, budgets)]
    assert [ids for _, ids in got] == [w.token_ids for w in want]
    assert [text for text, _ in got] == [w.text for w in want]


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_standard_unary_inference_gets_the_reference_tokens(server, clips, reference, protocol):
    """tritonclient's plain infer (HTTP /v2/models/canary_qwen/infer, gRPC ModelInfer), as any Triton user sends
    it, concurrent requests of different lengths batched together, each with the reference's ids."""
    url = server.http_url if protocol == "http" else server.grpc_url
    want = reference.transcribe(clips[:4], max_new_tokens=BUDGET)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda clip: plain_infer(url, protocol, clip), clips[:4]))
    assert got == [(w.text, w.token_ids) for w in want]


@needs_server
@pytest.mark.parametrize("model, streaming", [("canary_qwen", False), ("canary_qwen_stream", True)])
def test_perf_analyzer_measures_the_engine(server, tmp_path, model, streaming):
    perf_analyzer(server.grpc_url, "grpc", model, tmp_path, streaming=streaming)


@needs_server
def test_16_concurrent_clients_half_streaming_get_the_reference(server, clips, reference):
    want = reference.transcribe(clips, max_new_tokens=BUDGET)

    def work(i):
        url, protocol = (server.grpc_url, "grpc") if i % 4 else (server.http_url, "http")
        with TritonClient(url, protocol, timeout_s=60) as client:
            if i % 2:
                return "".join(client.stream(clips[i % 8])), None
            return client.infer(clips[i % 8], with_ids=protocol == "grpc")

    with ThreadPoolExecutor(CLIENTS) as pool:
        got = list(pool.map(work, range(CLIENTS)))
    for i, (text, ids) in enumerate(got):
        assert text == want[i % 8].text, f"client {i}"
        if ids:
            assert ids == want[i % 8].token_ids, f"client {i}"


@needs_server
def test_a_request_that_arrives_mid_decode_is_answered_before_it_ends(server, clips):
    """A short request sent while a 2,000-token stream decodes is answered before that stream ends: it joined the
    running batch (what is checked is the order of the two answers, not their times)."""
    order, running = [], threading.Event()

    def long_stream():
        with TritonClient(server.grpc_url, "grpc", timeout_s=120) as client:
            for n, _ in enumerate(client.stream(clips[5], max_new_tokens=TOKEN_LIMIT)):
                if n == 10:
                    running.set()  # the long decode runs
        order.append("long")

    worker = threading.Thread(target=long_stream)
    worker.start()
    try:
        assert running.wait(60)
        with TritonClient(server.grpc_url, "grpc") as c:
            _, ids = c.infer(clips[1], max_new_tokens=3, with_ids=True)
        order.append("short")
    finally:
        worker.join(120)
    assert len(ids) == 3 and order == ["short", "long"]


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancelled_streams_stop_decoding(server, clips, protocol):
    """Every slot taken by a 2,000-token stream whose reader leaves after two pieces: the engine ends each as
    cancelled, none as finished (counted by the engine model), and the next request gets a slot."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    clients = [TritonClient(url, protocol, timeout_s=60) for _ in range(SLOTS)]
    before = stream_counts(server)
    try:
        streams = [c.stream(clips[3], max_new_tokens=TOKEN_LIMIT) for c in clients]
        for s in streams:
            next(s), next(s)
        for s in streams:
            s.close()  # cancels the request
        after = wait_for_counts(lambda: stream_counts(server), lambda c: c["cancelled"] >= before["cancelled"] + SLOTS)
        with TritonClient(url, protocol) as probe:
            assert probe.infer(clips[1], max_new_tokens=3)[0] is not None
    finally:
        for c in clients:
            c.close()
    assert after["cancelled"] == before["cancelled"] + SLOTS
    assert after["finished"] == before["finished"] and after["failed"] == before["failed"]
    assert after["tokens"] - before["tokens"] < SLOTS * TOKEN_LIMIT


@needs_server
def test_refused_requests_leave_the_others_untouched(server, clips, reference):
    want = reference.transcribe(clips[2:3], max_new_tokens=BUDGET)[0]
    with TritonClient(server.grpc_url, "grpc", timeout_s=60) as client, ThreadPoolExecutor(4) as pool:
        good = [pool.submit(client.infer, clips[2], with_ids=True) for _ in range(3)]
        with pytest.raises(InferenceError, match=f"MAX_NEW_TOKENS must be between 0 and {TOKEN_LIMIT}"):
            client.infer(clips[2], max_new_tokens=TOKEN_LIMIT + 1)
        with pytest.raises(InferenceError, match="over this server's 8 s limit"):
            client.infer(make_clip(MAX_AUDIO_S + 1, 3))
        with pytest.raises(InferenceError, match="empty"):
            client.infer(clips[0][:0])
        assert [g.result(60) for g in good] == [(want.text, want.token_ids)] * 3


@needs_server
def test_serve_fails_at_start_with_the_reason_when_the_engine_cannot_load(tiny_checkpoint, tmp_path):
    """int8 asked for on a device it does not run on: `serve` exits non-zero and says why, instead of a ready
    server that errors on every request."""
    repo = generate_engine_repo("torch-fast", tiny_checkpoint, tmp_path / "repo", dtype="int8", device="cuda")
    run = subprocess.run(
        [sys.executable, "-m", "canary_qwen.cli", "serve", "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model 'canary_qwen_stream' did not load" in errors[0], run.stderr[-2000:]
    assert "CUDA" in errors[0]


# -- LLM mode: the same engine answers text-only dialogues ------------------------------------------------------
@pytest.fixture(scope="module")
def fast_local(tiny_checkpoint):
    """The local torch-fast engine the server runs (fp32 on a CPU)."""
    from canary_qwen.backends.fast_torch import FastTorchBackend

    return FastTorchBackend(str(tiny_checkpoint))


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_dialogues_are_answered_as_locally_unary_and_streamed(server, fast_local, clips, reference, protocol):
    """DIALOGUE in place of AUDIO: the local ``answer``'s ids, whole and streamed, while clips decode beside them."""
    from conftest import dialogue_cases

    url = server.grpc_url if protocol == "grpc" else server.http_url
    cases = list(dialogue_cases().values())
    want = [fast_local.answer([turns], max_new_tokens=BUDGET)[0] for turns in cases]
    heard = reference.transcribe(clips[:2], max_new_tokens=BUDGET)
    with TritonClient(url, protocol, timeout_s=60) as client, ThreadPoolExecutor(4) as pool:
        asr = [pool.submit(client.infer, clip, max_new_tokens=BUDGET, with_ids=True) for clip in clips[:2]]
        got = [client.ask(turns, max_new_tokens=BUDGET)[:2] for turns in cases]
        streamed = ["".join(p for p, *_ in client.ask_stream(turns, max_new_tokens=BUDGET)) for turns in cases]
        assert [a.result(60) for a in asr] == [(h.text, h.token_ids) for h in heard]
    assert got == [(w.text, w.token_ids) for w in want]
    assert streamed == [w.text for w in want]


@needs_server
def test_a_standard_client_sends_a_dialogue(server, fast_local):
    """tritonclient's plain infer with a DIALOGUE tensor (no AUDIO), as any Triton user would send it."""
    import json as json_

    import numpy as np
    import tritonclient.http as http

    turns = [{"role": "user", "content": "What is the capital of France?"}]
    from canary_qwen.model.prompt import Turn

    want = fast_local.answer([[Turn(**t) for t in turns]], max_new_tokens=BUDGET)[0]
    with http.InferenceServerClient(server.http_url) as client:
        dialogue = http.InferInput("DIALOGUE", [1, 1], "BYTES")
        dialogue.set_data_from_numpy(np.array([[json_.dumps(turns).encode()]], dtype=object))
        budget = http.InferInput("MAX_NEW_TOKENS", [1, 1], "INT32")
        budget.set_data_from_numpy(np.array([[BUDGET]], dtype=np.int32))
        result = client.infer("canary_qwen", [dialogue, budget])
    assert result.as_numpy("OUTPUT_IDS").reshape(-1).tolist() == want.token_ids
    assert result.as_numpy("TEXT").reshape(-1)[0].decode() == want.text


@needs_server
def test_bad_dialogues_are_refused_with_the_reason(server, clips):
    from canary_qwen.model.prompt import Turn

    with TritonClient(server.grpc_url, "grpc", timeout_s=60) as client:
        with pytest.raises(InferenceError, match="must end with a user turn"):
            client.ask([Turn("user", "hi"), Turn("assistant", "hello")])
        with pytest.raises(InferenceError, match="MAX_NEW_TOKENS must be between 0 and 1024"):
            client.ask([Turn("user", "hi")], max_new_tokens=5000)
        with pytest.raises(InferenceError, match="dialogue takes .* at most 1024"):
            client.ask([Turn("user", "word " * 3000)])
        arrays = {"DIALOGUE": np.array([[b"not json"]], dtype=object)}
        with pytest.raises(InferenceError, match="DIALOGUE is not JSON"):
            client.call("canary_qwen", arrays, ["TEXT"])
        assert client.infer(clips[1], max_new_tokens=3, with_ids=True)[1]  # the engine goes on


@needs_server
def test_client_ask_json_equals_local_ask_json(server, tiny_checkpoint, tmp_path):
    """`client ask --about FILE --system TEXT --json` through the server prints what `ask` prints locally."""
    import json as json_

    import soundfile as sf

    path = tmp_path / "clip.wav"
    sf.write(path, make_clip(2.0, 11), 16000, subtype="FLOAT")
    tail = ["--about", str(path), "--system", "Be brief.", "--max-new-tokens", "16", "--json", "Summarise this:"]
    command = [sys.executable, "-m", "canary_qwen.cli"]
    local = subprocess.run([*command, "ask", "--model", str(tiny_checkpoint), *tail], capture_output=True, text=True)
    served = subprocess.run(
        [*command, "client", "ask", "--url", server.http_url, *tail], capture_output=True, text=True
    )
    assert local.returncode == 0 and served.returncode == 0, local.stderr[-2000:] + served.stderr[-2000:]
    assert json_.loads(served.stdout) == json_.loads(local.stdout)
    streamed = subprocess.run(
        [*command, "client", "ask", "--stream", "--url", server.http_url, *tail], capture_output=True, text=True
    )
    assert json_.loads(streamed.stdout) == json_.loads(local.stdout)


def test_requests_beyond_what_the_engine_holds_are_refused_as_busy(tiny_checkpoint, clips, tmp_path):
    """One slot and a queue of one: the engine holds two long requests, and a third, unary or streamed, is answered
    busy at once (the client's retryable ServerBusyError), while the two held ones are answered."""
    bounds = RequestBounds(
        max_audio_s=MAX_AUDIO_S, max_new_tokens=BUDGET, max_new_tokens_limit=TOKEN_LIMIT, max_queue=1
    )
    repo = generate_engine_repo("torch-fast", tiny_checkpoint, tmp_path / "repo", max_batch=1, bounds=bounds)
    with running_server(repo, tmp_path / "server") as s:
        client = TritonClient(s.grpc_url, protocol="grpc")
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.infer, clips[0], max_new_tokens=TOKEN_LIMIT) for _ in range(2)]
            wait_for_counts(lambda: stream_counts(s), lambda c: c.get("pending", 0) >= 2)
            with pytest.raises(ServerBusyError, match="Exceeds maximum queue size"):
                client.infer(clips[1], max_new_tokens=3)
            with pytest.raises(ServerBusyError, match="Exceeds maximum queue size"):
                list(client.stream(clips[1], max_new_tokens=3))
            assert all(len(f.result()[0]) > 0 for f in held)
        assert s.stop() == 0


@needs_server
def test_the_served_path_costs_a_step_per_token_and_one_response_per_unary_request(server, clips):
    """What the server did for requests sent one at a time, counted by the engine model: a request of n tokens takes
    n engine steps (n + 1 when it ends on eos), a unary request one response (its whole answer), a streamed one at
    most n + 1 (a piece per step, whitespace joining the next, and the final flag). Measured on the tiny checkpoint:
    exactly those. A served path that stepped while idle, or sent a unary answer piece by piece (a round trip
    between processes each), fails here."""
    wait_for_counts(lambda: stream_counts(server), lambda c: c.get("pending", 1) == 0)
    before = stream_counts(server)
    with TritonClient(server.grpc_url, "grpc", timeout_s=60) as client:
        unary = [len(client.infer(clip, max_new_tokens=BUDGET, with_ids=True)[1]) for clip in clips[:4]]
        counts = wait_for_counts(lambda: stream_counts(server), lambda c: c["finished"] >= before["finished"] + 4)
        assert sum(unary) <= counts["steps"] - before["steps"] <= sum(unary) + len(unary)
        assert counts["responses"] - before["responses"] == len(unary)
        before = counts
        streamed = [
            sum(len(ids) for _, ids in client.stream_with_ids(clip, max_new_tokens=BUDGET)) for clip in clips[:4]
        ]
        counts = wait_for_counts(lambda: stream_counts(server), lambda c: c["finished"] >= before["finished"] + 4)
    assert sum(streamed) <= counts["steps"] - before["steps"] <= sum(streamed) + len(streamed)
    assert len(streamed) < counts["responses"] - before["responses"] <= sum(streamed) + len(streamed)
