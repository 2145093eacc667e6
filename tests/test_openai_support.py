"""The OpenAI-compatible server's pieces that need no server (field checks, the error table, response formats, the
streaming multipart parse), and the helpers the server tests share: starting ``canary-qwen serve-openai`` as a real
process on a loopback port, the reference transcripts from ``canary-qwen transcribe --json``, SSE/SRT/VTT parsers.
A few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from conftest import make_clip

from canary_qwen.cli import main
from canary_qwen.client.errors import (
    InferenceError,
    ModelFailedError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerBusyError,
    ServerUnreachableError,
)
from canary_qwen.errors import AudioError, BackendUnavailable, EngineFailed, InputError, Overloaded, RequestTimeout
from canary_qwen.openai_api.errors import api_error
from canary_qwen.openai_api.formats import cue_text, render
from canary_qwen.openai_api.protocol import APIError, Segment, Transcript, TranscriptionRequest
from canary_qwen.openai_api.upload import read_upload
from canary_qwen.serving.server import free_ports

MODEL = "canary-qwen-2.5b"
ERROR_KEYS = {"message", "type", "param", "code"}


# -- helpers for the server tests ------------------------------------------------------------------------------
@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of GET /metrics (0 when absent)."""
        _, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def openai_server(args: list[str], work: Path, *, ready: bool = True, timeout: float = 120.0):
    """``canary-qwen serve-openai ARGS`` on a free loopback port, in its own process; waits until ``/health`` says
    ready (or, ``ready=False``, until it answers at all); stopped (SIGTERM, then SIGKILL) afterwards."""
    port = free_ports(1)[0]
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"serve-openai-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "canary_qwen.cli", "serve-openai", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve-openai exited with {process.returncode}:\n{server.log_tail()}")
            try:
                status, _ = server.get("/health", timeout=2)
                if status == 200 or not ready:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve-openai not ready in {timeout} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def create(client, path, **kwargs):
    """``client.audio.transcriptions.create`` of the file at ``path`` for the served model."""
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(file=f, model=MODEL, **kwargs)


def write_files(folder: Path) -> list[str]:
    """Audio files in several formats: float wav, 44.1 kHz stereo flac (resampled and downmixed), ogg vorbis,
    16-bit wav, and a 50 s clip (two windows)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    a = make_clip(2.3, 0)
    sf.write(folder / "a.wav", a, 16000, subtype="FLOAT")
    b = make_clip(1.6, 1)
    t = np.interp(np.arange(int(len(b) * 44100 / 16000)) * 16000 / 44100, np.arange(len(b)), b).astype(np.float32)
    sf.write(folder / "b.flac", np.stack([t, 0.8 * t], axis=1), 44100, subtype="PCM_24")
    sf.write(folder / "c.ogg", make_clip(3.1, 2), 16000, format="OGG", subtype="VORBIS")
    sf.write(folder / "d.wav", make_clip(0.9, 3), 16000, subtype="PCM_16")
    sf.write(folder / "long.wav", make_clip(50.0, 4), 16000, subtype="PCM_16")
    for name in ("a.wav", "b.flac", "c.ogg", "d.wav", "long.wav"):
        paths.append(str(folder / name))
    return paths


def transcribe_json(files: list[str], backend: str, model: str) -> str:
    """What ``canary-qwen transcribe --backend B --model M --json FILES`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["transcribe", "--backend", backend, "--model", str(model), "--json", *files]) == 0
    return out.getvalue()


def reference_texts(files: list[str], backend: str, model: str) -> dict[str, str]:
    """``transcribe --json``'s text by file."""
    return {row["audio"]: row["text"] for row in map(json.loads, transcribe_json(files, backend, model).splitlines())}


def sse_events(body: str) -> list[dict]:
    """The JSON of each ``data:`` line of a server-sent event stream."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].strip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


_CLOCK = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def _seconds(m) -> float:
    h, mi, s, ms = (int(g) for g in m)
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_cues(text: str, kind: str) -> list[tuple[float, float, str]]:
    """(start, end, text) per cue of an SRT or WebVTT document."""
    if kind == "vtt":
        assert text.startswith("WEBVTT\n\n"), text[:40]
        text = text[len("WEBVTT\n\n") :]
    cues = []
    for block in [b for b in text.split("\n\n") if b.strip()]:
        lines = block.split("\n")
        if kind == "srt":
            assert lines[0] == str(len(cues) + 1), block
            lines = lines[1:]
        m = re.fullmatch(f"{_CLOCK} --> {_CLOCK}", lines[0])
        assert m, block
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), "\n".join(lines[1:]).rstrip("\n")))
    return cues


def assert_openai_error(body: dict, status: int, code: str | None = None, param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    expected_type = "invalid_request_error" if status < 500 and status != 429 else None
    if expected_type:
        assert body["error"]["type"] == expected_type, body


# -- the fields ----------------------------------------------------------------------------------------------
def _request(**form) -> TranscriptionRequest:
    return TranscriptionRequest.from_form({"model": MODEL, **form}, MODEL)


def test_fields_accepted_and_defaults():
    r = _request()
    assert (r.response_format, r.stream, r.prompt, r.max_new_tokens) == ("json", False, None, None)
    r = _request(language="EN", temperature="0.0", stream="true", response_format="text", max_new_tokens="7")
    assert (r.stream, r.response_format, r.max_new_tokens) == (True, "text", 7)
    for language in ("en", "en-US", "english", "eng"):
        assert _request(language=language).language == language
    assert _request(**{"timestamp_granularities[]": "segment"}).model == MODEL
    assert _request(prompt="Write it down: <|audioplaceholder|>").prompt == "Write it down: <|audioplaceholder|>"
    assert _request(unknown_field="x", include="logprobs").model == MODEL  # other fields are ignored


@pytest.mark.parametrize(
    "form, status, param, code",
    [
        ({"model": ""}, 400, "model", "missing"),
        ({"model": "whisper-1"}, 404, "model", "model_not_found"),
        ({"response_format": "diarized_json"}, 400, "response_format", "unsupported_value"),
        ({"language": "de"}, 400, "language", "unsupported_language"),
        ({"temperature": "0.2"}, 400, "temperature", "unsupported_value"),
        ({"temperature": "warm"}, 400, "temperature", "invalid_value"),
        ({"stream": "maybe"}, 400, "stream", "invalid_value"),
        ({"stream": "true", "response_format": "srt"}, 400, "stream", "unsupported_value"),
        ({"timestamp_granularities[]": "word"}, 400, "timestamp_granularities", "unsupported_value"),
        ({"max_new_tokens": "2.5"}, 400, "max_new_tokens", "invalid_value"),
    ],
)
def test_fields_refused(form, status, param, code):
    with pytest.raises(APIError) as e:
        TranscriptionRequest.from_form({"model": MODEL, **form}, MODEL)
    assert (e.value.status, e.value.param, e.value.code) == (status, param, code)
    assert set(e.value.body()["error"]) == ERROR_KEYS


# -- the error table -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, status, retry",
    [
        (Overloaded("full"), 429, True),
        (ServerBusyError("queue full"), 503, True),
        (ServerUnreachableError("down"), 503, True),
        (ModelNotReadyError("not loaded"), 503, True),
        (BackendUnavailable("loading"), 503, True),
        (RequestTimeoutError("slow"), 504, False),
        (InputError("bad budget"), 400, False),
        (AudioError("/tmp/x.wav", "file is empty (0 bytes)"), 400, False),
        (
            InferenceError("Triton at h:1 (canary_qwen): AUDIO is 50.0 s long, over this server's 40 s limit"),
            400,
            False,
        ),
        (ModelFailedError("Triton at h:1 (canary_qwen): llm decoding failed: boom"), 502, False),
        (RequestTimeout("the local engine: no answer"), 504, False),
        (EngineFailed("openai-engine failed: boom"), 500, False),
        (RuntimeError("a bug"), 500, False),
    ],
)
def test_error_table(error, status, retry):
    """Statuses by the error's type alone."""
    e = api_error(error)
    assert e.status == status
    assert ("Retry-After" in e.headers()) == retry
    assert set(e.body()["error"]) == ERROR_KEYS
    if isinstance(error, AudioError):
        assert "/tmp/x.wav" not in e.message  # the server's temporary path is not shown
    if isinstance(error, RuntimeError):
        assert "a bug" not in e.message  # a bug's details stay in the server's log


# -- response formats ----------------------------------------------------------------------------------------------
def _transcript() -> Transcript:
    segments = [
        Segment(0, 0, 0.0, 39.59, "first window\r\nwith a break", [1, 2]),
        Segment(1, 3959, 39.59, 41.0, "", []),
        Segment(2, 4100, 41.0, 3725.25, "last --> one", [3]),
    ]
    return Transcript(text="first window\r\nwith a break last --> one", duration_s=3725.25, segments=segments)


def test_formats():
    t = _transcript()
    body, media = render(t, "json")
    assert media == "application/json" and json.loads(body)["text"] == t.text
    body, media = render(t, "text")
    assert media.startswith("text/plain") and body == t.text
    verbose = json.loads(render(t, "verbose_json")[0])
    assert verbose["duration"] == 3725.25 and verbose["language"] == "english" and len(verbose["segments"]) == 3
    assert [s["text"] for s in verbose["segments"]] == [s.text for s in t.segments]
    srt = parse_cues(render(t, "srt")[0], "srt")
    assert srt == [(0.0, 39.59, "first window\nwith a break"), (41.0, 3725.25, "last -> one")]
    assert "01:02:05,250" in render(t, "srt")[0]
    vtt = parse_cues(render(t, "vtt")[0], "vtt")
    assert vtt == srt and "01:02:05.250" in render(t, "vtt")[0]
    assert cue_text("a\n\n\n b") == "a\nb"


# -- the streaming multipart parse -----------------------------------------------------------------------------------
def _multipart(fields: dict[str, str], file: bytes | None, boundary: str = "b0undary") -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    if file is not None:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        out += file + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def _chunks(data: bytes, size: int, seen: list[int]):
    for i in range(0, len(data), size):
        seen.append(i + size)
        yield data[i : i + size]


def _parse(body: bytes, max_bytes: int, headers: dict | None = None, chunk: int = 1000):
    seen: list[int] = []
    headers = headers or {"content-type": "multipart/form-data; boundary=b0undary"}
    upload = asyncio.run(read_upload(headers, _chunks(body, chunk, seen), max_bytes=max_bytes))
    return upload, seen


def test_upload_goes_to_disk_and_fields_to_memory():
    audio = bytes(range(256)) * 40
    upload, _ = _parse(_multipart({"model": MODEL, "prompt": "héllo"}, audio), 1 << 20, chunk=777)
    try:
        assert upload.fields == {"model": MODEL, "prompt": "héllo"}
        assert upload.path is not None and upload.path.read_bytes() == audio and upload.size == len(audio)
        assert upload.filename == "clip.wav" and upload.path.suffix == ".wav"
        folder = upload.path.parent
    finally:
        upload.close()
    assert not folder.exists()


def test_upload_over_the_limit_is_refused_while_it_streams():
    body = _multipart({"model": MODEL}, b"\0" * 200_000)
    with pytest.raises(APIError) as e:
        _parse(body, 50_000)
    assert e.value.status == 413 and e.value.code == "file_too_large" and e.value.close_connection
    seen: list[int] = []

    async def run():
        await read_upload(
            {"content-type": "multipart/form-data; boundary=b0undary"},
            _chunks(body, 1000, seen),
            max_bytes=50_000,
        )

    with pytest.raises(APIError):
        asyncio.run(run())
    assert max(seen) <= 51_000  # stopped reading at the limit, not at the end of the body
    with pytest.raises(APIError) as e:  # a Content-Length over the limit: refused before reading
        _parse(body, 50_000, {"content-type": "multipart/form-data; boundary=b0undary", "content-length": "200000"})
    assert e.value.status == 413


@pytest.mark.parametrize(
    "headers, body, code",
    [
        ({"content-type": "application/json"}, b"{}", "invalid_body"),
        ({"content-type": "multipart/form-data"}, b"", "invalid_body"),  # no boundary
        ({"content-type": "multipart/form-data; boundary=b0undary"}, b"--b0undary\r\nbroken", "invalid_multipart"),
    ],
)
def test_upload_not_a_form(headers, body, code):
    with pytest.raises(APIError) as e:
        _parse(body, 1 << 20, headers)
    assert e.value.status == 400 and e.value.code == code


def test_upload_field_bounds():
    with pytest.raises(APIError) as e:
        _parse(_multipart({"prompt": "x" * 100_000}, b"abc"), 1 << 20)
    assert e.value.param == "prompt"
    with pytest.raises(APIError):
        _parse(_multipart({f"f{i}": "1" for i in range(100)}, b"abc"), 1 << 20)
    body = _multipart({"model": MODEL}, b"abc")
    body = body.replace(b"--b0undary--", _multipart({}, b"again")[: -len("--b0undary--\r\n")] + b"--b0undary--")
    with pytest.raises(APIError) as e:
        _parse(body, 1 << 20)
    assert "one 'file' part" in e.value.message
