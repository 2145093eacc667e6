"""Shared fixtures: tiny random checkpoints in the real layout, deterministic test audio, and the
bundled Triton server."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from canary_qwen.bounds import RequestBounds
from canary_qwen.export.manifest import record_engine_build
from canary_qwen.export.tensorrt.encoder_engine import EncoderProfile
from canary_qwen.model.synthetic import make_checkpoint
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.bundled import TritonNotFoundError, find_bundled_triton
from canary_qwen.serving.server import TritonServer

# Three architectures: the released one (LoRA on q/v, no xscaling), and two variations.
CHECKPOINT_VARIANTS = {
    "qv-lora": dict(seed=0),
    "xscaling-no-lora": dict(seed=1, xscaling=True, lora_targets=None),
    "all-attn-lora": dict(seed=2, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
}
CLIP_SECONDS = (2.3, 1.1, 3.4, 0.55)
EOS_PRONE_SECONDS = (2.3, 1.1, 3.4, 0.55, 1.7, 2.9)


def boost_token(checkpoint, token: str, factor: float):
    """Scale one token's (tied) embedding so random weights emit it often: exercises eos handling."""
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    token_id = QwenTokenizer(checkpoint, "<|audioplaceholder|>").token_to_id(token)
    tensors["embed_tokens.weight"][token_id] *= factor
    save_file(tensors, str(path), metadata={"format": "pt"})
    return checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported (ONNX graphs, tokenizer, manifest): what the served repositories are made of."""
    from canary_qwen.export.artifacts import export_all

    return export_all(tiny_checkpoint, tmp_path_factory.mktemp("export"), progress=False).root


@pytest.fixture(scope="session")
def eos_prone_checkpoint(tmp_path_factory):
    """Seed 3 with <|im_end|> boosted x2: of six clips some stop at eos after 0-18 tokens, one runs to 24."""
    return boost_token(make_checkpoint(tmp_path_factory.mktemp("eos") / "ckpt", "tiny", seed=3), "<|im_end|>", 2.0)


@pytest.fixture(scope="session")
def eos_prone_clips():
    return [make_clip(s, i) for i, s in enumerate(EOS_PRONE_SECONDS)]


@pytest.fixture(scope="session", params=list(CHECKPOINT_VARIANTS))
def variant_checkpoint(request, tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp(request.param) / "ckpt", "tiny", **CHECKPOINT_VARIANTS[request.param]
    )


def make_clip(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test signal: a few gliding harmonics under noise, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="session")
def clips():
    return [make_clip(s, i) for i, s in enumerate(CLIP_SECONDS)]


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory, clips):
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for i, clip in enumerate(clips):
        path = folder / f"clip{i}.wav"
        sf.write(path, clip, 16000, subtype="FLOAT")
        paths.append(str(path))
    return paths


# -- the bundled Triton server ------------------------------------------------------------------------------
try:
    find_bundled_triton()
    HAVE_TRITON = True
except TritonNotFoundError:
    HAVE_TRITON = False
NO_TRITON = "nvidia-pytriton (bundled tritonserver) not installed"
needs_server = pytest.mark.skipif(not HAVE_TRITON, reason=NO_TRITON)


@contextmanager
def running_server(repo, work_dir, startup_timeout: float = 120.0):
    """The bundled Triton server on ``repo``, stopped afterwards; the test skips where it is not installed."""
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    with TritonServer(repo, startup_timeout=startup_timeout, work_dir=work_dir) as server:
        yield server


def read_bounds(model_dir) -> RequestBounds:
    """The request bounds a generated model's config carries, read as the model reads them at start."""
    from canary_qwen.serving.config_check import parse_model_config

    config = parse_model_config(Path(model_dir) / "config.pbtxt")
    return RequestBounds.from_parameters({k: v.string_value for k, v in config.parameters.items()})


def stream_counts(server, model: str = "canary_qwen_stream") -> dict[str, float]:
    """What a streaming python model counted (canary_qwen/serving/models/metrics.py), from the server's metrics
    endpoint: tokens generated, requests finished, cancelled and failed, responses sent, and (the engine model) requests
    pending and engine steps."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    counts = dict.fromkeys(("tokens", "finished", "cancelled", "failed"), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "canary_qwen_tokens_total":
                counts["tokens"] = sample.value
            elif sample.name == "canary_qwen_requests_ended_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name == "canary_qwen_requests_pending":
                counts["pending"] = sample.value
            elif sample.name == "canary_qwen_engine_steps_total":
                counts["steps"] = sample.value
            elif sample.name == "canary_qwen_responses_total":
                counts["responses"] = sample.value
    return counts


def wait_for_counts(read, until, timeout: float = 60.0) -> dict[str, float]:
    """``read()`` again until ``until(counts)`` holds; the counts then (the test fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while not until(counts := read()):
        assert time.monotonic() < deadline, f"counts never got there: {counts}"
        time.sleep(0.1)
    return counts


def plain_infer(url: str, protocol: str, clip: np.ndarray, model: str = "canary_qwen") -> tuple[str, list[int]]:
    """One clip through tritonclient's plain infer (HTTP /v2/models/MODEL/infer, gRPC ModelInfer), as any Triton
    user sends it: (TEXT, OUTPUT_IDS)."""
    module = importlib.import_module(f"tritonclient.{protocol}")
    with module.InferenceServerClient(url) as client:
        audio = module.InferInput("AUDIO", [1, len(clip)], "FP32")
        audio.set_data_from_numpy(np.asarray(clip, dtype=np.float32)[None])
        outputs = [module.InferRequestedOutput(n) for n in ("TEXT", "OUTPUT_IDS")]
        result = client.infer(model, [audio], outputs=outputs)
    return result.as_numpy("TEXT").reshape(-1)[0].decode(), result.as_numpy("OUTPUT_IDS").reshape(-1).tolist()


def perf_analyzer(url: str, protocol: str, model: str, out_dir, *, streaming: bool = False) -> str:
    """Triton's perf_analyzer against ``model`` with a real clip as --input-data (every input, optional ones too:
    it would fill missing ones with random data); its report. Skips where the binary is missing."""
    binary = shutil.which("perf_analyzer") or shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip(
            "no perf_analyzer binary: scripts/install_perf_analyzer.py (run by scripts/setup.sh) puts it in "
            ".venv/bin on Linux x86_64; it did not run or could not download it"
        )
    clip = make_clip(1.0, 7)
    data = Path(out_dir) / "input.json"
    inputs = {"AUDIO": {"content": clip.tolist(), "shape": [len(clip)]}, "PROMPT": ["Transcribe the following:"]}
    data.write_text(json.dumps({"data": [{**inputs, "MAX_NEW_TOKENS": [16]}]}))
    argv = [binary, "-m", model, "-u", url, "-i", protocol, "--input-data", str(data), "--concurrency-range", "1:2"]
    # It must measure, not judge: a 2-core machine that also runs the server never holds a latency within a
    # tight band, so counted windows of a few requests each, and any spread up to 10x counts as stable.
    argv += ["--measurement-mode", "count_windows", "--measurement-request-count", "8"]
    argv += ["--stability-percentage", "1000", "--max-trials", "10"]
    run = subprocess.run([*argv, *(["--streaming"] if streaming else [])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Throughput" in run.stdout
    return run.stdout


def write_engines(
    root, manifest, *, vocab_size: int, max_batch: int = 8, dtype: str = "bfloat16", max_new_tokens: int = 128
):
    """What `canary-qwen build-engines` leaves for the trt flavour, without TensorRT: trt/encoder.plan and
    trt/llm_engine/ with the config.json trtllm-build writes (pretrained_config + build_config), and the
    manifest's build record. The generator reads only that config and record; the engine bytes are linked,
    never parsed, so they are placeholders here. ``vocab_size``: the engine's, where fake ids start;
    ``max_new_tokens``: the answer length it is built for (max_seq_len - max_input_len)."""
    profile = EncoderProfile(opt_samples=4 * 16000, max_samples=8 * 16000)
    record_engine_build(
        manifest.root,
        {
            "tensorrt": "10.14.1.48",
            "tensorrt_llm": "1.2.0",
            "compute_capability": "9.0",
            "encoder_profile": asdict(profile),
        },
    )
    root = Path(root)
    (root / "llm_engine").mkdir(parents=True, exist_ok=True)
    (root / "encoder.plan").write_bytes(b"placeholder for a serialized TensorRT engine")
    (root / "llm_engine" / "rank0.engine").write_bytes(b"placeholder for a TensorRT-LLM engine")
    pretrained = {
        "architecture": "Qwen3ForCausalLM",
        "dtype": dtype,
        "vocab_size": vocab_size,
        "hidden_size": manifest.model["hidden_size"],
    }
    build = {
        "max_batch_size": max_batch,
        "max_input_len": 600,
        "max_seq_len": 600 + max_new_tokens,
        "max_prompt_embedding_table_size": max_batch * 500,
    }
    config = {"version": "1.2.0", "pretrained_config": pretrained, "build_config": build}
    (root / "llm_engine" / "config.json").write_text(json.dumps(config))
    return root


# -- LLM mode -----------------------------------------------------------------------------------------------
def dialogue_cases():
    """Text-only dialogues every LLM-mode parity test runs: one question, and a system turn with two user turns."""
    from canary_qwen.model.prompt import Turn

    return {
        "question": [Turn("user", "Summarise: the cat sat on the mat while the dog slept.")],
        "system-two-turns": [
            Turn("system", "You answer in one short sentence."),
            Turn("user", "What is the capital of France?"),
            Turn("assistant", "<think>easy</think>\n\nParis."),
            Turn("user", "And of Italy?"),
        ],
    }
