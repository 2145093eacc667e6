"""``canary-qwen serve-openai --triton``: the OpenAI-compatible server forwarding to the REAL bundled Triton (onnx
flavour, tiny export), driven by the official ``openai`` client (sync and async), ``curl -F`` and plain HTTP.

Texts equal ``canary-qwen transcribe --backend onnx --json`` for the same files in every response_format; streamed
deltas join to them; 32 concurrent requests; every bad input refused in OpenAI's error shape while a good request
goes on; the upload limit holds while the body streams in, without the server's memory growing by it; a stream the
client leaves stops Triton's decoding; a Triton that is down gives 503 in time. About a minute on 2 cores."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import make_clip, needs_server, running_server, stream_counts, wait_for_counts
from test_openai_support import (
    MODEL,
    assert_openai_error,
    create,
    openai_server,
    parse_cues,
    reference_texts,
    sse_events,
    transcribe_json,
    write_files,
)

from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.openai_api.formats import cue_text
from canary_qwen.serving.onnx_flavor import generate_onnx_repo
from canary_qwen.serving.server import free_ports

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.triton, needs_server]

TOKEN_LIMIT = 4096  # long decodes make a cancelled stream measurable
IN_FLIGHT = 40
UPLOAD_MB = 8
MAX_AUDIO_S = 60
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-triton")


@pytest.fixture(scope="module")
def triton(tiny_export, work):
    repo = generate_onnx_repo(
        tiny_export,
        work / "repo",
        max_batch=8,
        queue_delay_us=5000,
        bounds=RequestBounds(max_new_tokens_limit=TOKEN_LIMIT, max_queue=64),
    )
    with running_server(repo, work / "triton") as server:
        yield server


@pytest.fixture(scope="module")
def server(triton, work):
    args = [
        "--triton",
        f"grpc://{triton.grpc_url}",
        "--max-in-flight",
        str(IN_FLIGHT),
        "--max-upload-mb",
        str(UPLOAD_MB),
        "--max-audio-s",
        str(MAX_AUDIO_S),
        "--max-new-tokens-limit",
        str(TOKEN_LIMIT),
        "--timeout-s",
        "60",
    ]
    with openai_server(args, work / "server") as s:
        yield s


@pytest.fixture(scope="module")
def files(work) -> list[str]:
    return write_files(work / "audio")


@pytest.fixture(scope="module")
def reference(files, tiny_export) -> dict[str, str]:
    return reference_texts(files, "onnx", tiny_export)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def test_every_response_format_equals_transcribe_json(client, files, reference):
    for path in files:
        want = reference[path]
        assert create(client, path).text == want
        assert create(client, path, response_format="text") == want
        verbose = create(client, path, response_format="verbose_json", language="en", temperature=0)
        assert verbose.text == want
        duration = sf.info(path).duration
        assert abs(verbose.duration - duration) < 0.01
        segments = verbose.segments
        assert len(segments) == (2 if path.endswith("long.wav") else 1)
        assert segments[0].start == 0 and abs(segments[-1].end - duration) < 0.01
        assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
        assert " ".join(s.text for s in segments if s.text) == want
        assert all(s.tokens for s in segments if s.text)
        cues = [cue_text(s.text) for s in segments if s.text]
        for kind in ("srt", "vtt"):
            parsed = parse_cues(create(client, path, response_format=kind), kind)
            assert [c[2] for c in parsed] == cues
            assert [(c[0], c[1]) for c in parsed] == [(s.start, s.end) for s in segments if s.text]


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert server.metric("canary_qwen_openai_requests_total", '{status="200"}') > 0
    assert server.metric("canary_qwen_openai_audio_seconds_total") > 0
    assert server.metric("canary_qwen_openai_request_duration_seconds_count") > 0
    status, body = server.get("/v1/audio/translations")
    assert status in (404, 405)
    assert_openai_error(json.loads(body), status)


def test_async_client_and_curl(server, files, reference):
    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as c:

            async def one(path, fmt):
                with open(path, "rb") as f:
                    r = await c.audio.transcriptions.create(file=f, model=MODEL, response_format=fmt)
                return r if isinstance(r, str) else r.text

            return await asyncio.gather(*(one(p, fmt) for p in files for fmt in ("json", "text")))

    got = asyncio.run(run())
    assert got == [reference[p] for p in files for _ in range(2)]
    curl = shutil.which("curl")
    assert curl, "curl is needed"
    url = f"{server.base_url}/audio/transcriptions"
    for path in files[:2]:
        out = subprocess.run(
            [curl, "-sS", "-F", f"file=@{path}", "-F", f"model={MODEL}", url], capture_output=True, check=True
        )
        assert json.loads(out.stdout)["text"] == reference[path]
        out = subprocess.run(
            [curl, "-sS", "-F", f"file=@{path}", "-F", f"model={MODEL}", "-F", "response_format=text", url],
            capture_output=True,
            check=True,
        )
        assert out.stdout.decode() == reference[path]
        out = subprocess.run(
            [curl, "-sS", "-N", "-F", f"file=@{path}", "-F", f"model={MODEL}", "-F", "stream=true", url],
            capture_output=True,
            check=True,
        )
        events = sse_events(out.stdout.decode())
        assert events[-1] == {"type": "transcript.text.done", "text": reference[path]}
        assert "".join(e["delta"] for e in events[:-1]) == reference[path]


def test_stream_deltas_join_to_the_text(client, server, files, reference):
    for path in files:
        events = list(create(client, path, stream=True))
        assert events, path
        assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
        assert events[-1].type == "transcript.text.done" and events[-1].text == reference[path]
        assert "".join(e.delta for e in events[:-1]) == reference[path]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0) as c:
            with open(files[-1], "rb") as f:
                stream = await c.audio.transcriptions.create(file=f, model=MODEL, stream=True, response_format="text")
            return [e async for e in stream]

    events = asyncio.run(run())
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == reference[files[-1]]


def test_32_concurrent_requests_equal_their_references(server, files, reference):
    order = [files[i % len(files)] for i in range(32)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120) as c:

            async def one(i, path):
                with open(path, "rb") as f:
                    if i % 4 == 3:
                        stream = await c.audio.transcriptions.create(file=f, model=MODEL, stream=True)
                        return "".join([e.delta async for e in stream if e.type == "transcript.text.delta"])
                    return (await c.audio.transcriptions.create(file=f, model=MODEL)).text

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(order)))

    assert asyncio.run(run()) == [reference[p] for p in order]
    assert server.metric("canary_qwen_openai_requests_in_flight") == 0


def test_the_load_test_command_targets_the_openai_server(server, files, tiny_export, work):
    """Every answer checked against `transcribe --json` (token ids of plain answers through verbose_json; OpenAI's
    stream events carry text only)."""
    reference = work / "reference.jsonl"
    reference.write_text(transcribe_json(files[:2], "onnx", tiny_export))
    argv = [sys.executable, "-m", "canary_qwen.cli", "client", "loadtest", "--openai", server.base_url]
    argv += ["--concurrency", "2", "--duration", "2", "--json", "--reference", str(reference), *files[:2]]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "HTTP Request" not in run.stderr  # nothing logged per request
    report = json.loads(run.stdout)
    assert report["ok"] == report["requests"] > 0 and report["streams"] > 0 and not report["errors"]
    assert report["compared"]["unary"] + report["compared"]["stream"] == report["ok"] and not report["mismatches"]


def _post(server, fields: dict, file: tuple[str, bytes] | None) -> httpx.Response:
    files = {"file": (file[0], file[1], "application/octet-stream")} if file is not None else None
    if files is None:  # still a multipart form
        files = {"unrelated": ("x.txt", b"x", "text/plain")}
    return httpx.post(f"{server.base_url}/audio/transcriptions", data=fields, files=files, timeout=60)


def test_bad_inputs_get_openai_errors_while_a_good_request_succeeds(server, client, files, reference, work):
    wav = Path(files[0]).read_bytes()
    long = work / "too_long.wav"
    sf.write(long, make_clip(MAX_AUDIO_S + 1.0, 9), 16000, subtype="PCM_16")
    good = {"model": MODEL}
    cases = [
        ("empty file", good, ("e.wav", b""), 400, "empty_file"),
        ("no file", good, None, 400, "missing"),
        ("not audio", good, ("notes.wav", b"these are not the samples you are looking for" * 20), 400, "invalid_audio"),
        ("corrupt audio", good, ("cut.wav", wav[: len(wav) // 3]), 400, "invalid_audio"),
        ("audio too long", good, ("long.wav", long.read_bytes()), 400, "audio_too_long"),
        ("unknown model", {"model": "whisper-1"}, ("a.wav", wav), 404, "model_not_found"),
        ("bad format", {**good, "response_format": "docx"}, ("a.wav", wav), 400, "unsupported_value"),
        ("other language", {**good, "language": "fr"}, ("a.wav", wav), 400, "unsupported_language"),
        ("sampling", {**good, "temperature": "0.7"}, ("a.wav", wav), 400, "unsupported_value"),
        ("over budget", {**good, "max_new_tokens": str(TOKEN_LIMIT + 1)}, ("a.wav", wav), 400, "invalid_value"),
        ("too large", good, ("big.wav", b"\0" * (UPLOAD_MB * 2**20 + 10)), 413, "file_too_large"),
    ]
    stop = threading.Event()
    good_results: list[str] = []

    def keep_transcribing():
        while not stop.is_set():
            good_results.append(create(client, files[-1]).text)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(keep_transcribing)
        for name, fields, file, status, code in cases:
            r = _post(server, fields, file)
            assert r.status_code == status, (name, r.status_code, r.text)
            assert_openai_error(r.json(), status, code)
        stop.set()
        running.result()
    assert good_results and all(t == reference[files[-1]] for t in good_results)
    # The official client raises its own error classes for these.
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(file=("a.wav", wav), model="whisper-1")
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(file=("e.wav", b""), model=MODEL)
    assert e.value.body["code"] == "empty_file"
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(file=("big.wav", b"\0" * (UPLOAD_MB * 2**20 + 10)), model=MODEL)
    assert e.value.status_code == 413
    assert create(client, files[0]).text == reference[files[0]]  # and it serves on


def test_upload_limit_holds_while_the_body_streams_in(server, client, files, reference):
    """A chunked upload of 256 MB (no Content-Length) to an 8 MB limit: 413 after at most the limit plus what the
    server drops while it answers, the rest never sent; the server's memory does not grow by the body."""
    total = 256 * 2**20
    chunk = b"\0" * 2**16
    sent = 0
    head = (
        '--bnd\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f'{MODEL}\r\n--bnd\r\nContent-Disposition: form-data; name="file"; filename="huge.wav"\r\n\r\n'
    ).encode()

    def body():
        nonlocal sent
        yield head
        while sent < total:
            sent += len(chunk)
            yield chunk
        yield b"\r\n--bnd--\r\n"

    before = server.rss()
    r = httpx.post(
        f"{server.base_url}/audio/transcriptions",
        content=body(),
        headers={"Content-Type": "multipart/form-data; boundary=bnd"},
        timeout=60,
    )
    after = server.rss()
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert_openai_error(r.json(), 413, "file_too_large")
    assert sent < total // 4, f"the client sent {sent / 2**20:.0f} MB of {total / 2**20:.0f} MB"
    assert after - before < 32 * 2**20, f"server memory grew by {(after - before) / 2**20:.0f} MB"
    assert create(client, files[0]).text == reference[files[0]]


def _held_upload(port: int, path: str | None) -> tuple[http.client.HTTPConnection, bytes]:
    """A request whose body is half sent (it holds one of the server's in-flight slots): the connection and the
    rest of the body."""
    audio = Path(path).read_bytes() if path else b"\0" * 4096
    body = (
        (
            f'--hold\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
            '--hold\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        ).encode()
        + audio
        + b"\r\n--hold--\r\n"
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/audio/transcriptions")
    conn.putheader("Content-Type", "multipart/form-data; boundary=hold")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[: len(body) // 2])
    return conn, body[len(body) // 2 :]


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_too_many_in_flight_get_429_with_retry_after(server, client, files, reference):
    port = int(server.url.rsplit(":", 1)[1])
    good, rest = _held_upload(port, files[0])
    held = [_held_upload(port, None)[0] for _ in range(IN_FLIGHT - 1)]
    try:
        _wait_for(lambda: server.metric("canary_qwen_openai_requests_in_flight") == IN_FLIGHT)
        r = _post(server, {"model": MODEL}, ("a.wav", Path(files[0]).read_bytes()))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert_openai_error(r.json(), 429, "too_many_requests")
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            create(client, files[0])
        good.send(rest)  # the request that held a slot first finishes, and is answered
        answer = good.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["text"] == reference[files[0]]
    finally:
        good.close()
        for conn in held:  # clients that leave mid-upload: their slots come back
            conn.close()
    _wait_for(lambda: server.metric("canary_qwen_openai_requests_in_flight") == 0)
    assert server.metric("canary_qwen_openai_requests_total", '{status="499"}') >= IN_FLIGHT - 1
    assert create(client, files[1]).text == reference[files[1]]


def test_a_stream_the_client_leaves_stops_decoding(triton, server, client, tiny_export):
    """A client that leaves a stream: the server cancels its Triton stream, which the stream model then ends as
    cancelled with fewer tokens than the whole decode (counted by the model; this fails when the disconnect is
    ignored)."""
    clip = make_clip(0.4 + 0.45 * 3, 503)
    whole = len(OnnxBackend(tiny_export).transcribe([clip], max_new_tokens=TOKEN_LIMIT)[0].token_ids)
    assert whole > 1000, "the test needs a clip that decodes long"
    wav = ("clip.wav", _wav(clip))
    before = stream_counts(triton)
    with client.audio.transcriptions.with_streaming_response.create(
        file=wav, model=MODEL, stream=True, extra_body={"max_new_tokens": TOKEN_LIMIT}
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the client has gone: the server must cancel the Triton stream
    after = wait_for_counts(lambda: stream_counts(triton), lambda c: c["cancelled"] > before["cancelled"])
    assert after["finished"] == before["finished"] and after["failed"] == before["failed"]
    assert after["tokens"] - before["tokens"] < whole
    _wait_for(lambda: server.metric("canary_qwen_openai_requests_in_flight") == 0)
    assert server.metric("canary_qwen_openai_requests_total", '{status="499"}') >= 1
    short = client.audio.transcriptions.create(
        file=("short.wav", _wav(make_clip(1.1, 1))), model=MODEL, stream=True, extra_body={"max_new_tokens": 3}
    )
    assert "".join(e.delta for e in short if e.type == "transcript.text.delta")  # and it serves on


def test_triton_down_gives_503_in_time_and_failover_works(triton, work, files, reference, capsys):
    from canary_qwen.cli import main

    dead = free_ports(1)[0]
    with openai_server(["--triton", f"127.0.0.1:{dead}", "--timeout-s", "5"], work / "down", ready=False) as down:
        status, body = down.get("/health")
        assert status == 503 and json.loads(body)["status"] == "unavailable"
        start = time.monotonic()
        r = _post(down, {"model": MODEL}, ("a.wav", Path(files[0]).read_bytes()))
        assert time.monotonic() - start < 5
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert_openai_error(r.json(), 503, "backend_unavailable")
        with openai.OpenAI(base_url=down.base_url, api_key="none", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError):
                create(c, files[0])
            with pytest.raises(openai.InternalServerError):
                list(create(c, files[0], stream=True))
        # the load test counts these as refused, not failed, and waits as Retry-After (1 s) says between them:
        # 2 clients for 3 s send at most 2 x (3 + 1) requests
        argv = ["client", "loadtest", "--openai", down.base_url, "--model", MODEL, "--concurrency", "2"]
        capsys.readouterr()
        assert main([*argv, "--duration", "3", "--json", files[0]]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["refused"] == {"InternalServerError": report["requests"]} and not report["errors"]
        assert 2 <= report["requests"] <= 8
    with openai_server(["--triton", f"127.0.0.1:{dead},{triton.grpc_url}"], work / "failover") as both:
        with openai.OpenAI(base_url=both.base_url, api_key="none", max_retries=0) as c:
            assert [create(c, files[0]).text for _ in range(3)] == [reference[files[0]]] * 3


def _wav(samples: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()
