"""``canary-qwen serve-openai --model DIR --backend NAME``: the OpenAI-compatible server running an engine in its
own process (torch-fast on the tiny checkpoint; onnx on its export), driven by the official ``openai`` client.

Texts equal ``canary-qwen transcribe --json`` with the same backend in every response_format; streamed deltas join
to them; 32 concurrent requests are batched together in the engine and all equal their references; a client that
leaves (a stream, or a plain request) stops its decoding; an engine that fails to load is reported by /health and
answered with 503. About a minute on 2 cores."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_clip, wait_for_counts
from test_openai_support import (
    MODEL,
    assert_openai_error,
    create,
    openai_server,
    parse_cues,
    reference_texts,
    write_files,
)

from canary_qwen.openai_api.formats import cue_text

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

TOKEN_LIMIT = 4096
PENDING = "canary_qwen_openai_engine_pending"
IN_FLIGHT = "canary_qwen_openai_requests_in_flight"
CLIENT_LEFT = "canary_qwen_openai_requests_total"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-local")


@pytest.fixture(scope="module")
def files(work) -> list[str]:
    return write_files(work / "audio")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, work):
    args = ["--model", str(tiny_checkpoint), "--backend", "torch-fast", "--max-batch", "8"]
    args += ["--max-new-tokens-limit", str(TOKEN_LIMIT)]
    with openai_server(args, work / "torch-fast") as s:
        yield s


@pytest.fixture(scope="module")
def reference(files, tiny_checkpoint) -> dict[str, str]:
    return reference_texts(files, "torch-fast", tiny_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120) as c:
        yield c


def _wav(seconds: float, seed: int) -> tuple[str, bytes]:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, make_clip(seconds, seed), 16000, format="WAV", subtype="FLOAT")
    return ("clip.wav", buffer.getvalue())


def test_every_response_format_and_the_stream_equal_transcribe_json(client, files, reference):
    for path in files:
        want = reference[path]
        long = path.endswith("long.wav")
        verbose = create(client, path, response_format="verbose_json")
        assert verbose.text == want and " ".join(s.text for s in verbose.segments if s.text) == want
        assert len(verbose.segments) == (2 if long else 1)
        events = list(create(client, path, stream=True))
        assert events[-1].type == "transcript.text.done" and events[-1].text == want
        assert "".join(e.delta for e in events[:-1]) == want
        if long or path.endswith(("c.ogg", "d.wav")):
            continue  # the other formats are renderings of the same transcript: two files show them
        assert create(client, path).text == want
        assert create(client, path, response_format="text") == want
        cues = [cue_text(s.text) for s in verbose.segments if s.text]
        for kind in ("srt", "vtt"):
            assert [c[2] for c in parse_cues(create(client, path, response_format=kind), kind)] == cues


def test_32_concurrent_requests_are_batched_and_equal_their_references(server, files, reference):
    short = [p for p in files if not p.endswith("long.wav")]
    order = [short[i % len(short)] for i in range(32)]
    most = 0.0
    done = threading.Event()

    def watch():
        nonlocal most
        while not done.is_set():
            most = max(most, server.metric(PENDING))
            time.sleep(0.02)

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120) as c:

            async def one(i, path):
                with open(path, "rb") as f:
                    if i % 4 == 3:
                        stream = await c.audio.transcriptions.create(file=f, model=MODEL, stream=True)
                        return "".join([e.delta async for e in stream if e.type == "transcript.text.delta"])
                    return (await c.audio.transcriptions.create(file=f, model=MODEL)).text

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(order)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = asyncio.run(run())
    finally:
        done.set()
        watcher.join()
    assert got == [reference[p] for p in order]
    assert most >= 4, f"at most {most:g} windows were in the engine at once: requests were not batched together"
    assert server.metric(PENDING) == 0 and server.metric(IN_FLIGHT) == 0


ENGINE_ENDED = "canary_qwen_openai_engine_requests_ended_total"


def _engine_counts(server) -> dict[str, float]:
    counts = {o: server.metric(ENGINE_ENDED, f'{{outcome="{o}"}}') for o in ("finished", "cancelled", "failed")}
    return {**counts, "tokens": server.metric("canary_qwen_openai_engine_tokens_total")}


def test_a_client_that_leaves_stops_its_decoding(server, client):
    """A 4096-token decode whose client leaves (a stream, then a plain request that times out): once the server has
    seen the client go and holds nothing, the engine has not finished the request, and generated fewer tokens than
    its whole decode (counted by the engine; this fails when the disconnect is ignored)."""
    clip = _wav(1.75, 503)
    start = time.monotonic()
    verbose = client.audio.transcriptions.create(
        file=clip, model=MODEL, response_format="verbose_json", extra_body={"max_new_tokens": TOKEN_LIMIT}
    )
    whole, took = len(verbose.segments[0].tokens), time.monotonic() - start
    assert whole > 1000, "the test needs a clip that decodes long"
    # The plain request's client gives up a fifth of the way into the whole decode: one that gave up at a fixed
    # 0.5 s raced a whole decode that took about as long on a fast run (the engine finished it first once).
    give_up_s = min(0.5, took / 5)
    for leave in ("stream", "timeout"):
        before, left = _engine_counts(server), server.metric(CLIENT_LEFT, '{status="499"}')
        if leave == "stream":  # left after its first events
            with client.audio.transcriptions.with_streaming_response.create(
                file=clip, model=MODEL, stream=True, extra_body={"max_new_tokens": TOKEN_LIMIT}
            ) as response:
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                assert server.metric(PENDING) == 1
        else:  # a plain request whose client gives up waiting
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=give_up_s).audio.transcriptions.create(
                    file=clip, model=MODEL, extra_body={"max_new_tokens": TOKEN_LIMIT}
                )
        wait_for_counts(
            lambda: {
                "left": server.metric(CLIENT_LEFT, '{status="499"}'),
                "held": server.metric(PENDING) + server.metric(IN_FLIGHT),
            },
            lambda c, left=left: c["left"] > left and c["held"] == 0,
        )
        after = _engine_counts(server)
        assert after["finished"] == before["finished"] and after["failed"] == before["failed"], leave
        assert after["tokens"] - before["tokens"] < whole, leave
        if leave == "stream":  # the engine held it when the client left
            assert after["cancelled"] == before["cancelled"] + 1


def _stream(client, clip, budget):
    return client.audio.transcriptions.create(
        file=clip, model=MODEL, stream=True, extra_body={"max_new_tokens": budget}
    )


def test_onnx_engine(tiny_export, files, work):
    reference = reference_texts(files[:2], "onnx", tiny_export)
    with openai_server(["--model", str(tiny_export), "--backend", "onnx"], work / "onnx") as s:
        with openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0) as c:
            for path in files[:2]:
                assert create(c, path).text == reference[path]
                assert (
                    "".join(e.delta for e in create(c, path, stream=True) if e.type.endswith("delta"))
                    == (reference[path])
                )


def test_an_engine_that_fails_to_load(work, files):
    with openai_server(["--model", str(work / "missing"), "--backend", "torch-fast"], work / "bad", ready=False) as s:
        deadline = time.monotonic() + 30
        while "failed to load" not in json.loads(s.get("/health")[1])["detail"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status, body = s.get("/health")
        assert status == 503
        with open(files[0], "rb") as f:
            r = httpx.post(f"{s.base_url}/audio/transcriptions", data={"model": MODEL}, files={"file": f}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"]
        assert_openai_error(r.json(), 503, "backend_unavailable")
