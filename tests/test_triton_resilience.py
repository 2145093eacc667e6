"""Serving that survives, on the REAL bundled tritonserver with the tiny export: concurrent streams over several
server runs, cancelled streams, a dead model process under `serve --no-restart`, a killed `serve`, two servers with one killed mid-run,
bounded queues and limits, the load test. About 90 s on 2 cores (a server start ~3 s, a clean stop ~3 s)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import HAVE_TRITON, NO_TRITON, make_clip, needs_server, running_server, stream_counts, wait_for_counts
from test_openai_support import transcribe_json

import canary_qwen
from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.cli import main
from canary_qwen.client.errors import InferenceError, RequestTimeoutError, ServerBusyError, ServerUnreachableError
from canary_qwen.client.triton import TritonClient
from canary_qwen.serving.onnx_flavor import generate_onnx_repo
from canary_qwen.serving.processes import python_stubs
from canary_qwen.serving.server import DEAD_STUB_EXIT

pytestmark = pytest.mark.triton

MAX_AUDIO_S = 8.0
MAX_QUEUE = 16
TOKEN_LIMIT = 4096  # long decodes make cancellation and failover measurable
STREAMS = 16


@pytest.fixture(scope="module")
def repo(tiny_export, tmp_path_factory):
    return generate_onnx_repo(
        tiny_export,
        tmp_path_factory.mktemp("resilience") / "repo",
        max_batch=8,
        queue_delay_us=20000,
        bounds=RequestBounds(max_audio_s=MAX_AUDIO_S, max_queue=MAX_QUEUE, max_new_tokens_limit=TOKEN_LIMIT),
    )


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, repo.parent / "server") as s:
        yield s
        assert s.stop() == 0  # in time: every request of the tests below was closed, refused ones too


@pytest.fixture(scope="module")
def local(tiny_export):
    return OnnxBackend(tiny_export)


@pytest.fixture(scope="module")
def clips():
    return [make_clip(0.4 + 0.45 * i, 500 + i) for i in range(STREAMS)]


@pytest.fixture(scope="module")
def expected(local, clips):
    return [t.text for t in local.transcribe(clips)]


def _stream_text(url, protocol, clip, **kwargs):
    with TritonClient(url, protocol, timeout_s=60) as client:
        return "".join(client.stream(clip, **kwargs))


@needs_server
def test_concurrent_streams_hold_over_server_runs(repo, clips, expected, tmp_path):
    """16 concurrent streams (gRPC and HTTP, some readers leaving early) on three server runs: every stream's
    pieces join to the reference text and the server stays up (the BLS stream model crashed here)."""
    for run in range(3):
        with running_server(repo, tmp_path / f"run{run}") as server:

            def one(i):
                if i % 5 == 4:  # a reader that leaves after two pieces of a long decode, which must stop
                    with TritonClient(server.grpc_url, "grpc") as client:
                        pieces = client.stream(clips[i], max_new_tokens=TOKEN_LIMIT)
                        next(pieces), next(pieces)
                        pieces.close()
                    return expected[i]
                url, protocol = (server.http_url, "http") if i % 3 == 2 else (server.grpc_url, "grpc")
                return _stream_text(url, protocol, clips[i])

            with ThreadPoolExecutor(STREAMS) as pool:
                assert list(pool.map(one, range(STREAMS))) == expected
            assert server.is_alive() and server.dead_stubs() == []
            assert _stream_text(server.grpc_url, "grpc", clips[0]) == expected[0]
            assert server.stop() == 0  # in time: every stream, cancelled ones too, was closed


@pytest.fixture(scope="module")
def long_decode(local, clips):
    """clips[3] with the whole budget: how many tokens it decodes when nobody stops it."""
    tokens = len(local.transcribe([clips[3]], max_new_tokens=TOKEN_LIMIT)[0].token_ids)
    assert tokens > 1000, "the test needs a clip that decodes long"
    return tokens


@needs_server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_cancelled_stream_stops_decoding(server, clips, long_decode, protocol):
    """A reader that leaves: over gRPC the call is cancelled, over HTTP (generate_stream) the connection closes,
    which Triton 2.51 also turns into a cancellation; either way the stream model ends the request as cancelled,
    with fewer tokens than its whole decode (counted by the model, canary_qwen/serving/models/metrics.py)."""
    url = server.grpc_url if protocol == "grpc" else server.http_url
    before = stream_counts(server)
    with TritonClient(url, protocol, timeout_s=60) as client:
        pieces = client.stream(clips[3], max_new_tokens=TOKEN_LIMIT)
        next(pieces), next(pieces)
        pieces.close()  # cancels the request: its decode must stop
        after = wait_for_counts(lambda: stream_counts(server), lambda c: c["cancelled"] > before["cancelled"])
        assert "".join(client.stream(clips[1], max_new_tokens=3))  # and the model serves on
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["finished"] == before["finished"] and after["failed"] == before["failed"]
    assert 2 <= after["tokens"] - before["tokens"] < long_decode


@needs_server
def test_over_limit_requests_are_refused_and_a_full_queue_says_busy(server, clips):
    with TritonClient(server.grpc_url, "grpc") as client:
        with pytest.raises(InferenceError, match=f"MAX_NEW_TOKENS must be between 1 and {TOKEN_LIMIT}"):
            client.transcribe(clips[0], max_new_tokens=TOKEN_LIMIT + 1)
        with pytest.raises(InferenceError, match="over this server's 8 s limit"):
            list(client.stream(np.zeros(int(9 * 16000), np.float32)))

        def flood(i):
            try:
                return _stream_text(server.grpc_url, "grpc", clips[i % 4], max_new_tokens=30)
            except ServerBusyError as e:
                return e

        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(flood, range(48)))
        busy = [r for r in results if isinstance(r, ServerBusyError)]
        assert busy and "Exceeds maximum queue size" in str(busy[0]) and server.grpc_url in str(busy[0])
        assert all(isinstance(r, str) for r in results if not isinstance(r, ServerBusyError))
        assert _stream_text(server.grpc_url, "grpc", clips[0], max_new_tokens=5)  # and it serves on


@needs_server
def test_two_servers_one_killed_mid_run_every_clip_gets_its_answer(repo, local, clips, expected, tmp_path):
    with running_server(repo, tmp_path / "a") as a, running_server(repo, tmp_path / "b") as b:
        client = TritonClient(f"{a.grpc_url},{b.grpc_url}", "grpc", timeout_s=30)
        try:
            budget = 600
            want = local.transcribe([clips[2]], max_new_tokens=budget)[0].text
            stream = client.stream(clips[2], max_new_tokens=budget)  # the first request goes to server a
            got = next(stream) + next(stream)
            assert client.transcribe_many(clips[:4], concurrency=2) == expected[:4]
            assert _answered(a) > 0 and _answered(b) > 0  # requests are spread over both
            many = []
            worker = threading.Thread(target=lambda: many.extend(client.transcribe_many(clips, concurrency=6)))
            worker.start()
            time.sleep(0.3)
            os.killpg(a.process.pid, signal.SIGKILL)  # a dies with requests and a stream in flight
            got += "".join(stream)
            worker.join(60)
        finally:
            client.close()
    assert got == want
    assert many == expected


@needs_server
def test_grpc_calls_give_up_after_the_timeout(server, clips):
    os.kill(server.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        with TritonClient(server.grpc_url, "grpc", timeout_s=2) as client:
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError, match=server.grpc_url):
                client.transcribe(clips[0])  # the health check first: it gave up after 40 s and more before
            assert time.monotonic() - start < 5
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    with TritonClient(server.grpc_url, "grpc") as client:
        assert client.transcribe(clips[0], max_new_tokens=3)


def _serve(repo, work_dir, *args):
    """`canary-qwen serve ARGS` in a process of its own, started: (process, HTTP address, gRPC address)."""
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    code = "import sys; from canary_qwen.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "serve", "--repo", str(repo), "--work-dir", str(work_dir), *args]
    env = {**os.environ, "PYTHONPATH": str(Path(canary_qwen.__file__).parent.parent)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    grpc = next(line.split()[1] for line in lines if line.strip().startswith("gRPC"))
    http = next(line.split()[1] for line in lines if line.strip().startswith("HTTP"))
    return proc, http, grpc


@needs_server
def test_an_http_stream_cut_by_a_dying_server_is_an_error_not_a_short_transcript(repo, clips, tmp_path):
    """tritonserver SIGKILLed while it streams over HTTP: the text so far must not come back as the answer."""
    with running_server(repo, tmp_path / "server") as server:
        with TritonClient(server.http_url, "http", timeout_s=60) as client:
            pieces = client.stream(clips[-1], max_new_tokens=TOKEN_LIMIT)
            got = [next(pieces)]  # streaming has begun
            os.kill(server.process.pid, signal.SIGKILL)
            with pytest.raises(ServerUnreachableError):
                got.extend(pieces)


@needs_server
def test_serve_no_restart_exits_when_a_model_process_dies_and_in_flight_callers_hear_at_once(repo, clips, tmp_path):
    """`--no-restart` (for supervisors that restart on their own): serve stops the server and exits with code 3;
    tests/test_serve_restart.py has the default, restarting."""
    proc, http, grpc = _serve(repo, tmp_path, "--no-restart")
    try:
        triton = next(pid for pid in _children(proc.pid))
        stubs = {s.model: s for s in python_stubs(triton)}
        assert {"encoder", "llm", "canary_qwen_stream"} <= set(stubs)
        outcome = {}

        def in_flight(kind):
            try:
                with TritonClient(grpc, "grpc", timeout_s=60) as client:
                    if kind == "stream":
                        "".join(client.stream(clips[5], max_new_tokens=TOKEN_LIMIT))
                    else:
                        client.transcribe(clips[5], max_new_tokens=TOKEN_LIMIT)
                outcome[kind] = ("answered", time.monotonic())
            except Exception as e:
                outcome[kind] = (type(e).__name__, time.monotonic())

        threads = [threading.Thread(target=in_flight, args=(k,)) for k in ("stream", "infer")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed = time.monotonic()
        os.kill(stubs["llm"].pid, signal.SIGKILL)
        os.kill(stubs["canary_qwen_stream"].pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == DEAD_STUB_EXIT
        for t in threads:
            t.join(30)
        stderr = proc.stderr.read()
        assert "python process of model instance" in stderr and "restarts are off (--no-restart)" in stderr
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=2)
        for kind, (result, at) in outcome.items():  # a 4096-token decode takes far longer than this
            assert result != "answered" and at - killed < 10, (kind, result, at - killed)
        assert time.monotonic() - killed < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_server
def test_a_killed_serve_leaves_no_server_and_no_shared_memory(repo, tmp_path):
    proc, http, _ = _serve(repo, tmp_path)
    triton = next(pid for pid in _children(proc.pid))
    prefix = f"canary_qwen_{proc.pid}_"
    assert list(Path("/dev/shm").glob(prefix + "*"))
    proc.kill()  # SIGKILL: serve cleans up nothing itself
    proc.wait()
    deadline = time.monotonic() + 30
    while _alive(triton) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(triton), "tritonserver outlived serve"
    assert not list(Path("/dev/shm").glob(prefix + "*"))
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{http}/v2/health/live", timeout=2)


@needs_server
def test_load_command_reports_latencies_and_answers_that_differ(server, clips, tiny_export, tmp_path, capsys):
    """Every answer (plain and streamed, text and token ids) checked against `transcribe --json`; a reference
    that does not hold is reported per mode and fails the run."""
    files = [str(tmp_path / f"{i}.wav") for i in range(4)]
    for path, clip in zip(files, clips):
        sf.write(path, clip, 16000, subtype="FLOAT")
    reference = tmp_path / "reference.jsonl"
    reference.write_text(transcribe_json(files, "onnx", tiny_export))
    argv = ["client", "loadtest", "--url", server.grpc_url, "--concurrency", "4", "--duration", "2", "--json"]
    assert main([*argv, "--reference", str(reference), *files]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == {} and report["ok"] >= 4 and report["streams"] >= 2
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] and report["first_piece_ms"]["p50"] > 0
    assert report["compared"]["unary"] + report["compared"]["stream"] == report["ok"] and not report["mismatches"]
    rows = [json.loads(line) for line in reference.read_text().splitlines()]
    rows[0]["token_ids"] = rows[0]["token_ids"][:-1]  # one file's reference one token short
    reference.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv, "--reference", str(reference), *files]) == 1
    report = json.loads(capsys.readouterr().out)
    assert sum(report["mismatches"].values()) > 0 and not report["errors"]


def _answered(server) -> float:
    """Requests the ensemble has answered (Triton's metrics)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    return float(re.search(r'^nv_inference_count\{model="canary_qwen",version="1"\} (\S+)$', text, re.M).group(1))


def _stat(pid) -> list[str]:
    """/proc/PID/stat fields after the command name: state, ppid, ... ([] once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _stat(p.name)[1:2] == [str(pid)]]


def _alive(pid) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"], ["X"])
