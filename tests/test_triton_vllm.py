"""The vllm flavour on the bundled Triton: one vLLM engine in a python model serving concurrent clients.

Runs where vLLM and numpy < 2 share the server's Python (``.venv-vllm``, made by scripts/setup.sh).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm (scripts/setup.sh)")

from conftest import make_clip, running_server  # noqa: E402

from canary_qwen.backends.torch_ref import TorchBackend  # noqa: E402
from canary_qwen.client.triton import TritonClient  # noqa: E402
from canary_qwen.export.artifacts import export_all  # noqa: E402
from canary_qwen.model.synthetic import make_checkpoint  # noqa: E402
from canary_qwen.serving.config_check import check_ensemble  # noqa: E402
from canary_qwen.serving.vllm_flavor import generate_vllm_repo  # noqa: E402

pytestmark = pytest.mark.triton
BUDGET = 20
MAX_MODEL_LEN = 256  # positions per request: a 20 s clip (250 frames) + the prompt does not fit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tvllm") / "ckpt", "tiny", seed=0, head_dim=32)


@pytest.fixture(scope="module")
def repo(checkpoint, tmp_path_factory):
    export = export_all(checkpoint, tmp_path_factory.mktemp("tvllm-export"), progress=False, lora_adapter=True)
    return generate_vllm_repo(
        export.root,
        tmp_path_factory.mktemp("tvllm-repo") / "repo",
        max_new_tokens=BUDGET,
        kv_cache_gib=0.0625,
        max_model_len=MAX_MODEL_LEN,
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


def test_repository_is_wired(repo):
    assert check_ensemble(repo) == []
    assert "decoupled: true" in (repo / "vllm" / "config.pbtxt").read_text()


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
        start = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(work, range(32)))
        took = time.monotonic() - start
    finally:
        for c in clients:
            c.close()
    for i, (text, ids) in enumerate(got):
        want = expected[i % 8]
        assert text == want.text, f"client {i}"
        if ids:
            assert ids == want.token_ids, f"client {i}"
    assert sum(1 for _, ids in got if ids) == 12  # the gRPC ensemble clients compared their ids too
    assert took < 120


def test_budget_and_bad_audio_get_answers_and_the_server_keeps_serving(server, clips, expected):
    with TritonClient(server.grpc_url, "grpc") as client:
        text, ids = client.infer(clips[2], max_new_tokens=3, with_ids=True)
        assert ids == expected[2].token_ids[:3]
        with pytest.raises(Exception, match="AUDIO"):
            client.infer(clips[0][:0])
        with pytest.raises(Exception, match="positions .* the engine holds 256"):
            client.infer(make_clip(20.0, 5))
        assert client.infer(clips[1])[0] == expected[1].text
