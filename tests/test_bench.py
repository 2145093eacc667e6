"""The benchmark's structure (never its speed): inputs, method bookkeeping, outputs, skips."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from canary_qwen.backends.base import Transcription
from canary_qwen.bench import (
    RUN_FIELDS,
    BenchConfig,
    ManifestError,
    read_manifest,
    run_benchmark,
    synthetic_set,
    word_error_rate,
)
from canary_qwen.bench.backends import PER_BATCH, PER_CLIP, RunSpec
from canary_qwen.bench.report import portable_command
from canary_qwen.bench.runner import batch_budgets
from canary_qwen.cli.bench import add_bench_parser, command_line
from canary_qwen.errors import BackendUnavailable, UsageError
from canary_qwen.precision import TAKES, Precision
from canary_qwen.registry import BACKENDS, SERVER, BackendSpec

SPEC = "mixed:0.5-2:6"
HAVE_NEMO = importlib.util.find_spec("nemo") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="canary-qwen")
    add_bench_parser(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, tmp_path_factory):
    """One CLI run: nemo + torch (+ onnx) on the tiny checkpoint, plus trt (skipped: it needs a GPU)."""
    backends, extra = ["nemo", "torch"], []
    if HAVE_ORT:
        from canary_qwen.export.artifacts import export_all

        export = export_all(tiny_checkpoint, tmp_path_factory.mktemp("bench-export"), progress=False)
        backends.append("onnx")
        extra = ["--export-dir", str(export.root)]
    backends.append("trt")
    out = tmp_path_factory.mktemp("bench-out")
    argv = [
        "bench",
        "--model",
        str(tiny_checkpoint),
        "--backends",
        *backends,
        "--synthetic",
        SPEC,
        "--batch-size",
        "4",
        "--tokens-per-second",
        "3.5",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--out",
        str(out),
        "--docs",
        str(out / "benchmarks.md"),
        *extra,
    ]
    args = parser().parse_args(argv)
    rc = args.run(args)
    return dict(rc=rc, out=out, backends=backends, args=args, results=json.loads((out / "results.json").read_text()))


# -- the end-to-end run ----------------------------------------------------------------------------


def test_every_run_has_every_field(bench):
    results = bench["results"]
    assert bench["rc"] == 0
    runs = {r["backend"]: r for r in results["runs"]}
    assert list(runs) == bench["backends"]
    data = synthetic_set(SPEC)
    audio_s = sum(len(a) for a in data.audio) / 16000
    for run in results["runs"]:
        assert set(RUN_FIELDS) <= set(run), f"{run['backend']} lacks {set(RUN_FIELDS) - set(run)}"
        assert isinstance(run["skipped"], bool)
    expected_ok = ["torch"] + (["nemo"] if HAVE_NEMO else []) + (["onnx"] if HAVE_ORT else [])
    for name in expected_ok:
        run = runs[name]
        assert not run["skipped"] and run["reason"] is None, run["reason"]
        assert run["batch_size"] == 4 and run["n_clips"] == 6 and run["n_batches"] == 2 and run["warmup_batches"] == 1
        assert run["audio_s"] == pytest.approx(audio_s)
        assert run["wall_s"] > 0
        assert run["rtfx"] == pytest.approx(run["audio_s"] / run["wall_s"], rel=1e-12)
        assert run["wer"] is None and run["n_references"] == 0  # synthetic: no references
        assert run["tokens_generated"] > 0 and run["tokens_per_second"] == 3.5 and run["max_new_tokens"] is None
        assert run["device"] == "cpu" and run["dtype"] == "fp32"
        assert {"load_audio", "transcribe"} <= set(run["stages"])
        assert run["budget"] == (PER_BATCH if name == "nemo" else PER_CLIP)
        if HAVE_NEMO:
            assert run["rtfx_vs_nemo"] == pytest.approx(run["rtfx"] / runs["nemo"]["rtfx"])
        work = run["gflop_per_audio_s"]
        assert work["total"] == pytest.approx(work["encoder"] + work["prefill"] + work["decode"]) and work["decode"] > 0
        assert run["model_tflops"] == pytest.approx(work["total"] * run["audio_s"] / run["wall_s"] * 1e-3)
        assert run["peak_tflops"] is None and run["rtfx_limit"] is None and run["of_limit"] is None  # CPU: no peak
    if HAVE_ORT:  # same transcripts, same work: padding and extra tokens are not counted
        assert runs["onnx"]["gflop_per_audio_s"] == runs["torch"]["gflop_per_audio_s"]
    if HAVE_NEMO:
        assert runs["nemo"]["rtfx_vs_nemo"] == pytest.approx(1.0)
    else:
        assert runs["nemo"]["skipped"] and "NeMo is not installed" in runs["nemo"]["reason"]
    # trt never runs on the CPU: skipped with the reason, not a crash
    assert runs["trt"]["skipped"] and "TensorRT-LLM runs on an NVIDIA GPU, not on cpu" in runs["trt"]["reason"]
    assert runs["trt"]["rtfx"] is None and runs["trt"]["wall_s"] is None

    env = results["environment"]
    for key in ("python", "versions", "cpu", "cpu_cores", "gpu", "timestamp", "command", "argv"):
        assert key in env
    assert {"torch", "nemo", "onnxruntime"} <= set(env["versions"])
    assert env["command"] == command_line(bench["args"])
    assert results["dataset"]["n_clips"] == 6 and results["dataset"]["kind"] == "synthetic"


def test_markdown_table_has_a_row_per_run(bench):
    md = (bench["out"] / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| backend", "| ---"))]
    assert len(rows) == len(bench["results"]["runs"])
    for row, run in zip(rows, bench["results"]["runs"]):
        assert row.split("|")[1].strip() == run["backend"]
    assert "vs best NeMo" in md and "GFLOP per audio second" in md


def test_png_and_docs_and_hypotheses(bench):
    png = bench["out"] / "rtfx.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    assert imread(str(png)).shape[2] in (3, 4)
    docs = (bench["out"] / "benchmarks.md").read_text()
    command = bench["results"]["environment"]["command"]
    assert "## Method" in docs and "RTFx" in docs and portable_command(command) in docs
    assert str(bench["out"]) in command and str(bench["out"]) not in docs  # no machine paths on the page
    assert docs.count("\n| torch | 4 |") == 1
    lines = [json.loads(line) for line in (bench["out"] / "hypotheses.jsonl").read_text().splitlines()]
    ok = [r for r in bench["results"]["runs"] if not r["skipped"]]
    assert len(lines) == 6 * len(ok)


def test_command_line_parses_back_to_the_same_options(bench):
    again = parser().parse_args(shlex.split(command_line(bench["args"]))[1:])
    assert vars(again) == vars(bench["args"])


# -- inputs ----------------------------------------------------------------------------------------


def test_synthetic_set_is_deterministic_and_sorted_longest_first():
    a, b = synthetic_set("mixed:2-20:12", seed=3), synthetic_set("mixed:2-20:12", seed=3)
    assert [c.duration for c in a.clips] == [c.duration for c in b.clips]
    assert all(np.array_equal(x, y) for x, y in zip(a.audio, b.audio))
    durations = [c.duration for c in a.clips]
    assert durations == sorted(durations, reverse=True)
    assert all(2 <= d <= 20 for d in durations) and len(set(durations)) == 12
    assert all(len(x) == round(c.duration * 16000) and x.dtype == np.float32 for x, c in zip(a.audio, a.clips))
    assert all(np.isfinite(x).all() and 0.01 < x.std() < 1 for x in a.audio)
    other = synthetic_set("mixed:2-20:12", seed=4)
    assert [c.duration for c in other.clips] != durations
    uniform = synthetic_set("uniform:1.5:3")
    assert [c.duration for c in uniform.clips] == [1.5] * 3
    assert not np.array_equal(uniform.audio[0], uniform.audio[1])  # same length, different signal


@pytest.mark.parametrize(
    "spec", ["mixed:2:768", "uniform:10", "mixed:5-2:10", "wide:1:2", "uniform:0:4", "uniform:2:0"]
)
def test_bad_synthetic_spec(spec):
    with pytest.raises(ValueError, match="synthetic set"):
        synthetic_set(spec)


def write_wav(path, seconds, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
    return path


def test_manifest_relative_paths_durations_and_order(tmp_path):
    write_wav(tmp_path / "audio" / "a.wav", 0.5)
    write_wav(tmp_path / "audio" / "b.wav", 1.25)
    absolute = write_wav(tmp_path / "elsewhere" / "c.wav", 0.8)
    manifest = tmp_path / "sets" / "test.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(
        json.dumps({"audio_filepath": "../audio/a.wav", "duration": 0.5, "text": "alpha"})
        + "\n\n"
        + json.dumps({"audio_filepath": str(absolute), "duration": 0.8})
        + "\n"
        + json.dumps({"audio_filepath": "../audio/b.wav", "text": "beta"})
        + "\n"  # duration from the header
    )
    data = read_manifest(manifest)
    assert [c.path for c in data.clips] == [
        str((tmp_path / "audio" / "b.wav").resolve()),
        str(absolute.resolve()),
        str((tmp_path / "audio" / "a.wav").resolve()),
    ]
    assert [c.duration for c in data.clips] == [1.25, 0.8, 0.5]
    assert [c.text for c in data.clips] == ["beta", None, "alpha"]
    assert data.audio is None and data.has_references
    assert [len(a) for a in data.load([0, 2])] == [20000, 8000]


def test_manifest_missing_audio_file_is_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "gone.wav", "duration": 1.0}) + "\n")
    with pytest.raises(ManifestError, match=r"line 1: audio file not found: .*gone\.wav"):
        read_manifest(manifest)


def test_manifest_bad_json_reports_line_number(tmp_path):
    write_wav(tmp_path / "a.wav", 0.5)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "duration": 0.5}) + "\n{not json\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl line 2: not valid JSON"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({"duration": 0.5}) + "\n")
    with pytest.raises(ManifestError, match="line 1: no 'audio_filepath'"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "duration": "long"}) + "\n")
    with pytest.raises(ManifestError, match="line 1: 'duration' must be a number"):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")


# -- method pieces ---------------------------------------------------------------------------------


def test_wer_on_known_pairs():
    wer, n = word_error_rate(["Hello, world! Foo bar."], ["hello world foo"])
    assert (wer, n) == (0.25, 1)
    assert word_error_rate(["Mr. Smith isn't here"], ["mister smith is not here"]) == (0.0, 1)
    # Corpus WER: errors / reference words over all pairs; clips without reference are left out.
    assert word_error_rate(["a b c d", None, "e f"], ["a b", "anything", "e f"]) == (pytest.approx(2 / 6), 2)
    assert word_error_rate([None, None], ["x", "y"]) == (None, 0)


def test_token_budgets_per_clip_and_per_batch():
    assert batch_budgets([2.0, 1.1, 0.5], PER_CLIP, 3.5) == [7, 4, 2]
    assert batch_budgets([2.0, 1.1, 0.5], PER_BATCH, 3.5) == [7, 7, 7]
    assert batch_budgets([2.0, 1.1], PER_CLIP, None) == [128, 128]
    assert batch_budgets([0.01], PER_CLIP, 3.5) == [1]


class EchoEngine:
    """No model: a Transcriber answering a fixed text, with stage timings, failing at one batch size."""

    dtype = "fp32"

    def __init__(self, fail_at=None):
        self.timings, self.fail_at, self.calls = {}, fail_at, []

    def transcribe(self, audios, *, prompt=None, max_new_tokens=128):
        self.calls.append((len(audios), list(max_new_tokens)))
        if len(audios) == self.fail_at:
            raise RuntimeError("CUDA out of memory (pretend)")
        self.timings["encode"] = self.timings.get("encode", 0.0) + 0.001
        return [Transcription(text="Hello, World", token_ids=[1] * b) for b in max_new_tokens]


def test_failures_are_skips_not_crashes_and_manifest_audio_is_loaded_in_the_timed_pass(tmp_path, monkeypatch):
    for i, seconds in enumerate((0.5, 1.0, 0.75)):
        write_wav(tmp_path / f"{i}.wav", seconds, seed=i)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"audio_filepath": f"{i}.wav", "duration": s, "text": t}) + "\n"
            for i, (s, t) in enumerate(((0.5, "hello world"), (1.0, "hello there world"), (0.75, "goodbye")))
        )
    )
    echo = EchoEngine(fail_at=2)
    monkeypatch.setitem(
        BACKENDS, "echo", BackendSpec("echo", SERVER, "test engine", lambda source, device, dtype: echo)
    )

    def broken(source, device, dtype):
        raise OSError("no such engine file")

    monkeypatch.setitem(BACKENDS, "broken", BackendSpec("broken", SERVER, "test engine", broken))
    config = BenchConfig(
        backends=["broken", "echo", "nope"],
        batch_sizes=[3, 2],
        manifest=str(manifest),
        tokens_per_second=4.0,
        device="cpu",
    )
    # A mistyped entry fails the benchmark before any backend is made, not after hours of the others.
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        run_benchmark(config, progress=False, log=lambda msg: None)
    assert echo.calls == []
    config.backends = ["broken", "echo"]
    results = run_benchmark(config, progress=False, log=lambda msg: None)
    broken, ok, failed = results["runs"]
    assert broken["skipped"] and broken["reason"] == "OSError: no such engine file" and broken["batch_size"] is None
    assert failed["skipped"] and failed["batch_size"] == 2 and "out of memory" in failed["reason"]
    assert not ok["skipped"] and ok["batch_size"] == 3 and ok["n_clips"] == 3
    # warm-up (first batch) + timed pass; per-clip budgets ceil(4 * seconds), longest first
    assert echo.calls[:2] == [(3, [4, 3, 2]), (3, [4, 3, 2])]
    assert ok["tokens_generated"] == 9 and ok["audio_s"] == pytest.approx(2.25)
    assert ok["stages"]["encode"] == pytest.approx(0.001)  # reset after the warm-up
    assert ok["stages"]["load_audio"] > 0
    # refs (normalised) "hello there world" / "goodbye" / "hello world" vs "hello world" each: 1 + 2 + 0 errors of 6 words
    assert ok["wer"] == pytest.approx(3 / 6) and ok["n_references"] == 3
    for run in results["runs"]:
        assert set(RUN_FIELDS) <= set(run)
        assert run["rtfx_vs_nemo"] is None


def test_one_run_compares_precisions_and_sources_of_a_backend(monkeypatch):
    made = []

    def make(source, device, dtype):
        made.append((source, dtype))
        engine = EchoEngine()
        engine.dtype = dtype
        return engine

    monkeypatch.setitem(BACKENDS, "echo", BackendSpec("echo", SERVER, "test engine", make))
    monkeypatch.setitem(TAKES, "echo", (Precision.FP32, Precision.BF16))
    config = BenchConfig(
        backends=["echo", "echo:bf16", "echo=other:1"], batch_sizes=[2], synthetic="mixed:1-2:3", device="cpu"
    )
    results = run_benchmark(config, progress=False, log=lambda msg: None)
    assert made == [("localhost:8000", "fp32"), ("localhost:8000", "bf16"), ("other:1", "fp32")]
    assert [(r["backend"], r["spec"], r["dtype"]) for r in results["runs"]] == [
        ("echo", "echo", "fp32"),
        ("echo", "echo:bf16", "bf16"),
        ("echo", "echo=other:1", "fp32"),
    ]
    assert set(results["hypotheses"]) == {"echo@2", "echo:bf16@2", "echo=other:1@2"}
    assert all(r["peak_rss_gb"] > 0.01 for r in results["runs"])  # this process's resident peak (Linux)


def test_run_specs_refuse_precisions_a_backend_cannot_take():
    assert RunSpec.parse("torch-fast:int8=ckpt/") == RunSpec("torch-fast:int8=ckpt/", "torch-fast", "int8", "ckpt/")
    for text, message in (
        ("onnx:bf16", "precision is that of its export"),  # it would run its export's precision silently
        ("nemo:int8", "fp32, bf16, fp16"),
        ("onnx=", "nothing after '='"),
    ):
        with pytest.raises(UsageError, match=message):
            RunSpec.parse(text)
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        RunSpec.parse("tensorflow")
    served = RunSpec.parse("triton:torch-fast:int8=ckpt/")
    assert (served.name, served.flavor, served.dtype, served.source, served.local) == (
        "triton",
        "torch-fast",
        "int8",
        "ckpt/",
        "torch-fast:int8",
    )
    assert RunSpec.parse("triton:onnx").local == "onnx" and RunSpec.parse("triton").flavor is None
    for text, message in (("triton:trt", "serves the flavours torch-fast, onnx, vllm"), ("triton:onnx:bf16", "export")):
        with pytest.raises(UsageError, match=message):
            RunSpec.parse(text)


@pytest.mark.triton
def test_served_entries_start_their_server_and_match_the_local_tokens(tiny_checkpoint, tiny_export):
    """torch-fast and onnx served by the bundled Triton beside their local runs, 1 and 4 requests in flight: the
    same tokens, a latency per request, the server's memory; nothing left running after the run."""
    from conftest import HAVE_TRITON, NO_TRITON

    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    config = BenchConfig(
        backends=["torch-fast", "triton:torch-fast", "onnx", "triton:onnx"],
        batch_sizes=[1, 4],
        model=str(tiny_checkpoint),
        export_dir=str(tiny_export),
        synthetic="mixed:0.5-3:6",
        max_new_tokens=12,
        device="cpu",
    )
    runs = run_benchmark(config, progress=False, log=lambda msg: None)["runs"]
    assert [(r["spec"], r["batch_size"], r["skipped"]) for r in runs] == [
        (spec, b, False) for spec in config.backends for b in (1, 4)
    ]
    for r in runs:
        served = r["spec"].startswith("triton:")
        assert (r["matches_local"] == 1.0) is served, r
        assert (r["latency_p50_s"] is not None and r["latency_p99_s"] >= r["latency_p50_s"]) is served
        assert (r["server_peak_rss_gb"] is not None and r["server_peak_rss_gb"] > 0.1) is served
        assert r["n_batches"] == (1 if served else -(-6 // r["batch_size"]))  # a server has every clip in flight
    assert not list(Path("/dev/shm").glob(f"canary_qwen_{os.getpid()}_*"))  # this process's servers left none


def test_help_explains_the_method(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    for phrase in ("longest", "warm-up", "RTFx", "--tokens-per-second", "--synthetic", "--manifest", "trt"):
        assert phrase in text


def test_bad_synthetic_spec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "--synthetic", "mixed:2:768"])
    assert "mixed:MIN-MAX:N" in capsys.readouterr().err


def test_docs_from_several_benchmarks(bench, tmp_path):
    from canary_qwen.bench import load_results, write_docs
    from canary_qwen.bench.report import HAND_WRITTEN

    first = load_results(bench["out"])
    second = json.loads(json.dumps(first))
    second["dataset"]["name"] = "uniform:10:64"
    path = tmp_path / "docs" / "benchmarks.md"
    path.parent.mkdir()
    path.write_text(f"# old\n\n## {SPEC}\n\n{HAND_WRITTEN}\n\n## by hand\n")
    write_docs(first, path)
    docs = write_docs([first, second], path).read_text()
    assert f"## {SPEC}" in docs and "## uniform:10:64" in docs and "# old" not in docs
    assert docs.count("| backend | batch |") == 2
    assert docs.count(HAND_WRITTEN) == 1 and docs.endswith(f"{HAND_WRITTEN}\n\n## by hand\n")


def test_triton_without_a_server_is_skipped_with_the_url():
    config = BenchConfig(
        backends=["triton"], batch_sizes=[2], synthetic="uniform:0.5:2", url="127.0.0.1:1", device="cpu"
    )
    (run,) = run_benchmark(config, progress=False, log=lambda msg: None)["runs"]
    assert run["skipped"] and run["backend"] == "triton" and run["reason"]
    assert "127.0.0.1:1" in run["reason"] or "not available" in run["reason"]


def test_the_overhead_section_shows_served_engine_entries_only():
    """A served engine entry's row: the engine's busy seconds against the pass's wall time, and the rest per
    request; local entries, skipped runs and servers without the engine metric get none."""
    from canary_qwen.bench.overhead import overhead_rows, overhead_section

    base = dict(skipped=False, n_clips=16, batch_size=1, wall_s=10.0, backend="triton")
    runs = [
        {**base, "spec": "triton:torch-fast:int8", "engine_busy_s": 9.84},
        {**base, "spec": "triton:onnx", "engine_busy_s": None},
        {**base, "spec": "torch-fast:int8", "backend": "torch-fast"},
        {**base, "spec": "triton:vllm", "skipped": True, "engine_busy_s": 1.0},
    ]
    rows = overhead_rows({"runs": runs})
    assert rows == [["`triton:torch-fast:int8`", "1", "16", "10.00", "9.84", "98 %", "10 ms"]]
    assert overhead_section({"runs": runs[1:]}) == []
    assert overhead_section({"runs": runs})[0] == "### Served overhead"
