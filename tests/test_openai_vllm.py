"""``canary-qwen serve-openai --model EXPORT --backend vllm``: the OpenAI-compatible server running vLLM in its own
process, driven by the official ``openai`` client: json, text and streamed answers equal ``canary-qwen transcribe
--backend vllm --json`` for the same files, concurrent requests too.

vLLM runs in its own venv (``.venv-vllm``, made by scripts/setup.sh; it has the server's packages too); elsewhere
these tests skip."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from test_openai_support import create, openai_server, reference_texts, write_files

from canary_qwen.export.artifacts import export_all
from canary_qwen.model.synthetic import make_checkpoint

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm (scripts/setup.sh)")
openai = pytest.importorskip("openai")

VLLM_HEAD_DIM = 32  # vLLM's CPU attention has no kernel for tiny's 16


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("openai-vllm")


@pytest.fixture(scope="module")
def export(work):
    ckpt = make_checkpoint(work / "ckpt", "tiny", seed=0, head_dim=VLLM_HEAD_DIM)
    return export_all(ckpt, work / "export", progress=False, lora_adapter=True).root


@pytest.fixture(scope="module")
def files(work):
    return write_files(work / "audio")[:4]  # the short ones: one window each


@pytest.fixture(scope="module")
def reference(files, export):
    return reference_texts(files, "vllm", export)


@pytest.fixture(scope="module")
def client(export, work):
    with openai_server(
        ["--model", str(export), "--backend", "vllm", "--max-batch", "8"], work / "server", timeout=300
    ) as s:
        with openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=120) as c:
            yield c


def test_json_text_and_streamed_answers_equal_transcribe(client, files, reference):
    assert all(reference[p] for p in files)  # something to compare
    for path in files:
        assert create(client, path).text == reference[path]
        assert create(client, path, response_format="text") == reference[path]
        events = list(create(client, path, stream=True))
        assert events[-1].type == "transcript.text.done" and events[-1].text == reference[path]
        assert "".join(e.delta for e in events[:-1]) == reference[path]


def test_concurrent_requests_each_equal_their_reference(client, files, reference):
    paths = [files[i % len(files)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda p: create(client, p).text, paths))
    assert texts == [reference[p] for p in paths]
