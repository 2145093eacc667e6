"""TensorRT-LLM 1.2.x: build the Qwen3 engine from the merged checkpoint and run Canary-Qwen with it.

The LLM half goes through TensorRT-LLM's TensorRT-engine flow (the last line that has it is 1.2.x):
``convert_checkpoint.py`` (qwen) turns the merged Hugging Face checkpoint (``llm_merged/``, written by
``export.merge_lora`` with an explicit ``lm_head.weight``) into a TensorRT-LLM checkpoint, and
``trtllm-build`` compiles it with a prompt-tuning table large enough for one clip's audio frames per
request. Audio reaches the engine through that table (``prompt_table``): the placeholder becomes fake
ids ``vocab_size ..``, the frames become the request's table.

Matched against NVIDIA/TensorRT-LLM sources (the 1.2.x tags themselves could not be fetched here; files
were read at the newest stored commits of the 1.x line, which the 1.2 release shares):

- ``examples/models/core/qwen/convert_checkpoint.py``: ``--model_dir``, ``--output_dir``, ``--dtype``
  {auto, float16, bfloat16, float32}, ``--tp_size``, ``--pp_size``, ``--workers``; calls
  ``QWenForCausalLM.from_hugging_face``. ``models/qwen/config.py`` accepts ``model_type`` ``qwen3`` and
  reads ``architectures[0]``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``,
  ``rope_scaling``, ``max_position_embeddings``, ``vocab_size``, ``torch_dtype``, ``tie_word_embeddings``.
  ``models/qwen/model.py``: for ``qwen3`` the unified loader maps only ``q_layernorm -> q_norm`` and
  ``k_layernorm -> k_norm``; the ``lm_head -> model.embed_tokens`` redirect for tied embeddings exists
  for qwen2/qwen2_vl only, hence the explicit ``lm_head.weight`` in ``llm_merged``.
  The script is not in the ``tensorrt_llm`` wheel: it lives in the repository's ``examples/`` (in NGC
  TensorRT-LLM release containers at ``/app/tensorrt_llm/examples/models/core/qwen/convert_checkpoint.py``).
- ``tensorrt_llm/commands/build.py`` (``trtllm-build``): ``--checkpoint_dir``, ``--output_dir``,
  ``--max_batch_size``, ``--max_input_len``, ``--max_seq_len``, ``--max_num_tokens``,
  ``--max_beam_width``, ``--max_prompt_embedding_table_size`` (alias ``--max_multimodal_len``),
  ``--kv_cache_type {continuous,paged,disabled}`` (``--paged_kv_cache`` is deprecated),
  ``--input_timing_cache``/``--output_timing_cache``, ``--workers``; plugin options from
  ``tensorrt_llm/plugin/plugin.py`` ``cli_plugin_args``: ``--gemm_plugin {auto,float16,float32,bfloat16,...,disable}``,
  ``--gpt_attention_plugin``, ``--context_fmha``, ``--remove_input_padding``, ``--use_paged_context_fmha``
  (booleans take ``enable``/``disable``). trtllm-build always builds strongly typed networks.
- ``tensorrt_llm/runtime/model_runner_cpp.py``: ``ModelRunnerCpp.from_dir(engine_dir, *, max_batch_size,
  max_input_len, max_output_len, kv_cache_free_gpu_memory_fraction, kv_cache_enable_block_reuse, ...)``
  wraps ``bindings.executor.Executor``; ``generate(batch_input_ids: List[Tensor], prompt_table,
  prompt_tasks, input_token_extra_ids, max_new_tokens, end_id, pad_id, ...)`` gives every request the
  same ``max_new_tokens`` and builds one ``trtllm.PromptTuningConfig(embedding_table=prompt_table[task],
  input_token_extra_ids=...)`` per request. :class:`TrtLlmBackend` enqueues the same ``trtllm.Request``
  objects on ``runner.executor`` itself so each clip keeps its own token budget.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Transcription, token_budgets, until_eos
from .errors import TENSORRT_LLM_REQUIREMENT, MissingDependencyError, import_tensorrt_llm
from .prompt_table import PromptTableError, build_request, check_distinct_extra_ids

TRTLLM_VERSION = "1.2"
ENGINE_DTYPES = ("bfloat16", "float16", "float32")
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
    *, max_batch: int, max_audio_frames: int, max_prompt_text_tokens: int = 64, max_new_tokens: int = 128,
    max_num_tokens: int | None = None,
) -> LlmEngineSizes:
    for name, value in (("max_batch", max_batch), ("max_audio_frames", max_audio_frames),
                        ("max_prompt_text_tokens", max_prompt_text_tokens), ("max_new_tokens", max_new_tokens)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
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
    max_new_tokens: int = 128,
    dtype: str = "bfloat16",
    checkpoint_dir: str | os.PathLike | None = None,
    convert_script: str | os.PathLike | None = None,
    examples_dir: str | os.PathLike | None = None,
    python: str | None = None,
    trtllm_build: str = "trtllm-build",
    max_num_tokens: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    workers: int = 1,
) -> list[list[str]]:
    """[convert_checkpoint.py command, trtllm-build command] for a single-GPU engine in ``out_dir``.

    The TensorRT-LLM checkpoint goes to ``checkpoint_dir`` (default ``<out_dir>_checkpoint``). The
    engine is paged-KV, input-padding-free, with paged context FMHA (needed for KV-cache block reuse and
    chunked context) and the GEMM plugin in the model dtype.
    """
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(ENGINE_DTYPES)}, got {dtype!r}")
    sizes = engine_sizes(max_batch=max_batch, max_audio_frames=max_audio_frames,
                         max_prompt_text_tokens=max_prompt_text_tokens, max_new_tokens=max_new_tokens,
                         max_num_tokens=max_num_tokens)
    out = Path(out_dir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + "_checkpoint")
    script = Path(convert_script) if convert_script is not None else find_convert_script(examples_dir)
    convert = [
        python or sys.executable, str(script),
        "--model_dir", str(merged_hf_dir),
        "--output_dir", str(ckpt),
        "--dtype", dtype,
        "--tp_size", "1",
        "--pp_size", "1",
        "--workers", str(workers),
    ]
    build = [
        trtllm_build,
        "--checkpoint_dir", str(ckpt),
        "--output_dir", str(out),
        "--max_batch_size", str(sizes.max_batch),
        "--max_input_len", str(sizes.max_input_len),
        "--max_seq_len", str(sizes.max_seq_len),
        "--max_num_tokens", str(sizes.max_num_tokens),
        "--max_beam_width", "1",
        "--max_prompt_embedding_table_size", str(sizes.max_prompt_embedding_table_size),
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--gemm_plugin", "auto",
        "--gpt_attention_plugin", "auto",
        "--workers", str(workers),
    ]
    if timing_cache is not None:
        build += ["--input_timing_cache", str(timing_cache), "--output_timing_cache", str(timing_cache)]
    return [convert, build]


def build_llm_engine(
    merged_hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    keep_checkpoint: bool = False,
    log=print,
    **options,
) -> Path:
    """Run :func:`trtllm_build_commands` (needs TensorRT-LLM 1.2.x and a GPU); returns the engine directory.

    ``options`` are :func:`trtllm_build_commands`' keywords (max_batch and max_audio_frames required;
    dtype, checkpoint_dir, convert_script, examples_dir, max_num_tokens, timing_cache, workers, ...).
    """
    tllm = import_tensorrt_llm()
    version = getattr(tllm, "__version__", "?")
    if not str(version).startswith(TRTLLM_VERSION):
        log(f"warning: tensorrt_llm {version} is installed; these commands were written for {TRTLLM_VERSION}.x")
    if "trtllm_build" not in options:
        found = shutil.which("trtllm-build")
        if found is None:
            raise MissingDependencyError("trtllm-build", TENSORRT_LLM_REQUIREMENT, "tensorrt_llm imports but its trtllm-build is not on PATH")
        options["trtllm_build"] = found
    commands = trtllm_build_commands(merged_hf_dir, out_dir, **options)
    for step, command in zip(("convert_checkpoint.py", "trtllm-build"), commands):
        log("+ " + " ".join(command))
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{step} failed with exit status {result.returncode}: {' '.join(command)}")
    if not keep_checkpoint:
        shutil.rmtree(commands[0][commands[0].index("--output_dir") + 1], ignore_errors=True)
    return Path(out_dir)


def read_engine_config(engine_dir: str | os.PathLike) -> dict:
    """The engine's ``config.json`` (``pretrained_config`` + ``build_config``, as trtllm-build writes it)."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the engine first (canary_qwen.engines.trtllm.build_llm_engine)")
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


class TrtLlmBackend:
    """Canary-Qwen on TensorRT: audio encoder (TensorRT engine, else the ONNX graph) + TensorRT-LLM Qwen3.

    ``export_dir``: a ``canary-qwen export`` directory. Engines default to ``<export_dir>/trt/llm_engine``
    and ``<export_dir>/trt/encoder.plan``. Greedy decoding, one request per clip with its own token budget,
    its own prompt table and its own extra id; output tokens up to the first eos.
    """

    name = "trt"

    def __init__(
        self,
        export_dir,
        *,
        device: str = "cuda",
        llm_engine_dir=None,
        encoder_engine=None,
        kv_cache_free_gpu_memory_fraction: float = 0.9,
        kv_cache_reuse: bool = True,
    ):
        if not str(device).startswith("cuda"):
            raise ValueError(f"TensorRT-LLM runs on an NVIDIA GPU: device must be cuda, got {device!r}")
        import_tensorrt_llm()  # a MissingDependencyError naming TensorRT-LLM 1.2.x when absent
        from tensorrt_llm.runtime import ModelRunnerCpp
        from tensorrt_llm.bindings import executor as trtllm

        from ..export.manifest import read_manifest
        from ..model.tokenizer import QwenTokenizer

        self._trtllm = trtllm
        self.manifest = read_manifest(export_dir)
        info = self.manifest.model
        paths = default_engine_paths(self.manifest.root)
        self.engine_dir = Path(llm_engine_dir) if llm_engine_dir is not None else paths["llm_engine"]
        self.limits = engine_limits(read_engine_config(self.engine_dir))
        if self.limits.vocab_size != info["vocab_size"] or self.limits.hidden_size != info["hidden_size"]:
            raise ValueError(
                f"engine {self.engine_dir} has vocab {self.limits.vocab_size} / hidden {self.limits.hidden_size}, "
                f"the export has {info['vocab_size']} / {info['hidden_size']}: not built from this export"
            )
        if self.limits.max_prompt_embedding_table_size <= 0:
            raise ValueError(f"engine {self.engine_dir} was built without --max_prompt_embedding_table_size: it cannot take audio")
        self.tokenizer = QwenTokenizer(self.manifest.artifact("tokenizer"), info["audio_locator_tag"])
        self.kv_cache_reuse = kv_cache_reuse
        self.runner = ModelRunnerCpp.from_dir(
            str(self.engine_dir),
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            kv_cache_enable_block_reuse=kv_cache_reuse,
        )
        self.dtype = self.limits.dtype
        self.torch_dtype = self.runner.dtype
        self.table_device = device  # where prompt tables are handed to the executor (GPU memory)
        encoder_path = Path(encoder_engine) if encoder_engine is not None else paths["encoder"]
        if encoder_path.is_file():
            from .trt_encoder import TrtEncoder

            self.encoder = TrtEncoder(encoder_path, device=device)
        else:  # the ONNX graph: on the GPU with onnxruntime-gpu, else on the CPU
            import onnxruntime as ort

            from .onnx_backend import OnnxEncoder

            ort_device = device if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            self.encoder = OnnxEncoder(self.manifest.artifact("encoder"), device=ort_device)
        self.timings: dict[str, float] = {}

    def _table(self, embeddings):
        """A clip's frames [T, H] as a contiguous CUDA tensor in the engine dtype."""
        import torch

        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        return embeddings.to(device=self.table_device, dtype=self.torch_dtype).contiguous()

    def generate_ids(self, prompt: Sequence[int], clip_embeddings: Sequence, budgets: Sequence[int]) -> list[list[int]]:
        """Greedy token ids per clip (eos excluded) for ``prompt`` (with one placeholder) and frames [T_i, H]."""
        import torch

        trtllm, tok = self._trtllm, self.tokenizer
        clip_embeddings, budgets = list(clip_embeddings), [int(b) for b in budgets]
        if len(budgets) != len(clip_embeddings):
            raise ValueError(f"{len(budgets)} token budgets for {len(clip_embeddings)} clips")
        requests, tables = [], []
        for emb in clip_embeddings:
            table = self._table(emb)
            # Ids and extra ids from the protocol (numpy); the extra id hashes the bytes the engine will see.
            host = table.float().cpu().numpy() if table.dtype == torch.bfloat16 else table.cpu().numpy()
            req = build_request(prompt, host, placeholder_id=tok.placeholder_id, vocab_size=self.limits.vocab_size)
            req.validate(self.limits.vocab_size, hidden_size=self.limits.hidden_size,
                         max_prompt_vocab_size=self.limits.max_prompt_vocab_size, require_extra_ids=self.kv_cache_reuse)
            requests.append(req)
            tables.append(table)
        check_distinct_extra_ids(requests)
        for req in requests:
            if req.input_length > self.limits.max_input_len:
                raise PromptTableError(f"{req.input_length} input tokens exceed the engine's max_input_len {self.limits.max_input_len}")
        output = trtllm.OutputConfig()
        output.exclude_input_from_output = True
        sampling = trtllm.SamplingConfig(beam_width=1)  # greedy: top_k/top_p unset
        enqueue, slots = [], []
        for i, (req, table, budget) in enumerate(zip(requests, tables, budgets)):
            budget = min(int(budget), self.limits.max_seq_len - req.input_length)
            if budget < 1:
                continue  # nothing to generate (the executor takes max_tokens >= 1)
            slots.append(i)
            enqueue.append(trtllm.Request(
                input_token_ids=req.input_ids.tolist(),
                max_tokens=budget,
                end_id=tok.eos_id,
                pad_id=tok.pad_id,
                sampling_config=sampling,
                output_config=output,
                prompt_tuning_config=trtllm.PromptTuningConfig(
                    embedding_table=table, input_token_extra_ids=req.prompt_table_extra_ids.tolist()
                ),
            ))
        out: list[list[int] | None] = [[] for _ in requests]
        if enqueue:
            index = dict(zip(self.runner.executor.enqueue_requests(enqueue), slots))
            for i in slots:
                out[i] = None
            while any(o is None for o in out):
                for response in self.runner.executor.await_responses():
                    i = index.get(response.request_id)
                    if i is None:
                        continue
                    if response.has_error():
                        raise RuntimeError(f"TensorRT-LLM request for clip {i} failed: {response.error_msg}")
                    if response.result.is_final:
                        out[i] = list(response.result.output_token_ids[0])
        return [until_eos(list(o)[: int(b)], tok.eos_id) for o, b in zip(out, budgets)]

    def transcribe(self, audios, *, prompt=None, max_new_tokens=128) -> list[Transcription]:
        from ..model.prompt import prompt_ids

        if not len(audios):
            return []
        budgets = token_budgets(max_new_tokens, len(audios))
        start = time.perf_counter()
        embeddings = self.encoder(audios)
        encoded = time.perf_counter()
        tokens = self.generate_ids(prompt_ids(self.tokenizer, prompt), embeddings, budgets)
        self.timings["encoder"] = self.timings.get("encoder", 0.0) + encoded - start
        self.timings["llm"] = self.timings.get("llm", 0.0) + time.perf_counter() - encoded
        return [Transcription(text=self.tokenizer.decode(t).strip(), token_ids=t) for t in tokens]


def default_engine_paths(export_dir, engines_dir=None) -> dict[str, Path]:
    """Where build-engines writes and the trt paths look: ``engines_dir`` (default ``<export_dir>/trt``)
    holding encoder.plan, llm_engine/ and llm_checkpoint/."""
    root = Path(export_dir) / TRT_SUBDIR if engines_dir is None else Path(engines_dir)
    return {"llm_engine": root / LLM_ENGINE_SUBDIR, "llm_checkpoint": root / LLM_CHECKPOINT_SUBDIR,
            "encoder": root / ENCODER_ENGINE_NAME}

