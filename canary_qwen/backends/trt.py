"""The trt backend: audio encoder (TensorRT plan, else the ONNX graph) + TensorRT-LLM 1.2.x Qwen3 engine.

Audio reaches the LLM engine through its prompt-embedding table (``canary_qwen.protocol.prompt_table``): the
placeholder becomes fake ids ``vocab_size ..``, the frames become the request's table. The encoder plan runs
on torch CUDA tensors (``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on the current
torch stream). TensorRT and TensorRT-LLM are imported when a backend is made, never at import time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..decoding import token_budgets, until_eos
from ..defaults import KV_CACHE_FRACTION, MAX_NEW_TOKENS
from ..errors import ExternalToolError, MissingDependencyError, UsageError
from ..export.tensorrt import import_tensorrt, import_tensorrt_llm, tensorrt_environment
from ..export.tensorrt.encoder_engine import INPUTS, OUTPUTS, pad_to_min_samples
from ..export.tensorrt.llm_engine import default_engine_paths, engine_limits, read_engine_config
from ..protocol.prompt_table import PromptTableError, build_request, check_distinct_extra_ids
from . import onnx_runtime
from .base import Transcription, pad_waveforms


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise RuntimeError(f"unsupported TensorRT I/O dtype {dtype}")
    return table[dtype]


class TrtEncoder:
    """Runs the encoder engine: waveforms -> per-clip embeddings, or batched torch tensors.

    ``__call__(audios)`` takes 1-D float32 waveforms and returns a list of [T_i, H] CUDA tensors
    (the engine's output dtype); :meth:`run` takes padded ``audio`` [B, S] and ``audio_lengths`` [B].
    """

    def __init__(self, engine_path: str | os.PathLike, *, device: str = "cuda"):
        trt = import_tensorrt()
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is a core dependency
            raise MissingDependencyError("torch", "torch with CUDA") from e
        if not torch.cuda.is_available():
            raise MissingDependencyError("CUDA", "an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
        self.trt, self.torch = trt, torch
        self.device = torch.device(device if str(device).startswith("cuda") else "cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExternalToolError(f"cannot deserialize {engine_path} (built with another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(inputs) != set(INPUTS) or not set(OUTPUTS) <= set(names):
            raise ExternalToolError(
                f"{engine_path} has tensors {names}, expected inputs {list(INPUTS)} and outputs {list(OUTPUTS)}"
            )
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        lo, _, hi = self.engine.get_tensor_profile_shape("audio", 0)
        self.max_batch, self.max_samples = int(hi[0]), int(hi[1])
        self.min_samples = int(lo[1])

    def run(self, audio, audio_lengths):
        """``audio`` [B, S] float32 and ``audio_lengths`` [B] int64 (torch or numpy) -> (embeddings [B, T, H], lengths [B])."""
        torch = self.torch
        audio = torch.as_tensor(audio).to(self.device, self.dtypes["audio"]).contiguous()
        lengths = torch.as_tensor(audio_lengths).to(self.device, self.dtypes["audio_lengths"]).contiguous()
        batch, samples = audio.shape
        if batch > self.max_batch or samples > self.max_samples or samples < self.min_samples:
            raise UsageError(
                f"batch {batch} x {samples} samples is outside the engine's profile "
                f"(batch <= {self.max_batch}, {self.min_samples} <= samples <= {self.max_samples})"
            )
        ctx = self.context
        ctx.set_input_shape("audio", tuple(audio.shape))
        ctx.set_input_shape("audio_lengths", tuple(lengths.shape))
        ctx.set_tensor_address("audio", audio.data_ptr())
        ctx.set_tensor_address("audio_lengths", lengths.data_ptr())
        outputs = {}
        for name in OUTPUTS:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output {name} has a data-dependent shape {shape}: not supported by this runner")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return outputs["embeddings"], outputs["embedding_lengths"]

    def __call__(self, audios: Sequence[np.ndarray]) -> list:
        out = []
        for start in range(0, len(audios), self.max_batch):
            chunk = list(audios)[start : start + self.max_batch]
            audio, lengths = pad_waveforms(chunk)
            embeds, lens = self.run(pad_to_min_samples(audio, self.min_samples), lengths)
            out += [embeds[i, : int(n)] for i, n in enumerate(lens.tolist())]
        return out


class TrtLlmBackend:
    """Canary-Qwen on TensorRT: audio encoder (TensorRT engine, else the ONNX graph) + TensorRT-LLM Qwen3.

    ``export_dir``: a ``canary-qwen export`` directory. Engines default to ``<export_dir>/trt/llm_engine``
    and ``<export_dir>/trt/encoder.plan``. Greedy decoding, one request per clip with its own token budget,
    its own prompt table and its own extra id; output tokens up to the first eos. Several threads may transcribe
    through one backend at once: each call awaits only its own requests. Loading refuses engines built for
    another TensorRT / TensorRT-LLM version or GPU (the manifest's build record); the encoder loads before the
    executor takes ``kv_cache_free_gpu_memory_fraction`` of the GPU memory left.
    """

    name = "trt"

    def __init__(
        self,
        export_dir,
        *,
        device: str = "cuda",
        llm_engine_dir=None,
        encoder_engine=None,
        kv_cache_free_gpu_memory_fraction: float = KV_CACHE_FRACTION,
        kv_cache_reuse: bool = True,
    ):
        if not str(device).startswith("cuda"):
            raise UsageError(f"TensorRT-LLM runs on an NVIDIA GPU: device must be cuda, got {device!r}")
        if not 0.0 < kv_cache_free_gpu_memory_fraction <= 1.0:
            raise UsageError(
                f"kv_cache_free_gpu_memory_fraction must be in (0, 1], got {kv_cache_free_gpu_memory_fraction}"
            )
        tllm = import_tensorrt_llm()  # a MissingDependencyError naming TensorRT-LLM 1.2.x when absent
        from tensorrt_llm.bindings import executor as trtllm
        from tensorrt_llm.runtime import ModelRunnerCpp

        from ..export.manifest import check_engine_build, read_manifest
        from ..model.tokenizer import QwenTokenizer

        self._trtllm = trtllm
        self.manifest = read_manifest(export_dir)
        found = {**tensorrt_environment(device), "tensorrt_llm": getattr(tllm, "__version__", None)}
        check_engine_build(self.manifest.engine_build(), found)  # before loading anything
        info = self.manifest.model
        paths = default_engine_paths(self.manifest.root)
        self.engine_dir = Path(llm_engine_dir) if llm_engine_dir is not None else paths["llm_engine"]
        self.limits = engine_limits(read_engine_config(self.engine_dir))
        if self.limits.vocab_size != info["vocab_size"] or self.limits.hidden_size != info["hidden_size"]:
            raise UsageError(
                f"engine {self.engine_dir} has vocab {self.limits.vocab_size} / hidden {self.limits.hidden_size}, "
                f"the export has {info['vocab_size']} / {info['hidden_size']}: not built from this export"
            )
        if self.limits.max_prompt_embedding_table_size <= 0:
            raise UsageError(
                f"engine {self.engine_dir} was built without --max_prompt_embedding_table_size: it cannot take audio"
            )
        self.tokenizer = QwenTokenizer(self.manifest.artifact("tokenizer"), info["audio_locator_tag"])
        self.kv_cache_reuse = kv_cache_reuse
        # The encoder first: the executor sizes its KV cache from the GPU memory free when it loads.
        encoder_path = Path(encoder_engine) if encoder_engine is not None else paths["encoder"]
        self.encoder: TrtEncoder | onnx_runtime.OnnxEncoder
        if encoder_path.is_file():
            self.encoder = TrtEncoder(encoder_path, device=device)
        else:  # the ONNX graph: on the GPU with onnxruntime-gpu, else on the CPU
            import onnxruntime as ort

            ort_device = device if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            self.encoder = onnx_runtime.OnnxEncoder(self.manifest.onnx_graph("encoder"), device=ort_device)
        self.runner = ModelRunnerCpp.from_dir(
            str(self.engine_dir),
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            kv_cache_enable_block_reuse=kv_cache_reuse,
        )
        self.dtype = self.limits.dtype
        self.torch_dtype = self.runner.dtype
        self.table_device = device  # where prompt tables are handed to the executor (GPU memory)
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
            raise UsageError(f"{len(budgets)} token budgets for {len(clip_embeddings)} clips")
        requests, tables = [], []
        for emb in clip_embeddings:
            table = self._table(emb)
            # Ids and extra ids from the protocol (numpy); the extra id hashes the bytes the engine will see.
            host = table.float().cpu().numpy() if table.dtype == torch.bfloat16 else table.cpu().numpy()
            req = build_request(prompt, host, placeholder_id=tok.placeholder_id, vocab_size=self.limits.vocab_size)
            req.validate(
                self.limits.vocab_size,
                hidden_size=self.limits.hidden_size,
                max_prompt_vocab_size=self.limits.max_prompt_vocab_size,
                require_extra_ids=self.kv_cache_reuse,
            )
            requests.append(req)
            tables.append(table)
        check_distinct_extra_ids(requests)
        for req in requests:
            if req.input_length > self.limits.max_input_len:
                raise PromptTableError(
                    f"{req.input_length} input tokens exceed the engine's max_input_len {self.limits.max_input_len}"
                )
        output = trtllm.OutputConfig()
        output.exclude_input_from_output = True
        sampling = trtllm.SamplingConfig(beam_width=1)  # greedy: top_k/top_p unset
        enqueue, slots = [], []
        for i, (req, table, budget) in enumerate(zip(requests, tables, budgets)):
            budget = min(int(budget), self.limits.max_seq_len - req.input_length)
            if budget < 1:
                continue  # nothing to generate (the executor takes max_tokens >= 1)
            slots.append(i)
            enqueue.append(
                trtllm.Request(
                    input_token_ids=req.input_ids.tolist(),
                    max_tokens=budget,
                    end_id=tok.eos_id,
                    pad_id=tok.pad_id,
                    sampling_config=sampling,
                    output_config=output,
                    prompt_tuning_config=trtllm.PromptTuningConfig(
                        embedding_table=table, input_token_extra_ids=req.prompt_table_extra_ids.tolist()
                    ),
                )
            )
        out: list[list[int]] = [[] for _ in requests]
        executor = self.runner.executor
        # Await by request id: the id-less await_responses() hands over (and removes) the responses of every
        # caller's requests, so concurrent callers on one executor would lose each other's; per-id waits are safe.
        pending = dict(zip(executor.enqueue_requests(enqueue), slots)) if enqueue else {}
        while pending:
            ids = list(pending)
            for request_id, responses in zip(ids, executor.await_responses(ids)):
                for response in responses:
                    i = pending[request_id]
                    if response.has_error():
                        for other in pending:  # leave none of this call's requests running
                            executor.cancel_request(other)
                        raise ExternalToolError(f"TensorRT-LLM request for clip {i} failed: {response.error_msg}")
                    if response.result.is_final:
                        out[i] = list(response.result.output_token_ids[0])
                        del pending[request_id]
        return [until_eos(o[: int(b)], tok.eos_id) for o, b in zip(out, budgets)]

    def transcribe(self, audios, *, prompt=None, max_new_tokens=MAX_NEW_TOKENS) -> list[Transcription]:
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
