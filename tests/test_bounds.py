"""One RequestBounds the whole way: built once, written into every generated Triton model that checks requests,
read back there by RequestBounds.from_parameters; the token limit has one default (defaults.py)."""

from __future__ import annotations

import pytest
from conftest import read_bounds, write_engines

from canary_qwen.bounds import RequestBounds
from canary_qwen.defaults import MAX_NEW_TOKENS_LIMIT
from canary_qwen.errors import ArtifactError, InputError, UsageError
from canary_qwen.export.artifacts import export_all
from canary_qwen.serving.engine_flavor import generate_engine_repo
from canary_qwen.serving.onnx_flavor import generate_onnx_repo
from canary_qwen.serving.trt_flavor import generate_trt_repo

BOUNDS = RequestBounds(max_audio_s=8.0, max_new_tokens=20, max_new_tokens_limit=100, max_queue=5, queue_timeout_s=7)
# The python models that check a request against the bounds, by flavour (the others only pass tensors on).
CHECKING = {
    "onnx": ["canary_qwen_stream", "encoder", "llm", "preprocessing"],
    "torch-fast": ["canary_qwen_stream"],
    "vllm": ["canary_qwen_stream"],
    "trt": ["canary_qwen_stream", "preprocessing", "prompt_table"],
}


def test_every_flavour_carries_the_bounds_it_was_generated_with(tiny_checkpoint, tmp_path):
    export = export_all(tiny_checkpoint, tmp_path / "export", progress=False)
    write_engines(tmp_path / "engines", export, vocab_size=1024)  # the trt flavour's engines, as placeholders
    repos = {
        "onnx": generate_onnx_repo(export.root, tmp_path / "onnx", bounds=BOUNDS),
        "torch-fast": generate_engine_repo("torch-fast", tiny_checkpoint, tmp_path / "torch-fast", bounds=BOUNDS),
        "vllm": generate_engine_repo("vllm", export.root, tmp_path / "vllm", bounds=BOUNDS),
        "trt": generate_trt_repo(export.root, tmp_path / "trt", engines_dir=tmp_path / "engines", bounds=BOUNDS),
    }
    for flavour, repo in repos.items():
        carrying = {}
        for model in sorted(d for d in repo.iterdir() if (d / "config.pbtxt").is_file()):
            try:
                carrying[model.name] = read_bounds(model)
            except ArtifactError:
                continue
        assert carrying == dict.fromkeys(CHECKING[flavour], BOUNDS), flavour


def test_the_trt_flavour_holds_the_limit_to_its_engine(tiny_checkpoint, tmp_path):
    """The placeholder engine was built for 128 new tokens (max_seq_len 728 - max_input_len 600)."""
    export = export_all(tiny_checkpoint, tmp_path / "export", progress=False)
    write_engines(tmp_path / "engines", export, vocab_size=1024)
    repo = generate_trt_repo(export.root, tmp_path / "trt", engines_dir=tmp_path / "engines")
    assert read_bounds(repo / "canary_qwen_stream").max_new_tokens_limit == 128  # not the default 512
    with pytest.raises(UsageError, match="over the 128 new tokens the LLM engine was built for"):
        generate_trt_repo(
            export.root,
            tmp_path / "bad",
            engines_dir=tmp_path / "engines",
            bounds=RequestBounds(max_new_tokens=129, max_new_tokens_limit=200),
        )


def test_budgets_and_a_missing_parameter():
    bounds = RequestBounds()
    assert bounds.max_new_tokens_limit == MAX_NEW_TOKENS_LIMIT and bounds.budget(None) == bounds.max_new_tokens
    assert bounds.budget(0, least=0) == 0
    with pytest.raises(InputError, match=f"MAX_NEW_TOKENS must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got 0"):
        bounds.budget(0, name="MAX_NEW_TOKENS")
    assert RequestBounds.from_parameters(BOUNDS.parameters()) == BOUNDS
    with pytest.raises(ArtifactError, match="regenerate the repository"):
        RequestBounds.from_parameters({"max_new_tokens": "128"})  # a repository of an older version
