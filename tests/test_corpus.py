"""transcribe-corpus on a real local Ray cluster (2 CPUs): one row per file, resume, a worker killed mid-run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from conftest import make_clip, needs_server, running_server

from canary_qwen.cli import main
from canary_qwen.corpus.inputs import list_audio
from canary_qwen.corpus.job import ClusterOptions, DecodeOptions, transcribe_corpus
from canary_qwen.corpus.results import ResultStore, model_identity
from canary_qwen.errors import UsageError
from canary_qwen.export.artifacts import export_all
from canary_qwen.model.synthetic import make_checkpoint
from canary_qwen.registry import DEFAULT_BACKEND
from canary_qwen.serving.onnx_flavor import generate_onnx_repo

TOKENS, WINDOW_S = "6", "3"  # short decoding; a 3 s window so the 7 s clip is cut in three
DECODE = dict(max_new_tokens=int(TOKENS), max_window_s=float(WINDOW_S))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A fresh 2-CPU Ray cluster in this process (its session files in a temporary folder); afterwards none of
    its processes (the cluster's, and the workers it started, which Ray may leave to init) may be left."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'canary-qwen[ray]')")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ours = psutil.Process().children(recursive=True)
    assert any("raylet" in " ".join(p.cmdline()) for p in ours)
    ray.shutdown()
    deadline = time.monotonic() + 30
    while (left := [p for p in ours if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after ray.shutdown(): {[p.cmdline()[:1] for p in left]}"


def alive(process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """50 files: clips of 0.3-4 s at 8, 16, 22.05 and 44.1 kHz, mono and stereo, wav/flac/ogg, one 7 s clip
    (windowed), and six bad files (text, no samples, 0 bytes, cut short, 5 ms, random bytes)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    good = []
    for i in range(43):
        rate = (8000, 16000, 22050, 44100)[i % 4]
        clip = make_clip(float(rng.uniform(0.3, 4.0)), i)
        audio = np.interp(np.arange(int(len(clip) * rate / 16000)) * 16000 / rate, np.arange(len(clip)), clip)
        if i % 5 == 0:
            audio = np.stack([audio, 0.5 * audio], axis=1)
        ext = ("wav", "flac", "ogg")[i % 3]
        path = root / f"set{i % 3}" / f"clip{i:02d}.{ext}"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, audio.astype(np.float32), rate)
        good.append(str(path))
    long = np.concatenate([make_clip(2.5, 100), np.zeros(4000, np.float32), make_clip(2.0, 101)] * 2)
    sf.write(root / "long.wav", long[: 7 * 16000], 16000)
    good.append(str(root / "long.wav"))
    bad = root / "bad"
    bad.mkdir()
    (bad / "text.wav").write_text("this is not audio")
    sf.write(bad / "empty.wav", np.zeros(0, np.float32), 16000)
    (bad / "zero.flac").write_bytes(b"")
    sf.write(bad / "cut.wav", make_clip(1.0, 7), 16000)
    with open(bad / "cut.wav", "r+b") as f:
        f.truncate(9000)
    sf.write(bad / "blip.wav", make_clip(0.005, 8), 16000)
    (bad / "noise.ogg").write_bytes(os.urandom(3000))
    (root / "notes.txt").write_text("not audio: not listed from a directory")
    bad_files = sorted(str(p) for p in bad.iterdir())
    return root, sorted(good), bad_files


def transcribe_json(*argv) -> dict[str, dict]:
    """What `canary-qwen transcribe --json` prints, by file."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(["transcribe", "--json", "--max-new-tokens", TOKENS, "--max-window-s", WINDOW_S, *argv])
    return {r["audio"]: r for r in map(json.loads, out.getvalue().splitlines())}


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, corpus):
    return transcribe_json("--model", str(tiny_checkpoint), *corpus[1])


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]


def check_complete(rows, corpus, expected):
    _, good, bad = corpus
    assert sorted(r["audio"] for r in rows) == sorted(good + bad)  # exactly one row per file
    by_path = {r["audio"]: r for r in rows}
    for path in good:
        assert by_path[path]["error"] is None, by_path[path]["error"]
        assert by_path[path]["text"] == expected[path]["text"], path
        assert by_path[path]["token_ids"] == expected[path]["token_ids"], path
        assert by_path[path]["duration_s"] == pytest.approx(expected[path]["duration_s"], abs=1e-3)
    for path in bad:
        assert by_path[path]["error"].startswith(path) and by_path[path]["text"] is None


def test_bad_inputs_are_one_line_errors(capsys, tmp_path, tiny_checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.jsonl").write_text('{"audio_filepath": "a.wav"}\nnot json\n')
    common = ["transcribe-corpus", "--output", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    for spec, message in (
        (tmp_path / "missing", "no such file or directory"),
        (tmp_path / "empty", "has no audio files"),
        (tmp_path / "*.flac", "matches no files"),
        (tmp_path / "m.jsonl", "m.jsonl:2: not a JSON line"),
    ):
        assert main([*common, "--input", str(spec)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    assert main([*common, "--input", str(tmp_path), "--url", "a:1"]) == 2
    assert "--url needs --backend triton" in capsys.readouterr().err


def test_model_identity_follows_contents_not_place(tmp_path, tiny_checkpoint):
    shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)  # same files and sizes, other weights
    assert model_identity(str(tmp_path / "copy")) == model_identity(str(tiny_checkpoint))
    assert model_identity(str(other)) != model_identity(str(tiny_checkpoint))


def test_store_folds_what_a_killed_driver_left(tmp_path):
    def rows(paths, text, error=None):
        keys = dict(duration_s=1.0, token_ids=[1], backend="torch", model="m", fingerprint="f")
        return [dict(audio=p, text=text, error=error, **keys) for p in paths]

    with ResultStore(tmp_path) as store:
        with pytest.raises(UsageError, match="another transcribe-corpus run"):
            ResultStore(tmp_path).__enter__()
        store.commit(rows(["a", "b"], "old"))
        store.commit(rows(["b", "c"], "new"))  # b twice: a batch delivered again, or a file redone
        store.commit(rows(["d"], None, error="d: corrupt"))
        (store.parts / ".half.jsonl.1234.tmp").write_text('{"audio": "e", "te')  # a driver killed mid-write
    with ResultStore(tmp_path) as store:  # the next run folds first
        assert not any(store.parts.iterdir())
        merged = read_rows(tmp_path)
        assert [(r["audio"], r["text"]) for r in merged] == [("a", "old"), ("b", "new"), ("c", "new"), ("d", None)]
        assert store.done("f") == {"a", "b", "c", "d"} and store.done("f", retry_failed=True) == {"a", "b", "c"}
        assert store.done("other") == set()
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "transcripts.parquet").to_pylist() == merged


def test_one_row_per_file_equal_to_transcribe_then_resume(
    capsys, ray_cluster, tiny_checkpoint, corpus, expected, tmp_path
):
    root, good, bad = corpus
    out = tmp_path / "out"
    argv = ["transcribe-corpus", "--input", str(root), "--output", str(out), "--model", str(tiny_checkpoint)]
    argv += ["--workers", "2", "--files-per-task", "8", "--max-new-tokens", TOKENS, "--max-window-s", WINDOW_S]
    assert main(argv) == 1  # the bad files failed
    err = capsys.readouterr().err
    assert "50 files: 0 already done" in err and f"{len(bad)} of 50 files failed" in err
    rows = read_rows(out)
    check_complete(rows, corpus, expected)
    import pyarrow.parquet as pq

    assert pq.read_table(out / "transcripts.parquet").to_pylist() == rows

    # Rerun from a manifest of the same files (relative paths) after deleting five rows, two of them bad
    # files; files still in the output are gone from disk, so redoing any of them would show as an error.
    deleted = set(good[:3] + bad[:2])
    kept = [r for r in rows if r["audio"] not in deleted]
    (out / "transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    moved = root.parent / "moved"
    moved.mkdir()
    for path in good[10:20]:
        shutil.move(path, moved / Path(path).name)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"audio_filepath": os.path.relpath(p, root)}) + "\n" for p in good + bad))
    logs: list[str] = []
    summary = transcribe_corpus(
        list_audio(str(manifest)),
        str(out),
        DecodeOptions(DEFAULT_BACKEND, str(tiny_checkpoint), **DECODE),  # what the command line ran by default
        ClusterOptions(workers=2, files_per_task=8),
        log=logs.append,
    )
    for path in good[10:20]:
        shutil.move(moved / Path(path).name, path)
    assert (summary.skipped, summary.transcribed) == (45, 5), logs
    check_complete(read_rows(out), corpus, expected)


def worker_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if any("TranscribeWorker" in part for part in p.cmdline())
    ]


def test_killed_worker_loses_nothing(ray_cluster, tiny_checkpoint, corpus, expected, tmp_path):
    root, good, bad = corpus
    out = tmp_path / "out"
    result: dict = {}

    def run():
        try:
            result["summary"] = transcribe_corpus(
                sorted(good + bad),
                str(out),
                DecodeOptions("torch", str(tiny_checkpoint), **DECODE),
                ClusterOptions(workers=2, files_per_task=2),
                log=lambda line: None,
            )
        except BaseException as e:
            result["error"] = e

    job = threading.Thread(target=run)
    job.start()
    parts, deadline = out / "parts", time.monotonic() + 120
    while not (parts.is_dir() and any(p.suffix == ".jsonl" for p in parts.iterdir())):
        assert job.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.05)
    victims = worker_pids()
    assert victims, "no TranscribeWorker process found"
    os.kill(victims[0], signal.SIGKILL)
    committed = sum(len(p.read_text().splitlines()) for p in parts.glob("*.jsonl"))
    assert committed < len(good + bad)  # the kill came mid-run
    job.join(timeout=180)
    assert not job.is_alive() and "error" not in result, result
    # Every file was delivered once (a batch delivered twice would count twice) and none was lost.
    assert result["summary"].transcribed == len(good + bad)
    check_complete(read_rows(out), corpus, expected)
    assert victims[0] not in worker_pids()


def served(server) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^nv_inference_request_success\{model="canary_qwen",version="1"\} (\S+)$', text, re.M)
    assert m, "no request count for canary_qwen in the metrics"
    return float(m.group(1))


@needs_server
@pytest.mark.triton
def test_triton_servers_share_the_files(ray_cluster, tiny_checkpoint, corpus, tmp_path):
    _, good, bad = corpus
    files = sorted(good[:10] + bad[:2])
    export = export_all(tiny_checkpoint, tmp_path / "export", progress=False).root
    repo = generate_onnx_repo(export, tmp_path / "repo", max_batch=4, decoupled_streaming=False)
    local = transcribe_json("--backend", "onnx", "--model", str(export), *files)
    with running_server(repo, tmp_path / "a") as a, running_server(repo, tmp_path / "b") as b:
        summary = transcribe_corpus(
            files,
            str(tmp_path / "out"),
            DecodeOptions("triton", "tiny-onnx", urls=(a.http_url, b.http_url), **DECODE),
            ClusterOptions(workers=2, files_per_task=2),
            log=lambda line: None,
        )
        counts = [served(a), served(b)]
    assert all(n > 0 for n in counts), counts  # each worker had its own server
    assert summary.transcribed == len(files) and len(summary.failed) == 2
    rows = {r["audio"]: r for r in read_rows(tmp_path / "out")}
    assert sorted(rows) == files
    for path in good[:10]:
        assert (rows[path]["text"], rows[path]["token_ids"]) == (local[path]["text"], local[path]["token_ids"])
