"""TensorRT-LLM 1.2.x engine for the Qwen3 half: the merged Hugging Face checkpoint (``llm_merged/``) ->
``convert_checkpoint.py`` (qwen) -> ``trtllm-build`` with a prompt-embedding table sized for one clip's
audio frames per request. docs/tensorrt-llm.md lists the TensorRT-LLM sources each option was read from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ...defaults import MAX_NEW_TOKENS
from ...errors import ArtifactError, ExternalToolError, MissingDependencyError, UsageError
from ...precision import Precision
from . import TENSORRT_LLM_REQUIREMENT, import_tensorrt_llm

logger = logging.getLogger(__name__)

TRTLLM_VERSION = "1.2"
# Where convert_checkpoint.py for qwen sits under an examples/ folder: 1.x layout, then the pre-0.19 one.
CONVERT_SCRIPT_PATHS = ("models/core/qwen/convert_checkpoint.py", "qwen/convert_checkpoint.py")
NGC_EXAMPLES_DIR = Path("/app/tensorrt_llm/examples")  # NGC tensorrt-llm release containers
EXAMPLES_ENV = "TRTLLM_EXAMPLES_DIR"
# Layout of the TensorRT files inside an export directory (``canary-qwen export`` output).
TRT_SUBDIR = "trt"
LLM_ENGINE_SUBDIR = "llm_engine"
LLM_CHECKPOINT_SUBDIR = "llm_checkpoint"
ENCODER_ENGINE_NAME = "encoder.plan"
MAX_NUM_TOKENS_CAP = 32768


@dataclass(frozen=True)
class LlmEngineSizes:
    """The engine limits, derived from the audio and prompt budgets."""

    max_batch: int
    max_audio_frames: int  # per clip: one table row per 80 ms frame (40 s -> 500)
    max_prompt_text_tokens: int  # prompt tokens around the placeholder
    max_new_tokens: int
    max_input_len: int  # max_audio_frames + max_prompt_text_tokens
    max_seq_len: int  # max_input_len + max_new_tokens
    max_prompt_embedding_table_size: int  # max_batch * max_audio_frames (the runtime gives each request 1/max_batch)
    max_num_tokens: int  # tokens per engine step (context chunks + generation tokens)


def engine_sizes(
    *,
    max_batch: int,
    max_audio_frames: int,
    max_prompt_text_tokens: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_num_tokens: int | None = None,
) -> LlmEngineSizes:
    for name, value in (
        ("max_batch", max_batch),
        ("max_audio_frames", max_audio_frames),
        ("max_prompt_text_tokens", max_prompt_text_tokens),
        ("max_new_tokens", max_new_tokens),
    ):
        if int(value) < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    max_input_len = max_audio_frames + max_prompt_text_tokens
    if max_num_tokens is None:
        # Enough for the whole batch's prompts in one step, capped (activation memory grows with it), and
        # never below one full prompt (trtllm-build raises it to max_input_len without chunked context).
        max_num_tokens = max(max_input_len, min(max_batch * max_input_len, MAX_NUM_TOKENS_CAP))
    return LlmEngineSizes(
        max_batch=max_batch,
        max_audio_frames=max_audio_frames,
        max_prompt_text_tokens=max_prompt_text_tokens,
        max_new_tokens=max_new_tokens,
        max_input_len=max_input_len,
        max_seq_len=max_input_len + max_new_tokens,
        max_prompt_embedding_table_size=max_batch * max_audio_frames,
        max_num_tokens=int(max_num_tokens),
    )


def find_convert_script(examples_dir: str | os.PathLike | None = None) -> Path:
    """The qwen ``convert_checkpoint.py`` of the TensorRT-LLM in use.

    Looked up under ``examples_dir``, then ``$TRTLLM_EXAMPLES_DIR``, then the ``examples/`` folder of a
    TensorRT-LLM source checkout the installed ``tensorrt_llm`` package comes from (editable installs),
    then ``/app/tensorrt_llm/examples`` (NGC TensorRT-LLM containers). The pip wheel ships no examples.
    """
    roots: list[Path] = []
    if examples_dir is not None:
        roots.append(Path(examples_dir))
    if os.environ.get(EXAMPLES_ENV):
        roots.append(Path(os.environ[EXAMPLES_ENV]))
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).resolve().parent.parent / "examples")
    roots.append(NGC_EXAMPLES_DIR)
    for root in roots:
        for rel in CONVERT_SCRIPT_PATHS:
            if (root / rel).is_file():
                return root / rel
    looked = ", ".join(str(r / CONVERT_SCRIPT_PATHS[0]) for r in roots)
    raise MissingDependencyError(
        "tensorrt_llm examples",
        "TensorRT-LLM 1.2.x's examples/models/core/qwen/convert_checkpoint.py (not part of the wheel: "
        f"clone NVIDIA/TensorRT-LLM at the installed version and pass examples_dir or set ${EXAMPLES_ENV})",
        f"looked for {looked}",
    )


def trtllm_build_commands(
    merged_hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_batch: int,
    max_audio_frames: int,
    max_prompt_text_tokens: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
    dtype: str = "bfloat16",
    checkpoint_dir: str | os.PathLike | None = None,
    convert_script: str | os.PathLike | None = None,
    examples_dir: str | os.PathLike | None = None,
    python: str | None = None,
    trtllm_build: str = "trtllm-build",
    max_num_tokens: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    workers: int = 1,
    quantized_checkpoint: str | os.PathLike | None = None,
) -> list[list[str]]:
    """[convert_checkpoint.py command, trtllm-build command] for a single-GPU engine in ``out_dir``.

    The TensorRT-LLM checkpoint goes to ``checkpoint_dir`` (default ``<out_dir>_checkpoint``). The
    engine is paged-KV, input-padding-free, with paged context FMHA (needed for KV-cache block reuse and
    chunked context) and the GEMM plugin in the model dtype. With ``quantized_checkpoint`` (a TensorRT-LLM
    checkpoint from ``canary-qwen quantize``) there is nothing to convert: [trtllm-build command] only.
    """
    dtype = Precision.parse_float(dtype).long_name  # trtllm-build and convert_checkpoint.py take the long names
    sizes = engine_sizes(
        max_batch=max_batch,
        max_audio_frames=max_audio_frames,
        max_prompt_text_tokens=max_prompt_text_tokens,
        max_new_tokens=max_new_tokens,
        max_num_tokens=max_num_tokens,
    )
    out = Path(out_dir)
    if quantized_checkpoint is not None:
        ckpt, convert = Path(quantized_checkpoint), []
    else:
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + "_checkpoint")
        convert = _convert_command(merged_hf_dir, ckpt, dtype, workers, python, convert_script, examples_dir)
    build = [
        trtllm_build,
        "--checkpoint_dir",
        str(ckpt),
        "--output_dir",
        str(out),
        "--max_batch_size",
        str(sizes.max_batch),
        "--max_input_len",
        str(sizes.max_input_len),
        "--max_seq_len",
        str(sizes.max_seq_len),
        "--max_num_tokens",
        str(sizes.max_num_tokens),
        "--max_beam_width",
        "1",
        "--max_prompt_embedding_table_size",
        str(sizes.max_prompt_embedding_table_size),
        "--kv_cache_type",
        "paged",
        "--remove_input_padding",
        "enable",
        "--context_fmha",
        "enable",
        "--use_paged_context_fmha",
        "enable",
        "--gemm_plugin",
        "auto",
        "--gpt_attention_plugin",
        "auto",
        "--workers",
        str(workers),
    ]
    if timing_cache is not None:
        build += ["--input_timing_cache", str(timing_cache), "--output_timing_cache", str(timing_cache)]
    return [convert, build] if convert else [build]


def _convert_command(
    merged_hf_dir, ckpt: Path, dtype: str, workers: int, python, convert_script, examples_dir
) -> list[str]:
    """TensorRT-LLM's qwen convert_checkpoint.py: Hugging Face checkpoint -> TensorRT-LLM checkpoint."""
    script = Path(convert_script) if convert_script is not None else find_convert_script(examples_dir)
    return [
        python or sys.executable,
        str(script),
        "--model_dir",
        str(merged_hf_dir),
        "--output_dir",
        str(ckpt),
        "--dtype",
        dtype,
        "--tp_size",
        "1",
        "--pp_size",
        "1",
        "--workers",
        str(workers),
    ]


def build_llm_engine(
    merged_hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    keep_checkpoint: bool = False,
    log=None,
    **options,
) -> Path:
    """Run :func:`trtllm_build_commands` (needs TensorRT-LLM 1.2.x and a GPU); returns the engine directory.

    ``options`` are :func:`trtllm_build_commands`' keywords (max_batch and max_audio_frames required;
    dtype, checkpoint_dir, convert_script, examples_dir, max_num_tokens, timing_cache, workers, ...).
    """
    log = log or logger.info
    tllm = import_tensorrt_llm()
    version = getattr(tllm, "__version__", "?")
    if not str(version).startswith(TRTLLM_VERSION):
        log(f"warning: tensorrt_llm {version} is installed; these commands were written for {TRTLLM_VERSION}.x")
    if "trtllm_build" not in options:
        found = shutil.which("trtllm-build")
        if found is None:
            raise MissingDependencyError(
                "trtllm-build", TENSORRT_LLM_REQUIREMENT, "tensorrt_llm imports but its trtllm-build is not on PATH"
            )
        options["trtllm_build"] = found
    commands = trtllm_build_commands(merged_hf_dir, out_dir, **options)
    converted = len(commands) == 2
    steps = ("convert_checkpoint.py", "trtllm-build") if converted else ("trtllm-build",)
    for step, command in zip(steps, commands):
        log("+ " + " ".join(command))
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise ExternalToolError(f"{step} failed with exit status {result.returncode}: {' '.join(command)}")
    if converted and not keep_checkpoint:  # never a quantized checkpoint: that one is an export artifact
        shutil.rmtree(commands[0][commands[0].index("--output_dir") + 1], ignore_errors=True)
    return Path(out_dir)


def read_engine_config(engine_dir: str | os.PathLike) -> dict:
    """The engine's ``config.json`` (``pretrained_config`` + ``build_config``, as trtllm-build writes it)."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{path} not found: build the engine first (canary-qwen build-engines)")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int  # pretrained_config.vocab_size: fake ids start here
    hidden_size: int
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_prompt_embedding_table_size: int

    @property
    def max_prompt_vocab_size(self) -> int:
        """Rows one request may send (promptTuningBuffers: max_prompt_embedding_table_size / max_batch_size)."""
        return self.max_prompt_embedding_table_size // self.max_batch_size


def engine_limits(config: dict) -> EngineLimits:
    pretrained, build = config["pretrained_config"], config["build_config"]
    return EngineLimits(
        vocab_size=int(pretrained["vocab_size"]),
        hidden_size=int(pretrained["hidden_size"]),
        dtype=str(pretrained["dtype"]),
        max_batch_size=int(build["max_batch_size"]),
        max_input_len=int(build["max_input_len"]),
        max_seq_len=int(build["max_seq_len"]),
        max_prompt_embedding_table_size=int(build.get("max_prompt_embedding_table_size") or 0),
    )


def default_engine_paths(export_dir, engines_dir=None) -> dict[str, Path]:
    """Where build-engines writes and the trt paths look: ``engines_dir`` (default ``<export_dir>/trt``)
    holding encoder.plan, llm_engine/ and llm_checkpoint/."""
    root = Path(export_dir) / TRT_SUBDIR if engines_dir is None else Path(engines_dir)
    return {
        "llm_engine": root / LLM_ENGINE_SUBDIR,
        "llm_checkpoint": root / LLM_CHECKPOINT_SUBDIR,
        "encoder": root / ENCODER_ENGINE_NAME,
    }
