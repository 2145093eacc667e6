"""The bundled tritonserver really runs python-backend models: plain, ensemble and decoupled streaming.

Also the offline config checks (these need tritonclient only). One shared server plus a few short
lived ones keeps the file around 30 s on 2 cores (start ~2 s, clean stop ~3-4 s each).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_server, running_server

from canary_qwen.serving import bundled
from canary_qwen.serving.bundled import TritonNotFoundError, find_bundled_triton, prepare_backend_dir
from canary_qwen.serving.config_check import ModelConfigError, check_ensemble, parse_model_config
from canary_qwen.serving.server import TritonServer, TritonStartError

pytestmark = pytest.mark.triton


ADD_ONE_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ADD_ONE_PY = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x + 1)]))
        return responses
"""
STREAM_CONFIG = """
name: "count_up"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "VALUE" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
STREAM_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy()[0])
            for i in range(n):
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("VALUE", np.array([i], np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""
ENSEMBLE_CONFIG = """
name: "add_two"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
ensemble_scheduling {
  step [
    { model_name: "add_one" model_version: -1 input_map { key: "INPUT0" value: "X" } output_map { key: "OUTPUT0" value: "mid" } },
    { model_name: "add_one" model_version: -1 input_map { key: "INPUT0" value: "mid" } output_map { key: "OUTPUT0" value: "Y" } }
  ]
}
"""
BROKEN_PY = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("deliberately broken model")

    def execute(self, requests):
        return []
"""


def add_model(repo: Path, name: str, config: str, model_py: str | None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    if model_py is not None:
        (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton_repo")
    add_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_PY)
    add_model(repo, "count_up", STREAM_CONFIG, STREAM_PY)
    add_model(repo, "add_two", ENSEMBLE_CONFIG, None)  # an ensemble still needs its empty version folder
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, repo.parent / "server1", startup_timeout=60) as s:
        yield s


def http_add_one(url: str, model: str = "add_one", input_name: str = "INPUT0", output_name: str = "OUTPUT0"):
    import tritonclient.http as httpclient

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    client = httpclient.InferenceServerClient(url)
    try:  # close before any stop(): an open keep-alive connection delays the server's shutdown
        inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return x, client.infer(model, [inp]).as_numpy(output_name)
    finally:
        client.close()


# -- the bundled binary ---------------------------------------------------------------------------
@needs_server
def test_find_bundled_triton_paths_exist():
    t = find_bundled_triton()
    for p in (
        t.binary,
        t.python_backend / "libtriton_python.so",
        t.python_backend / "triton_python_backend_utils.py",
        t.stubs,
        t.libs,
        t.caches,
        t.stub_for(),
    ):
        assert p.exists(), p
    assert os.access(t.binary, os.X_OK)


def test_missing_pytriton_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bundled.util, "find_spec", lambda name: None)
    with pytest.raises(TritonNotFoundError, match=r"pip install nvidia-pytriton==0\.7\.0"):
        find_bundled_triton()


@needs_server
def test_prepare_backend_dir(tmp_path):
    dest = prepare_backend_dir(tmp_path / "backends")
    assert sorted(p.name for p in (dest / "python").iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    with pytest.raises(TritonNotFoundError, match="no python backend stub for Python 2.7"):
        prepare_backend_dir(tmp_path / "other", python_version="2.7")


# -- a running server -----------------------------------------------------------------------------
@needs_server
def test_http_infer(server):
    assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")
    x, y = http_add_one(server.http_url)
    np.testing.assert_array_equal(y, x + 1)


@needs_server
def test_http_ensemble(server):
    x, y = http_add_one(server.http_url, "add_two", "X", "Y")
    np.testing.assert_array_equal(y, x + 2)


@needs_server
def test_grpc_infer(server):
    import tritonclient.grpc as grpcclient

    x = np.full((3, 4), 2.5, np.float32)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_model_ready("add_one")
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), x + 1)


@needs_server
def test_grpc_streaming_decoupled(server):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for n in (5, 2):
                inp = grpcclient.InferInput("COUNT", [1], "INT32")
                inp.set_data_from_numpy(np.array([n], np.int32))
                client.async_stream_infer("count_up", [inp], request_id=str(n), enable_empty_final_response=True)
                values = []
                while True:
                    result, error = results.get(timeout=20)
                    assert error is None, error
                    response = result.get_response()
                    assert response.id == str(n)
                    if response.parameters["triton_final_response"].bool_param:
                        break
                    values.append(int(result.as_numpy("VALUE")[0]))
                assert values == list(range(n))
        finally:
            client.stop_stream()


@needs_server
def test_http_sse_streaming_decoupled(server):
    # The generate_stream extension maps JSON fields to inputs and streams one SSE event per response.
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/count_up/generate_stream",
        data=json.dumps({"COUNT": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=20) as r:
        events = [json.loads(line[len(b"data: ") :]) for line in r.read().splitlines() if line.startswith(b"data: ")]
    assert [e["VALUE"] for e in events] == [0, 1, 2]  # one-element tensors come back as scalars


@needs_server
def test_second_server_own_ports_and_clean_stop(server, repo, tmp_path):
    with TritonServer(repo, startup_timeout=60, work_dir=tmp_path) as second:
        assert {second.http_port, second.grpc_port, second.metrics_port}.isdisjoint(
            {server.http_port, server.grpc_port, server.metrics_port}
        )
        x, y = http_add_one(second.http_url)
        np.testing.assert_array_equal(y, x + 1)
        with urllib.request.urlopen(second.metrics_url, timeout=5) as r:
            assert b"nv_inference_count" in r.read()
        pid = second.process.pid
        start = time.monotonic()
        assert second.stop() == 0
        took = time.monotonic() - start
    assert took < 10, f"stop took {took:.1f} s"
    assert not second.is_alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group (server and python stubs) is gone
    assert second.log_path.is_file() and "add_one" in second.log_path.read_text()
    x, y = http_add_one(server.http_url)  # the first server is unaffected
    np.testing.assert_array_equal(y, x + 1)


@needs_server
def test_a_killed_server_leaves_no_shared_memory(repo, tmp_path):
    server = TritonServer(repo, startup_timeout=60, work_dir=tmp_path).start()
    prefix = server._shm_prefix
    assert list(Path("/dev/shm").glob(prefix + "*")), "the python stubs should hold shared-memory regions"
    os.killpg(server.process.pid, signal.SIGKILL)  # nobody gets to clean up
    server.process.wait()
    server.stop()
    assert not list(Path("/dev/shm").glob(prefix + "*"))


@needs_server
def test_start_failure_reports_log_tail(tmp_path):
    add_model(tmp_path / "repo", "add_one", ADD_ONE_CONFIG, BROKEN_PY)
    server = TritonServer(tmp_path / "repo", startup_timeout=60, work_dir=tmp_path / "work")
    with pytest.raises(TritonStartError, match="deliberately broken model"):
        server.start()
    assert not server.is_alive()


@needs_server
def test_serve_forever_stops_on_sigterm(repo, tmp_path):
    code = (
        "import sys; from canary_qwen.serving.supervisor import serve_forever; "
        f"sys.exit(serve_forever({str(repo)!r}, work_dir={str(tmp_path)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        http = next(line.split()[1] for line in lines if line.strip().startswith("HTTP"))
        x, y = http_add_one(http)
        np.testing.assert_array_equal(y, x + 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "shutting down" in proc.stdout.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{http}/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- offline config checks ------------------------------------------------------------------------
def test_parse_model_config_path_and_text(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(ADD_ONE_CONFIG)
    for source in (path, str(path), ADD_ONE_CONFIG):
        cfg = parse_model_config(source)
        assert cfg.name == "add_one" and cfg.max_batch_size == 8 and cfg.input[0].name == "INPUT0"


def test_parse_model_config_rejects_malformed(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "x"\ninput [ { name: "A" data_type: TYPE_NOPE dims: [ 1 ] } ]\n')
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt.*TYPE_NOPE"):
        parse_model_config(path)
    with pytest.raises(ModelConfigError, match="unknown_field"):
        parse_model_config('name: "x"\nunknown_field: 3\n')


def test_check_ensemble_accepts_correct_repo(repo):
    assert check_ensemble(repo) == []


def test_check_ensemble_flags_missing_tensor(tmp_path):
    add_model(tmp_path, "add_one", ADD_ONE_CONFIG, ADD_ONE_PY)
    add_model(
        tmp_path, "add_two", ENSEMBLE_CONFIG.replace('key: "OUTPUT0" value: "Y"', 'key: "OUTPUT1" value: "Y"'), None
    )
    problems = check_ensemble(tmp_path)
    assert any("output_map names output 'OUTPUT1'" in p for p in problems), problems
    with pytest.raises(ModelConfigError, match="OUTPUT1") as info:
        check_ensemble(tmp_path, raise_on_problems=True)
    assert info.value.problems == problems


def test_check_ensemble_flags_wiring_and_missing_model(tmp_path):
    add_model(tmp_path, "add_one", ADD_ONE_CONFIG, ADD_ONE_PY)
    bad = ENSEMBLE_CONFIG.replace(
        'value: "mid" }', 'value: "nowhere" }', 1
    ).replace(  # step 1 reads a tensor nobody writes
        'model_name: "add_one" model_version: -1 input_map { key: "INPUT0" value: "mid" }',
        'model_name: "add_three" model_version: -1 input_map { key: "INPUT0" value: "mid" }',
    )
    add_model(tmp_path, "add_two", bad, None)
    add_model(tmp_path, "broken", "name: 'broken' input [ {", None)
    text = "\n".join(check_ensemble(tmp_path))
    assert "no model 'add_three'" in text
    assert "'mid'" in text and "neither an ensemble input nor written" in text
    assert "'nowhere'" in text and "never used" in text
    assert "broken/config.pbtxt: invalid model config" in text


def test_check_ensemble_flags_dtype_mismatch(tmp_path):
    add_model(tmp_path, "add_one", ADD_ONE_CONFIG, ADD_ONE_PY)
    add_model(
        tmp_path,
        "add_two",
        ENSEMBLE_CONFIG.replace('name: "X" data_type: TYPE_FP32', 'name: "X" data_type: TYPE_INT32'),
        None,
    )
    problems = check_ensemble(tmp_path)
    assert len(problems) == 1 and "'X' is TYPE_FP32 in 'add_one' but TYPE_INT32 in 'add_two'" in problems[0], problems
