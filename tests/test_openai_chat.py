"""``POST /v1/chat/completions`` on ``serve-openai --model CKPT --backend torch-fast`` (tiny checkpoint), driven by the
official ``openai`` client: LLM mode served. A text part and an ``input_audio`` part answer what
``canary-qwen ask --about`` answers, streamed chunks join to it, chat and transcription requests mixed in one engine
each equal their reference, and every bad input gets OpenAI's error shape while a good request goes on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import dialogue_cases, make_clip
from test_openai_support import MODEL, assert_openai_error, create, openai_server, reference_texts, write_files

from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.model.prompt import dialogue_ids

openai = pytest.importorskip("openai")
BUDGET = 24
MAX_AUDIO_S = 60
MAX_PROMPT_TOKENS = 600
QUESTION = "Summarise this call:"
MAX_UPLOAD_MB = 4  # a chat body may be 4/3 of it (base64) and 64 KiB more


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-chat")


@pytest.fixture(scope="module")
def files(work) -> list[str]:
    return write_files(work / "audio")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, work):
    args = ["--model", str(tiny_checkpoint), "--backend", "torch-fast", "--max-batch", "8"]
    args += ["--max-audio-s", str(MAX_AUDIO_S), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS)]
    args += ["--max-upload-mb", str(MAX_UPLOAD_MB)]
    with openai_server(args, work / "server") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120) as c:
        yield c


def ask_json(checkpoint, path: str, question: str, budget: int) -> dict:
    """`canary-qwen ask --about PATH --json` (the default backend, torch-fast fp32)."""
    argv = [sys.executable, "-m", "canary_qwen.cli", "ask", "--model", str(checkpoint), "--json"]
    argv += ["--about", path, "--max-new-tokens", str(budget), question]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = [json.loads(line) for line in run.stdout.splitlines()]
    return row


def audio_part(path: str, fmt: str = "wav") -> dict:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def about_messages(path: str, fmt: str = "wav") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}, audio_part(path, fmt)]}]


@pytest.fixture(scope="module")
def asked(tiny_checkpoint, files) -> dict[str, dict]:
    """`ask --about` of two files (a wav and the 50 s two-window one)."""
    return {path: ask_json(tiny_checkpoint, path, QUESTION, BUDGET) for path in (files[0], files[4])}


def chat(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=BUDGET, **kwargs)


def test_a_question_about_audio_answers_what_ask_answers(client, asked):
    for path, want in asked.items():
        answer = chat(client, about_messages(path))
        assert answer.object == "chat.completion" and answer.model == MODEL
        (choice,) = answer.choices
        assert choice.message.role == "assistant" and choice.message.content == want["text"]
        assert choice.finish_reason == ("length" if len(want["token_ids"]) == BUDGET else "stop")
        assert answer.usage.completion_tokens == len(want["token_ids"])
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_chunks_join_to_the_answer(client, asked):
    path = next(iter(asked))
    chunks = list(chat(client, about_messages(path), stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == asked[path]["text"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(asked[path]["token_ids"])


def test_the_stream_ends_with_done(server, files):
    body = {"model": MODEL, "messages": about_messages(files[0]), "stream": True, "max_completion_tokens": 4}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    return FastTorchBackend(str(tiny_checkpoint))


def test_text_dialogues_equal_the_local_engine(client, local):
    """Text only: one question, and a system turn with two user turns (an assistant turn between)."""
    for turns in dialogue_cases().values():
        want = local.answer([turns], max_new_tokens=BUDGET)[0]
        messages = [{"role": t.role, "content": t.content} for t in turns]
        answer = chat(client, messages)
        assert answer.choices[0].message.content == want.text
        assert answer.usage.completion_tokens == len(want.token_ids)


def test_sixteen_chat_and_transcription_requests_mixed_each_equal_their_reference(
    client, files, asked, tiny_checkpoint
):
    transcripts = reference_texts(files, "torch-fast", tiny_checkpoint)
    jobs = []
    for i in range(16):
        if i % 2:
            path = list(asked)[i % 4 // 2]
            jobs.append(("chat", path, asked[path]["text"]))
        else:
            path = files[i % 4]
            jobs.append(("transcribe", path, transcripts[path]))

    def run(job):
        kind, path, want = job
        if kind == "chat":
            return chat(client, about_messages(path)).choices[0].message.content, want
        return create(client, path).text, want

    with ThreadPoolExecutor(16) as pool:
        for got, want in pool.map(run, jobs):
            assert got == want


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def long_wav(work) -> str:
    path = work / "too-long.wav"
    sf.write(path, make_clip(MAX_AUDIO_S + 2, 9), 16000, subtype="PCM_16")
    return str(path)


def bad_requests(files, long_wav) -> list[tuple[str, dict, int, str]]:
    good = {"model": MODEL, "max_completion_tokens": 4}
    text = [{"role": "user", "content": "hello"}]
    return [
        ("no content", {**good, "messages": [{"role": "user", "content": ""}]}, 400, "missing"),
        ("no messages", {**good, "messages": []}, 400, "missing"),
        (
            "audio that will not decode",
            {**good, "messages": [{"role": "user", "content": [audio_part(__file__)]}]},
            400,
            "invalid_audio",
        ),
        (
            "bad base64",
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}}],
                    }
                ],
            },
            400,
            "invalid_audio",
        ),  # fmt: skip
        ("unsupported format", {**good, "messages": about_messages(files[0], "midi")}, 400, "unsupported_format"),
        ("too long", {**good, "messages": about_messages(long_wav)}, 400, "audio_too_long"),
        ("too many tokens", {**good, "messages": text, "max_completion_tokens": 10**6}, 400, "invalid_value"),
        (
            "dialogue too long",
            {**good, "messages": [{"role": "user", "content": "word " * 2000}]},
            400,
            "invalid_value",
        ),  # fmt: skip
        ("temperature", {**good, "messages": text, "temperature": 0.7}, 400, "unsupported_value"),
        ("n", {**good, "messages": text, "n": 2}, 400, "unsupported_value"),
        ("unknown model", {**good, "messages": text, "model": "whisper-1"}, 404, "model_not_found"),
        (
            "ends with the assistant",
            {**good, "messages": [*text, {"role": "assistant", "content": "hi"}]},
            400,
            "invalid_value",
        ),  # fmt: skip
        (
            "an image part",
            {
                **good,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
                ],
            },
            400,
            "unsupported_value",
        ),  # fmt: skip
    ]


def test_each_bad_input_is_refused_while_a_good_request_goes_on(server, client, files, long_wav, asked):
    path = next(iter(asked))
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(chat, client, about_messages(path))
        for name, body, status, code in bad_requests(files, long_wav):
            r = _post(server, body)
            assert r.status_code == status, (name, r.text)
            assert_openai_error(r.json(), status, code)
        assert good.result().choices[0].message.content == asked[path]["text"]


def test_a_body_over_the_limit_is_refused_while_it_streams_in(server):
    body = b'{"model": "canary-qwen-2.5b", "messages": [{"role": "user", "content": "' + b"x" * (6 * 2**20) + b'"}]}'
    r = httpx.post(f"{server.base_url}/chat/completions", content=body, timeout=60)
    assert r.status_code == 413
    assert_openai_error(r.json(), 413, "body_too_large")


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, [{"role": "user", "content": "hi"}], temperature=0.7)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_silence_is_a_transcript_too(client):
    """An audio part with nothing to hear still answers (its transcript may be empty)."""
    import io

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(16000, dtype=np.float32), 16000, format="WAV")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(),
                                                    "format": "wav"}}  # fmt: skip
    answer = chat(client, [{"role": "user", "content": [{"type": "text", "text": "What is said?"}, part]}])
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_through_triton(tiny_checkpoint, work, asked, local):
    """`serve-openai --triton` on the torch-fast flavour (the real bundled server): the audio transcribed and the
    dialogue answered by Triton's engine, whole and streamed, with the dialogue's tokens as the server counted them."""
    from conftest import HAVE_TRITON, running_server

    from canary_qwen.serving.engine_flavor import generate_engine_repo

    if not HAVE_TRITON:
        pytest.skip("nvidia-pytriton (bundled tritonserver) not installed")
    repo = generate_engine_repo("torch-fast", tiny_checkpoint, work / "repo", max_batch=8)
    with running_server(repo, work / "triton") as triton:
        with openai_server(["--triton", f"grpc://{triton.grpc_url}"], work / "over-triton") as server:
            with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120) as client:
                path = next(iter(asked))
                answer = chat(client, about_messages(path))
                chunks = list(chat(client, about_messages(path), stream=True, stream_options={"include_usage": True}))
                turns = dialogue_cases()["system-two-turns"]
                text_answer = chat(client, [{"role": t.role, "content": t.content} for t in turns])
    assert answer.choices[0].message.content == asked[path]["text"]
    assert answer.usage.completion_tokens == len(asked[path]["token_ids"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == asked[path]["text"]
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens > 0
    want = local.answer([turns], max_new_tokens=BUDGET)[0]
    assert text_answer.choices[0].message.content == want.text
    assert text_answer.usage.prompt_tokens == len(dialogue_ids(local.tokenizer, turns))
