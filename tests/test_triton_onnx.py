"""The onnx-flavour Triton repository on the REAL bundled tritonserver, and the client.

One tiny export, one generated repository (moved after generation: it must be relocatable), one
server for the module. Texts are compared with the local ONNX Runtime backend. Runs in ~40 s on
2 cores (server start ~4 s, clean stop ~3 s).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import make_clip, needs_server, perf_analyzer, plain_infer, read_bounds, running_server

from canary_qwen.backends.base import Transcription
from canary_qwen.backends.onnx_runtime import OnnxBackend
from canary_qwen.bounds import RequestBounds
from canary_qwen.cli.client import add_client_parser
from canary_qwen.client.backend import TritonBackend
from canary_qwen.client.errors import InferenceError, ModelNotReadyError, ServerUnreachableError
from canary_qwen.client.transports import server_client
from canary_qwen.client.triton import TritonClient
from canary_qwen.errors import InputError
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving import onnx_flavor
from canary_qwen.serving.checks import TextStream, check_audio, encode_prompt
from canary_qwen.serving.config_check import check_ensemble, parse_model_config
from canary_qwen.serving.onnx_flavor import generate_onnx_repo
from canary_qwen.serving.repo_files import REPO_INFO
from canary_qwen.serving.server import free_ports

pytestmark = pytest.mark.triton


MAX_AUDIO_S = 8.0  # small, so the too-long request is cheap to send
MAX_BATCH = 8
QUEUE_DELAY_US = 20000  # generous so concurrent requests really meet in the batchers on a slow CI machine


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def local(export_dir):
    return OnnxBackend(export_dir)


@pytest.fixture(scope="module")
def repo(export_dir, tmp_path_factory):
    built = generate_onnx_repo(
        export_dir,
        tmp_path_factory.mktemp("build") / "repo",
        max_batch=MAX_BATCH,
        queue_delay_us=QUEUE_DELAY_US,
        bounds=RequestBounds(max_audio_s=MAX_AUDIO_S),
    )
    moved = tmp_path_factory.mktemp("served") / "repo"
    shutil.move(str(built), str(moved))  # the served repository has been moved: nothing may point back
    return moved


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, repo.parent / "server") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    client = TritonClient(server.http_url, "http")
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = TritonClient(server.grpc_url, "grpc")
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(local, clips):
    return [local.transcribe([c])[0] for c in clips]


def raw_http_infer(url, audio: np.ndarray, datatype: str = "FP32", model: str = "canary_qwen"):
    """A request the friendly client would refuse to send, through plain tritonclient."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    try:
        inp = httpclient.InferInput("AUDIO", [1, audio.size], datatype)
        inp.set_data_from_numpy(audio.reshape(1, -1))
        return client.infer(model, [inp]).as_numpy("TEXT")
    finally:
        client.close()


def metric(server, name: str, model: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}\{{model="{model}",version="1"\}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in metrics"
    return float(m.group(1))


# -- the repository, offline -------------------------------------------------------------------------
def test_every_config_parses_and_the_ensemble_is_wired(repo, export_dir):
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert names == sorted(onnx_flavor.MODEL_NAMES)
    for name in names:
        cfg = parse_model_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.max_batch_size == MAX_BATCH
        assert (repo / name / "1").is_dir()
    assert check_ensemble(repo) == []

    enc = parse_model_config(repo / "encoder" / "config.pbtxt")
    assert enc.backend == "python" and enc.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
    assert enc.input[0].name == "AUDIO" and enc.input[0].allow_ragged_batch
    assert list(enc.output[0].dims) == [-1, 64]  # the tiny model's hidden size
    llm = parse_model_config(repo / "llm" / "config.pbtxt")
    assert {i.name: (i.allow_ragged_batch, i.optional) for i in llm.input} == {
        "PROMPT_IDS": (True, False),
        "EMBEDDINGS": (True, False),
        "MAX_NEW_TOKENS": (False, True),
    }
    assert not llm.model_transaction_policy.decoupled
    for name in names:  # bounded queues everywhere (the defaults of generate_onnx_repo)
        if name != "canary_qwen":
            policy = parse_model_config(repo / name / "config.pbtxt").dynamic_batching.default_queue_policy
            assert (policy.max_queue_size, policy.default_timeout_microseconds) == (64, 60_000_000), name
    assert read_bounds(repo / "llm").max_new_tokens_limit == 512
    ens = parse_model_config(repo / "canary_qwen" / "config.pbtxt")
    assert ens.platform == "ensemble"
    assert [(i.name, i.optional) for i in ens.input] == [("AUDIO", False), ("PROMPT", True), ("MAX_NEW_TOKENS", True)]
    assert [o.name for o in ens.output] == ["TEXT", "OUTPUT_IDS"]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocessing", "encoder", "llm", "postprocessing"]
    stream = parse_model_config(repo / "canary_qwen_stream" / "config.pbtxt")
    assert stream.model_transaction_policy.decoupled and stream.input[0].allow_ragged_batch
    assert [i.name for i in stream.input] == [i.name for i in ens.input] and [o.name for o in stream.output] == [
        "TEXT",
        "OUTPUT_IDS",
    ]
    assert read_bounds(repo / "canary_qwen_stream").max_audio_s == MAX_AUDIO_S

    # relocatable: no absolute paths; artifacts live in the version folders (hard links of the export)
    for cfg_file in repo.glob("*/config.pbtxt"):
        assert "/" not in cfg_file.read_text().replace("</", "")
    enc_file = repo / "encoder" / "1" / "encoder.onnx"
    assert enc_file.is_file() and (repo / "encoder" / "1" / "model.py").is_file()
    assert os.path.samefile(enc_file, export_dir / "encoder.onnx")
    assert (repo / "llm" / "1" / "decoder.onnx").stat().st_ino == (
        repo / "canary_qwen_stream" / "1" / "decoder.onnx"
    ).stat().st_ino
    assert (repo / "postprocessing" / "1" / "tokenizer" / "tokenizer.json").is_file()
    info = json.loads((repo / REPO_INFO).read_text())
    assert info["flavor"] == "onnx" and info["settings"]["max_audio_s"] == MAX_AUDIO_S and info["files"]["linked"] > 0


def test_generate_arguments_and_regeneration(export_dir, tmp_path):
    out = generate_onnx_repo(export_dir, tmp_path / "repo")
    assert (out / "canary_qwen_stream").is_dir()
    (out / "unrelated").mkdir()
    (out / "llm_stream").mkdir()  # a model of an older repository
    out = generate_onnx_repo(export_dir, out, max_batch=4, instances=3, queue_delay_us=500, decoupled_streaming=False)
    assert not (out / "canary_qwen_stream").exists() and not (out / "llm_stream").exists()  # stale ones removed
    assert (out / "unrelated").is_dir()  # folders it does not own are left alone
    for name in ("encoder", "llm"):
        cfg = parse_model_config(out / name / "config.pbtxt")
        assert cfg.max_batch_size == 4 and cfg.instance_group[0].count == 3
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert read_bounds(out / "preprocessing").max_audio_s == 40.0  # the export's
    assert check_ensemble(out) == []
    with pytest.raises(ValueError, match="max_batch"):
        generate_onnx_repo(export_dir, tmp_path / "bad", max_batch=0)
    with pytest.raises(ValueError, match="over max_new_tokens_limit 512"):
        RequestBounds(max_new_tokens=600)
    bounds = RequestBounds(max_queue=3, queue_timeout_s=0, max_new_tokens_limit=40, max_new_tokens=20)
    out = generate_onnx_repo(export_dir, out, bounds=bounds)
    for name in ("preprocessing", "encoder", "llm", "postprocessing", "canary_qwen_stream"):
        policy = parse_model_config(out / name / "config.pbtxt").dynamic_batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (3, 0), name
    with pytest.raises(Exception, match="not an export directory"):
        generate_onnx_repo(tmp_path, tmp_path / "bad")


# -- shared model logic, offline -----------------------------------------------------------------------
def test_text_stream_pieces_join_to_the_stripped_text(export_dir):
    tok = QwenTokenizer(export_dir / "tokenizer", "<|audioplaceholder|>")
    rng = np.random.default_rng(0)
    space = tok.encode(" ")
    sequences = [space + tok.encode(" hello world ") + space, tok.encode("héllo wörld"), []]
    sequences += [rng.integers(0, len(tok) - 1, n).tolist() for n in (1, 5, 40, 128)]
    for ids in sequences:
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids] + [stream.finish()]
        assert "".join(pieces) == tok.decode(ids).strip(), ids
    stream = TextStream(tok)  # whitespace is held back, never sent first or last
    pieces = [stream.push(i) for i in space + tok.encode("a b ") + space]
    assert pieces[0] == "" and pieces[-1] == "" and "".join(pieces) == "a b" and stream.finish() == ""


def test_check_audio_messages():
    ok = np.zeros(1600, np.float32)
    assert check_audio(ok, 1.0).shape == (1, 1600)
    for bad, message in [
        (np.zeros((1, 0), np.float32), "empty"),
        (np.zeros(16001, np.float32), r"1\.0 s long.*over this server's 1 s limit"),
        (np.array([0, np.nan, np.inf], np.float32), "2 NaN/inf samples"),
        (np.zeros(10, np.float64), "must be float32"),
        (np.zeros(319, np.float32), r"319 samples long; send at least 320 \(20 ms"),
        (np.full(1600, 3e4, np.float32), r"samples up to 30000; send float32 audio in \[-1, 1\]"),
    ]:
        with pytest.raises(InputError, match=message):
            check_audio(bad, 1.0)
    assert check_audio(np.full(320, 1.5, np.float32), 1.0).shape == (1, 320)  # 20 ms, a little over 1: accepted


def test_a_huge_prompt_is_refused_before_it_is_tokenized():
    with pytest.raises(InputError, match="70000 characters long, far over the 1024-token limit"):
        encode_prompt(None, "x" * 70_000)  # no tokenizer: it must not be reached


# -- the running server ------------------------------------------------------------------------------
@needs_server
def test_ensemble_http_matches_local_backend(http, clips, expected):
    assert [http.transcribe(c) for c in clips] == [e.text for e in expected]


@needs_server
def test_ensemble_grpc_budgets_and_token_ids_match_local(server, local, clips):
    backend = TritonBackend(server.grpc_url, "grpc")
    try:
        budgets = [5, 17, 128, 1]
        got = backend.transcribe(clips, max_new_tokens=budgets)
        want = local.transcribe(clips, max_new_tokens=budgets)
        assert [(g.text, g.token_ids) for g in got] == [(w.text, w.token_ids) for w in want]
        assert all(len(g.token_ids) <= b for g, b in zip(got, budgets))
        assert backend.name == "triton" and isinstance(got[0], Transcription)
    finally:
        backend.close()


@needs_server
def test_one_request_with_several_rows(server, local, clips):
    import tritonclient.http as httpclient

    x = np.stack([clips[0][:16000], clips[2][:16000]])  # the rows of one request share a length
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        audio = httpclient.InferInput("AUDIO", list(x.shape), "FP32")
        audio.set_data_from_numpy(x)
        budget = httpclient.InferInput("MAX_NEW_TOKENS", [2, 1], "INT32")
        budget.set_data_from_numpy(np.array([[5], [9]], np.int32))
        result = client.infer("canary_qwen", [audio, budget])
    finally:
        client.close()
    want = local.transcribe(list(x), max_new_tokens=[5, 9])
    assert [t[0].decode() for t in result.as_numpy("TEXT")] == [w.text for w in want]
    assert result.as_numpy("OUTPUT_IDS").shape == (2, 9)


@needs_server
def test_custom_prompt_matches_local(http, grpc, local, clips):
    prompt = "Write down what is said: <|audioplaceholder|> please."
    want = local.transcribe(clips[:2], prompt=prompt)
    assert [http.transcribe(c, prompt) for c in clips[:2]] == [w.text for w in want]
    assert "".join(grpc.stream(clips[1], prompt)) == want[1].text


@needs_server
def test_stream_pieces_join_to_the_same_text_grpc_and_http(grpc, http, clips, expected):
    for clip, want in zip(clips[:3], expected):
        pieces = list(grpc.stream(clip))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == want.text
    pieces = list(http.stream(clips[3]))  # server-sent events through generate_stream
    assert len(pieces) > 1 and "".join(pieces) == expected[3].text
    assert "".join(grpc.stream(clips[0], max_new_tokens=3)) == grpc.transcribe(clips[0], max_new_tokens=3)
    for client in (grpc, http):  # each piece comes with the ids that made it
        pieces = list(client.stream_with_ids(clips[2]))
        assert "".join(p for p, _ in pieces) == expected[2].text
        assert [i for _, ids in pieces for i in ids] == expected[2].token_ids
    stream = grpc.stream(clips[2])  # a reader that stops early cancels its request
    assert next(stream) and next(stream)
    stream.close()
    assert "".join(grpc.stream(clips[1])) == expected[1].text


@needs_server
def test_32_concurrent_clients_get_their_own_answers(server, local):
    clips = [make_clip(0.5 + 0.3 * (i % 8), 100 + i % 8) for i in range(32)]
    want = {i: local.transcribe([clips[i]])[0].text for i in range(8)}
    before = {
        (m, k): metric(server, k, m)
        for m in ("encoder", "llm")
        for k in ("nv_inference_exec_count", "nv_inference_count")
    }
    clients = [
        TritonClient(server.http_url if i % 2 else server.grpc_url, "http" if i % 2 else "grpc") for i in range(32)
    ]

    def work(i):
        if i % 8 == 7:  # a few streams among them
            return "".join(clients[i].stream(clips[i]))
        return clients[i].transcribe(clips[i])

    try:
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(work, range(32)))
    finally:
        for c in clients:
            c.close()
    assert got == [want[i % 8] for i in range(32)]
    for model, n in (("encoder", 28), ("llm", 28)):  # the 4 streams run whole in canary_qwen_stream
        runs = metric(server, "nv_inference_exec_count", model) - before[model, "nv_inference_exec_count"]
        requests = metric(server, "nv_inference_count", model) - before[model, "nv_inference_count"]
        assert requests == n and runs < requests, f"no dynamic batching: {runs} {model} runs for {requests} requests"


@needs_server
def test_transcribe_many_orders_results(http, clips, expected):
    assert http.transcribe_many(clips, concurrency=3) == [e.text for e in expected]
    results = http.transcribe_many([clips[0], np.zeros(0, np.float32)], return_exceptions=True)
    assert results[0] == expected[0].text and isinstance(results[1], InferenceError)


@needs_server
def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(server, http, grpc, clips, expected):
    from tritonclient.utils import InferenceServerException

    long_clip = np.zeros(int((MAX_AUDIO_S + 0.5) * 16000), np.float32)
    nan_clip = clips[0].copy()
    nan_clip[[5, 99]] = [np.nan, np.inf]
    cases = [
        (np.zeros(0, np.float32), r"AUDIO is empty \(0 samples\)"),
        (nan_clip, "AUDIO contains 2 NaN/inf samples"),
        (long_clip, r"AUDIO is 8\.5 s long .* over this server's 8 s limit"),
    ]
    for client in (http, grpc):
        for audio, message in cases:
            with pytest.raises(InferenceError, match=message) as info:
                client.transcribe(audio)
            assert server.http_url in str(info.value) or server.grpc_url in str(info.value)
            with pytest.raises(InferenceError, match=message):
                list(client.stream(audio))
    with pytest.raises(InferenceError, match="exactly one audio placeholder"):
        http.transcribe(clips[0], "<|audioplaceholder|> twice <|audioplaceholder|>")
    with pytest.raises(InferenceError, match="MAX_NEW_TOKENS must be between 1 and"):
        grpc.transcribe(clips[0], max_new_tokens=0)
    # wrong dtype: Triton itself refuses it before any model runs
    with pytest.raises(InferenceServerException, match="data-type is 'FP64', but model 'canary_qwen' expects 'FP32'"):
        raw_http_infer(server.http_url, clips[0].astype(np.float64), "FP64")
    # corrupt request: the body holds fewer bytes than the declared shape
    body = json.dumps({"inputs": [{"name": "AUDIO", "shape": [1, 100], "datatype": "FP32", "data": [0.0] * 10}]})
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/canary_qwen/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    body = info.value.read()
    assert info.value.code in (400, 500) and b"shape" in body, body
    # the client refuses what is not float audio before sending it
    with pytest.raises(TypeError, match="to_mono_16k"):
        http.transcribe((clips[0] * 32767).astype(np.int16))

    assert server.is_alive()
    assert http.transcribe(clips[1]) == expected[1].text
    assert "".join(grpc.stream(clips[2])) == expected[2].text


@needs_server
def test_client_errors_name_the_server(server):
    (port,) = free_ports(1)
    for protocol in ("http", "grpc"):
        client = TritonClient(f"127.0.0.1:{port}", protocol, timeout_s=5)
        with pytest.raises(ServerUnreachableError, match=f"127.0.0.1:{port}"):
            client.transcribe(np.zeros(1600, np.float32))
        client.close()
    with pytest.raises(ServerUnreachableError, match=f"127.0.0.1:{port}"):
        TritonBackend(f"http://127.0.0.1:{port}")
    client = TritonClient(server.http_url, model="no_such_model")
    with pytest.raises(ModelNotReadyError, match=r"'no_such_model' is not ready .* it has: .*canary_qwen \(READY\)"):
        client.transcribe(np.zeros(1600, np.float32))
    client.close()
    with pytest.raises(ValueError, match="protocol"):
        TritonClient(server.http_url, "udp")


@needs_server
def test_client_cli(server, clip_files, clips, expected, tmp_path):
    parser = argparse.ArgumentParser(prog="canary-qwen")
    add_client_parser(parser.add_subparsers(dest="command"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk")
    files = [clip_files[0], str(corrupt), clip_files[1], str(tmp_path / "missing.wav")]
    for extra, url in (
        ([], server.http_url),
        (["--stream", "--protocol", "grpc"], server.grpc_url),
        (["--stream"], server.http_url),
    ):
        args = parser.parse_args(["client", "transcribe", "--url", url, *extra, *files])
        out, err = io.StringIO(), io.StringIO()
        assert args.run(args, out=out, err=err) == 1
        # whole-string comparison: random-weight texts hold control characters that splitlines() splits at
        assert out.getvalue() == f"{clip_files[0]}\t{expected[0].text}\n{clip_files[1]}\t{expected[1].text}\n"
        errors = err.getvalue()
        assert "corrupt.wav: not a readable audio file or corrupt" in errors and "missing.wav: file not found" in errors
        assert "2 of 4 files failed" in errors
        # --json: the lines `canary-qwen transcribe --json` prints, token ids included (a stream's: its final ids)
        args = parser.parse_args(["client", "transcribe", "--url", url, "--json", *extra, *files])
        out = io.StringIO()
        assert args.run(args, out=out, err=io.StringIO()) == 1
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        assert rows == [
            {"audio": f, "text": e.text, "token_ids": e.token_ids, "duration_s": round(len(c) / 16000, 3)}
            for f, e, c in zip(clip_files[:2], expected, clips)
        ], extra
    (port,) = free_ports(1)
    args = parser.parse_args(["client", "transcribe", "--url", f"127.0.0.1:{port}", clip_files[0]])
    err = io.StringIO()
    assert args.run(args, out=io.StringIO(), err=err) == 1 and f"127.0.0.1:{port}" in err.getvalue()


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_decoupled_model_is_read_to_its_final_response(server, clips, expected, protocol):
    """How the client drives the trt flavour's ensemble when it streams: one request, responses joined."""
    url = server.http_url if protocol == "http" else server.grpc_url
    with TritonClient(url, protocol, model="canary_qwen_stream") as client:
        assert client.is_decoupled("canary_qwen_stream") and not client.is_decoupled("canary_qwen")
        assert client.transcribe_many(clips[:3], concurrency=3) == [e.text for e in expected[:3]]
        with TritonClient(url, protocol) as ensemble:
            assert client.transcribe(clips[0], max_new_tokens=5) == ensemble.transcribe(clips[0], max_new_tokens=5)


@needs_server
@pytest.mark.parametrize(
    "protocol, local_encoder, llm_model",
    [
        ("http", False, "llm"),
        ("grpc", False, "llm"),
        ("grpc", True, "llm"),
    ],
)
def test_embeddings_mode_gives_the_ensembles_tokens(
    server, export_dir, clips, expected, protocol, local_encoder, llm_model
):
    from canary_qwen.client.embeddings import EmbeddingsClient

    url = server.http_url if protocol == "http" else server.grpc_url
    with EmbeddingsClient(
        url, protocol, export_dir=export_dir, local_encoder=local_encoder, llm_model=llm_model
    ) as client:
        assert not client.decoupled and not client.trt
        for clip, want in zip(clips, expected):
            got = client.transcribe(clip)
            assert got.token_ids == want.token_ids and got.text == want.text


@needs_server
def test_embeddings_mode_finds_the_llm_and_says_when_http_cannot_stream(
    server, export_dir, clips, clip_files, expected
):
    from canary_qwen.client.embeddings import EmbeddingsClient
    from canary_qwen.client.errors import TritonClientError

    with EmbeddingsClient(server.grpc_url, "grpc", export_dir=export_dir) as client:
        assert client.llm_model == "llm"  # no tensorrt_llm on this server
    # any decoupled model (a streaming tensorrt_llm in the trt flavour) is refused over HTTP before a request goes out
    with EmbeddingsClient(server.http_url, "http", export_dir=export_dir, llm_model="canary_qwen_stream") as client:
        with pytest.raises(TritonClientError, match="gRPC streaming"):
            client.transcribe(clips[0])
    parser = argparse.ArgumentParser(prog="canary-qwen")
    add_client_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "client",
            "transcribe",
            "--url",
            server.http_url,
            "--via-embeddings",
            "--artifacts",
            str(export_dir),
            *clip_files[:2],
        ]
    )
    out = io.StringIO()
    assert args.run(args, out=out, err=io.StringIO()) == 0
    assert out.getvalue() == f"{clip_files[0]}\t{expected[0].text}\n{clip_files[1]}\t{expected[1].text}\n"


@needs_server
@pytest.mark.parametrize(
    "protocol, model, streaming",
    [("http", "canary_qwen", False), ("grpc", "canary_qwen", False), ("grpc", "canary_qwen_stream", True)],
)
def test_standard_clients_reach_both_models(server, clips, expected, tmp_path, protocol, model, streaming):
    """tritonclient's plain infer gets the local tokens; perf_analyzer measures the ensemble and the stream model."""
    url = server.http_url if protocol == "http" else server.grpc_url
    if not streaming:
        assert plain_infer(url, protocol, clips[1]) == (expected[1].text, expected[1].token_ids)
    perf_analyzer(url, protocol, model, tmp_path, streaming=streaming)


# -- last: the shared server stops cleanly ---------------------------------------------------------------
@needs_server
def test_server_stops_cleanly(server, http, grpc):
    http.close()
    grpc.close()
    pid = server.process.pid
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 15
    assert not server.is_alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the server and every python stub are gone
    log = server.log_path.read_text()
    assert "successfully unloaded 'llm'" in log and "successfully unloaded 'canary_qwen_stream'" in log


# -- the trt flavour's request, offline ----------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_trtllm_request_matches_the_tensorrt_llm_config(protocol):
    import ml_dtypes
    from tritonclient.grpc import model_config_pb2

    from canary_qwen.client.embeddings import trtllm_request_arrays
    from canary_qwen.serving.trt_models import tensorrt_llm_config

    cfg = parse_model_config(tensorrt_llm_config(engine_dir="/engines/llm", max_batch=8, engine_dtype="bfloat16"))
    spec = {i.name: i for i in cfg.input}
    frames = np.random.default_rng(0).standard_normal((7, 2048)).astype(np.float32)
    prompt = [151644, 872, 198, 151669, 151645, 198]
    arrays, request = trtllm_request_arrays(
        prompt, frames, placeholder_id=151669, end_id=151645, pad_id=151643, vocab_size=151936, max_new_tokens=64
    )
    inputs = server_client("127.0.0.1:1", protocol)._infer_inputs(arrays)  # what the client puts on the wire
    by_name = {i.name(): i for i in inputs}
    required = {n for n, i in spec.items() if not i.optional}
    assert required <= set(by_name), f"missing required inputs {required - set(by_name)}"
    for name, inp in by_name.items():
        assert name in spec, name
        assert "TYPE_" + inp.datatype() == model_config_pb2.DataType.Name(spec[name].data_type), name
        dims = list(spec[name].dims)
        shape = inp.shape()
        assert shape[0] == 1 and len(shape[1:]) == len(dims), (name, shape, dims)
        assert all(d == -1 or d == s for d, s in zip(dims, shape[1:])), (name, shape, dims)
    assert by_name["prompt_embedding_table"].datatype() == "BF16" and by_name["input_ids"].datatype() == "INT32"
    assert request.input_ids.tolist() == [151644, 872, 198, *range(151936, 151943), 151645, 198]
    assert request.prompt_vocab_size == 7
    np.testing.assert_array_equal(request.prompt_embedding_table, frames.astype(ml_dtypes.bfloat16))
    assert (request.prompt_table_extra_ids[3:10] == request.extra_id).all() and request.prompt_table_extra_ids[
        :3
    ].sum() == 0
