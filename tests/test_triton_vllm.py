"""The vllm flavour on the bundled Triton: one vLLM engine (its encoder in ONNX Runtime) in the engine model
serving concurrent clients.

Runs where vLLM and numpy < 2 share the server's Python (``.venv-vllm``, made by scripts/setup.sh).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm (scripts/setup.sh)")

from conftest import make_clip, plain_infer, read_bounds, running_server  # noqa: E402

from canary_qwen.backends.torch_ref import TorchBackend  # noqa: E402
from canary_qwen.bounds import RequestBounds
from canary_qwen.client.triton import TritonClient  # noqa: E402
from canary_qwen.errors import UsageError  # noqa: E402
from canary_qwen.export.artifacts import export_all  # noqa: E402
from canary_qwen.model.synthetic import make_checkpoint  # noqa: E402
from canary_qwen.serving.config_check import check_ensemble, parse_model_config  # noqa: E402
from canary_qwen.serving.engine_flavor import generate_engine_repo  # noqa: E402

pytestmark = pytest.mark.triton
BUDGET = 20
TOKEN_LIMIT = 40
MAX_QUEUE = 48  # above the 32 concurrent clients below
MAX_AUDIO_S = 8.0  # the engine holds 100 frames + 64 prompt positions + TOKEN_LIMIT
# LLM-mode bounds whose rows (dialogue + answer) fit within that: the refusal test below needs the ASR row to size it
LLM_BOUNDS = dict(max_prompt_tokens=128, max_answer_tokens=BUDGET, max_answer_tokens_limit=TOKEN_LIMIT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tvllm") / "ckpt", "tiny", seed=0, head_dim=32)


@pytest.fixture(scope="module")
def export_root(checkpoint, tmp_path_factory):
    return export_all(checkpoint, tmp_path_factory.mktemp("tvllm-export"), progress=False, lora_adapter=True).root


@pytest.fixture(scope="module")
def repo(export_root, tmp_path_factory):
    return generate_engine_repo(
        "vllm",
        export_root,
        tmp_path_factory.mktemp("tvllm-repo") / "repo",
        bounds=RequestBounds(
            max_new_tokens=BUDGET,
            max_new_tokens_limit=TOKEN_LIMIT,
            max_queue=MAX_QUEUE,
            queue_timeout_s=30,
            max_audio_s=MAX_AUDIO_S,
            **LLM_BOUNDS,
        ),
        kv_cache_gib=0.0625,
    )


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, repo.parent / "server", startup_timeout=300) as s:
        yield s


@pytest.fixture(scope="module")
def clips():
    return [make_clip(0.5 + 0.3 * i, 100 + i) for i in range(8)]


@pytest.fixture(scope="module")
def expected(checkpoint, clips):
    return TorchBackend(str(checkpoint)).transcribe(clips, max_new_tokens=BUDGET)


def test_repository_is_wired_and_bounded(repo, export_root, tmp_path):
    """The engine flavours' bounds: no dynamic batcher (requests reach the engine as they come), the engine holds its
    16 running requests and MAX_QUEUE more before refusing one as busy, and it knows the token limit. (The server
    below loads these configs, so Triton accepts them.)"""
    assert check_ensemble(repo) == []
    engine = parse_model_config(repo / "canary_qwen_stream" / "config.pbtxt")
    assert engine.model_transaction_policy.decoupled and engine.parameters["engine"].string_value == "vllm"
    assert not engine.HasField("dynamic_batching")
    assert engine.parameters["max_pending"].string_value == str(16 + MAX_QUEUE)
    assert read_bounds(repo / "canary_qwen_stream").max_new_tokens_limit == TOKEN_LIMIT
    assert (repo / "canary_qwen_stream" / "1" / "export" / "lora" / "adapter_config.json").is_file()
    with pytest.raises(UsageError, match="max_audio_s must be > 0"):
        RequestBounds(max_audio_s=0)
    with pytest.raises(UsageError, match=f"over max_new_tokens_limit {TOKEN_LIMIT}"):
        RequestBounds(max_new_tokens=TOKEN_LIMIT + 1, max_new_tokens_limit=TOKEN_LIMIT)


def test_32_concurrent_clients_each_get_the_reference_answer(server, clips, expected):
    clients = [
        TritonClient(server.grpc_url if i % 2 else server.http_url, "grpc" if i % 2 else "http") for i in range(32)
    ]

    def work(i):
        clip = clips[i % 8]
        if i % 8 == 7:  # a few read as text pieces from canary_qwen_stream
            return "".join(clients[i].stream(clip)), None
        return clients[i].infer(clip, with_ids=i % 2 == 1)

    try:
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(work, range(32)))
    finally:
        for c in clients:
            c.close()
    for i, (text, ids) in enumerate(got):
        want = expected[i % 8]
        assert text == want.text, f"client {i}"
        if ids:
            assert ids == want.token_ids, f"client {i}"
    assert sum(1 for _, ids in got if ids) == 12  # the gRPC ensemble clients compared their ids too


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_standard_unary_inference_gets_the_reference_tokens(server, clips, expected, protocol):
    """tritonclient's plain infer, as any Triton user sends it (the engine is reached through canary_qwen)."""
    url = server.http_url if protocol == "http" else server.grpc_url
    assert [plain_infer(url, protocol, c) for c in clips[:3]] == [(w.text, w.token_ids) for w in expected[:3]]


def test_budget_and_bad_audio_get_answers_and_the_server_keeps_serving(server, clips, expected):
    with TritonClient(server.grpc_url, "grpc") as client:
        text, ids = client.infer(clips[2], max_new_tokens=3, with_ids=True)
        assert ids == expected[2].token_ids[:3]
        with pytest.raises(Exception, match=f"MAX_NEW_TOKENS must be between 0 and {TOKEN_LIMIT}"):
            client.infer(clips[2], max_new_tokens=TOKEN_LIMIT + 1)
        with pytest.raises(Exception, match="AUDIO"):
            client.infer(clips[0][:0])
        with pytest.raises(Exception, match="over this server's 8 s limit"):
            client.infer(make_clip(20.0, 5))
        wordy = "Transcribe the following recording word for word. " * 10  # more text than the engine has room for
        with pytest.raises(Exception, match="positions .* the engine holds 204"):
            client.infer(make_clip(MAX_AUDIO_S, 5), prompt=wordy, max_new_tokens=TOKEN_LIMIT)
        assert client.infer(clips[1])[0] == expected[1].text


def test_dialogues_are_answered_in_llm_mode_beside_clips(server, checkpoint, clips, expected):
    """DIALOGUE in place of AUDIO: the vLLM engine answers with the adapter off (the torch reference's LLM-mode ids,
    themselves NeMo's: tests/test_llm_mode.py), whole and streamed, while clips decode through it."""
    from conftest import dialogue_cases

    cases = list(dialogue_cases().values())
    want = TorchBackend(str(checkpoint)).answer(cases, max_new_tokens=BUDGET)
    with TritonClient(server.grpc_url, "grpc", timeout_s=120) as client, ThreadPoolExecutor(2) as pool:
        asr = [pool.submit(client.infer, clip, max_new_tokens=BUDGET, with_ids=True) for clip in clips[:2]]
        got = [client.ask(turns, max_new_tokens=BUDGET)[:2] for turns in cases]
        streamed = ["".join(p for p, *_ in client.ask_stream(turns, max_new_tokens=BUDGET)) for turns in cases]
        assert [a.result(120) for a in asr] == [(e.text, e.token_ids) for e in expected[:2]]
    assert got == [(w.text, w.token_ids) for w in want]
    assert streamed == [w.text for w in want]
