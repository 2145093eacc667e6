"""The command line contract: JSON lines, per-file errors, exit codes, help."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import write_engines

from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.cli import main
from canary_qwen.export.manifest import read_manifest
from canary_qwen.serving.config_check import check_ensemble, parse_model_config


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.wav").write_text("this is not audio")
    sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    return [str(folder / "text.wav"), str(folder / "empty.wav"), str(folder / "missing.flac")]


def test_transcribe_json_lines_match_the_backend(capsys, tiny_checkpoint, clip_files, clips):
    code, out, err = run(
        capsys, "transcribe", "--model", str(tiny_checkpoint), "--json", "--max-new-tokens", "12", *clip_files
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["audio"] for r in rows] == clip_files
    expected = TorchBackend(str(tiny_checkpoint)).transcribe(clips, max_new_tokens=12)
    assert [r["token_ids"] for r in rows] == [e.token_ids for e in expected]
    assert [r["text"] for r in rows] == [e.text for e in expected]
    assert [r["duration_s"] for r in rows] == [round(len(c) / 16000, 3) for c in clips]
    assert "RTFx" in err


def test_bad_files_fail_one_by_one(capsys, tiny_checkpoint, clip_files, bad_files):
    code, out, err = run(
        capsys,
        "transcribe",
        "--model",
        str(tiny_checkpoint),
        "--json",
        "--max-new-tokens",
        "4",
        clip_files[0],
        *bad_files,
    )
    assert code == 1
    assert [json.loads(line)["audio"] for line in out.splitlines()] == [clip_files[0]]
    for path in bad_files:
        assert path in err
    assert "3 of 4 files failed" in err


def test_missing_model_is_one_line_error(capsys, tmp_path, clip_files):
    code, out, err = run(capsys, "transcribe", "--model", str(tmp_path / "none"), clip_files[0])
    assert code == 2 and err.startswith("error:") and "does not exist" in err and "Traceback" not in err


def test_export_then_onnx_backend_gives_same_tokens(capsys, tiny_checkpoint, clip_files, tmp_path):
    code, _, _ = run(capsys, "export", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "exp"))
    assert code == 0 and (tmp_path / "exp" / "manifest.json").is_file()
    _, torch_out, _ = run(
        capsys, "transcribe", "--model", str(tiny_checkpoint), "--json", "--max-new-tokens", "10", *clip_files
    )
    code, onnx_out, _ = run(
        capsys,
        "transcribe",
        "--backend",
        "onnx",
        "--model",
        str(tmp_path / "exp"),
        "--json",
        "--max-new-tokens",
        "10",
        *clip_files,
    )
    assert code == 0
    assert [json.loads(x)["token_ids"] for x in onnx_out.splitlines()] == [
        json.loads(x)["token_ids"] for x in torch_out.splitlines()
    ]
    # the same export on to a Triton repository; the trt flavour and build-engines say what they lack
    code, out, _ = run(
        capsys,
        "triton-repo",
        "--artifacts",
        str(tmp_path / "exp"),
        "--flavor",
        "onnx",
        "--out",
        str(tmp_path / "repo"),
        "--max-batch",
        "4",
        "--no-streaming",
    )
    assert code == 0 and "canary-qwen serve --repo" in out and check_ensemble(tmp_path / "repo") == []
    assert parse_model_config(tmp_path / "repo" / "canary_qwen" / "config.pbtxt").max_batch_size == 4
    assert not (tmp_path / "repo" / "canary_qwen_stream").exists()
    code, _, err = run(
        capsys, "triton-repo", "--artifacts", str(tmp_path / "exp"), "--flavor", "trt", "--out", str(tmp_path / "trt")
    )
    assert code == 2 and "canary-qwen build-engines" in err
    if importlib.util.find_spec("tensorrt") is None:
        code, _, err = run(capsys, "build-engines", "--artifacts", str(tmp_path / "exp"))
        assert code == 2 and "tensorrt is not available" in err and "TensorRT 10.14" in err
        assert not (tmp_path / "exp" / "trt").exists()  # stopped before doing anything
    # with engines (what build-engines leaves) the trt repository names its engine as the server will see it
    manifest = read_manifest(tmp_path / "exp")
    write_engines(tmp_path / "exp" / "trt", manifest, vocab_size=manifest.model["vocab_size"])
    trt_args = ["triton-repo", "--artifacts", str(tmp_path / "exp"), "--flavor", "trt", "--out", str(tmp_path / "trt")]
    code, _, err = run(capsys, *trt_args, "--engine-dir-in-server", "trt/tensorrt_llm/1")
    assert code == 2 and "absolute path" in err  # tensorrt_llm would not resolve it against the repository
    code, out, _ = run(capsys, *trt_args, "--engine-dir-in-server", "/srv/trt/tensorrt_llm/1")
    assert code == 0 and "--model-repository /srv/trt" in out
    engine_dir = parse_model_config(tmp_path / "trt" / "tensorrt_llm" / "config.pbtxt").parameters["gpt_model_path"]
    assert engine_dir.string_value == "/srv/trt/tensorrt_llm/1"


def test_a_precision_the_backend_cannot_take_is_refused(capsys, tiny_checkpoint, clip_files):
    # An export runs in its own precision: asking onnx for bf16 would otherwise be silently ignored.
    code, _, err = run(capsys, "transcribe", "--backend", "onnx", "--dtype", "bf16", "--model", "x", clip_files[0])
    assert code == 2 and "onnx does not run in 'bf16'" in err and "Traceback" not in err


def test_onnx_backend_on_a_checkpoint_dir_says_to_export(capsys, tiny_checkpoint, clip_files):
    code, _, err = run(capsys, "transcribe", "--backend", "onnx", "--model", str(tiny_checkpoint), clip_files[0])
    assert code == 2 and "canary-qwen export" in err


def test_long_clip_is_windowed(capsys, tiny_checkpoint, tmp_path):
    from conftest import make_clip

    long = np.concatenate([make_clip(3.0, 1), np.zeros(8000, np.float32), make_clip(2.0, 2)])
    sf.write(tmp_path / "long.wav", long, 16000)
    _, whole, _ = run(
        capsys,
        "transcribe",
        "--model",
        str(tiny_checkpoint),
        "--json",
        "--max-window-s",
        "0",
        "--max-new-tokens",
        "5",
        str(tmp_path / "long.wav"),
    )
    _, windowed, _ = run(
        capsys,
        "transcribe",
        "--model",
        str(tiny_checkpoint),
        "--json",
        "--max-window-s",
        "4",
        "--max-new-tokens",
        "5",
        str(tmp_path / "long.wav"),
    )
    assert len(json.loads(whole)["token_ids"]) == 5
    assert len(json.loads(windowed)["token_ids"]) == 10  # two windows, five tokens each


def test_make_checkpoint_and_help(capsys, tmp_path):
    code, out, _ = run(capsys, "make-checkpoint", "--size", "tiny", "--out", str(tmp_path / "c"), "--seed", "5")
    assert code == 0 and (tmp_path / "c" / "model.safetensors").is_file()
    for command in (
        "transcribe",
        "export",
        "make-checkpoint",
        "build-engines",
        "triton-repo",
        "serve",
        "bench",
        "demo",
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200
    with pytest.raises(SystemExit) as exit_info:
        main(["client", "transcribe", "--help"])
    assert exit_info.value.code == 0 and "--stream" in capsys.readouterr().out


def test_demo_runs_end_to_end(capsys, tmp_path, clip_files):
    """The README's main job: tiny checkpoint -> export -> repository -> bundled server -> client."""
    from conftest import HAVE_TRITON, NO_TRITON

    from canary_qwen.pipeline.speech_clip import ensure_espeak

    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    spoken = ensure_espeak() is not None
    code, out, err = run(
        capsys, "demo", "--work", str(tmp_path / "demo"), *([] if spoken else ["--audio", clip_files[0]])
    )
    assert code == 0, out + err
    assert "matches the local ONNX Runtime backend: yes" in out and "RTFx:" in out
    assert ("speaking" in out) == spoken
