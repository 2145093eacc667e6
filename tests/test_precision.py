"""One precision rule: every entry point (transcribe, triton-repo, serve-openai, bench, the backends' constructors)
gives a backend the same default precision on the same device, and int8 is one of the precisions."""

from __future__ import annotations

import pytest

from canary_qwen.backends.engines import open_engine
from canary_qwen.backends.fast_torch import FastTorchBackend
from canary_qwen.backends.torch_ref import TorchBackend
from canary_qwen.bench.backends import BackendOptions, RunSpec
from canary_qwen.bench.backends import create_backend as bench_backend
from canary_qwen.bounds import RequestBounds
from canary_qwen.errors import UsageError
from canary_qwen.precision import Precision, default_precision, resolve_precision
from canary_qwen.registry import BACKENDS, create_backend
from canary_qwen.serving.config_check import parse_model_config
from canary_qwen.serving.engine_flavor import generate_engine_repo


def test_the_default_is_bf16_on_cuda_and_fp32_elsewhere_for_every_backend_that_takes_one():
    for name, spec in BACKENDS.items():
        for device, want in (("cpu", "fp32"), ("cuda", "bf16"), ("cuda:1", "bf16")):
            assert resolve_precision(name, None, device) == (want if spec.dtypes else None), (name, device)
    assert default_precision("cuda", (Precision.FP32,)) == Precision.FP32  # bf16 only where it is taken


def test_int8_is_a_precision_torch_fast_alone_takes():
    assert Precision.parse("int8") is Precision.INT8 and Precision.INT8 not in Precision.floats()
    assert resolve_precision("torch-fast", "int8") is Precision.INT8
    for name in ("torch", "vllm", "nemo"):
        with pytest.raises(UsageError, match="does not run in 'int8'"):
            resolve_precision(name, "int8")
    with pytest.raises(UsageError, match="its precision is that of its export or server"):
        resolve_precision("onnx", "fp32")
    with pytest.raises(UsageError, match="no dtype to hold a model in"):
        _ = Precision.INT8.torch_dtype


def test_every_entry_point_gives_torch_fast_the_same_default(tiny_checkpoint, tmp_path):
    ckpt = str(tiny_checkpoint)
    made = {
        "constructor": FastTorchBackend(ckpt).dtype,
        "transcribe": create_backend("torch-fast", ckpt).dtype,
        "serve-openai": open_engine("torch-fast", ckpt, max_batch=1, bounds=RequestBounds(max_audio_s=2)).backend.dtype,
        "bench": bench_backend(RunSpec.parse("torch-fast"), BackendOptions(model=ckpt)).dtype,
        "torch constructor": TorchBackend(ckpt).dtype,
    }
    assert made == dict.fromkeys(made, "fp32")
    for device in ("cpu", "cuda"):  # triton-repo writes the engine's precision without loading it
        repo = generate_engine_repo("torch-fast", tiny_checkpoint, tmp_path / device, device=device)
        config = parse_model_config(repo / "canary_qwen_stream" / "config.pbtxt")
        assert config.parameters["dtype"].string_value == resolve_precision("torch-fast", None, device), device
