"""ONNX Runtime backend: the embedded default (CPU provider; CUDA where onnxruntime-gpu is installed).

Torch-free (numpy + onnxruntime + tokenizers), so the Triton python models reuse these sessions without
paying torch's import time and memory in every stub.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from ..decoding import greedy_decode, splice_and_pad, token_budgets
from ..decoding.greedy import TokenCallback
from ..defaults import MAX_NEW_TOKENS
from ..engines.base import AUDIO, EngineRequest
from ..errors import BackendUnavailable, InputError
from ..export.manifest import read_manifest
from ..model.prompt import prompt_ids
from ..model.tokenizer import QwenTokenizer
from ..modes import ASR
from .base import Transcription, pad_waveforms


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "--device cuda needs onnxruntime-gpu (this onnxruntime offers "
                f"{', '.join(ort.get_available_providers())})"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BackendUnavailable(f"unknown device {device!r} (cpu or cuda)")


def session(path, device: str, threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """``arena``: ONNX Runtime's CPU memory arena, 5-9 % faster at full size. It keeps every block it ever took
    and grows in steps as batch shapes vary, so a long-running server turns it off: memory then follows the
    load (docs/deployment.md, the soak)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers_for(device))


class OnnxEncoder:
    """``encoder.onnx`` as a callable: waveforms of any lengths -> per-clip embeddings [T_i, H], in one run."""

    def __init__(self, path, device: str = "cpu", threads: int | None = None, arena: bool = True):
        self.session = session(path, device, threads, arena)

    def __call__(self, audios) -> list[np.ndarray]:
        audio, lengths = pad_waveforms(audios)
        embeds, lens = self.session.run(None, {"audio": audio, "audio_lengths": lengths})
        embeds = embeds.astype(np.float32, copy=False)  # an fp16 graph's output joins fp32 token embeddings
        return [embeds[i, : int(n)] for i, n in enumerate(lens)]


class OnnxDecoder:
    """``decoder.onnx`` (one merged-LoRA Qwen3 step with a KV cache) and greedy decoding over it; the cache
    input names are read from the graph."""

    def __init__(self, path, model_info: dict, device: str = "cpu", threads: int | None = None, arena: bool = True):
        self.session = session(path, device, threads, arena)
        self.info = model_info
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]

    def empty_caches(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info["num_key_value_heads"], 0, self.info["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def __call__(self, embeds, mask, positions, caches):
        """One step: embeds [B, t, H], mask [B, past + t] int64, positions [B, t] -> (last logits [B, V], caches)."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self.past_names, caches))
        logits, *caches = self.session.run(None, feeds)
        return logits, caches

    def generate(
        self,
        embed_table: np.ndarray,
        embeds: np.ndarray,
        valid: np.ndarray,
        budgets,
        *,
        on_token: TokenCallback | None = None,
    ) -> list[list[int]]:
        """Greedy tokens per row (eos excluded) for left-padded ``embeds`` [B, L, H] with validity ``valid`` [B, L]."""
        mask = valid.astype(np.int64)
        positions = np.where(valid, np.cumsum(mask, axis=1) - 1, 0)
        next_position = positions[:, -1:] + 1
        caches = self.empty_caches(len(embeds))

        def prefill() -> list[int]:
            nonlocal caches
            logits, caches = self(embeds, mask, positions, caches)
            return logits.argmax(-1).tolist()

        def step(tokens: list[int]) -> list[int]:
            nonlocal mask, caches, next_position
            mask = np.concatenate((mask, np.ones((len(tokens), 1), dtype=np.int64)), axis=1)
            fed = np.asarray(embed_table[np.asarray(tokens, dtype=np.int64)])[:, None]
            logits, caches = self(fed, mask, next_position, caches)
            next_position = next_position + 1
            return logits.argmax(-1).tolist()

        return greedy_decode(prefill, step, budgets, self.info["eos_id"], self.info["pad_id"], on_token)


class OnnxBackend:
    name = "onnx"

    def __init__(self, export_dir, *, device: str = "cpu", threads: int | None = None, arena: bool = True):
        self.manifest = read_manifest(export_dir)
        info = self.manifest.model
        # fp32 graphs whatever the export's TensorRT precision, unless it wrote a quantized decoder for ONNX Runtime
        quantization = self.manifest.data.get("onnx", {}).get("quantization")
        self.dtype = "fp32" if quantization is None else quantization["method"]
        self.encoder = OnnxEncoder(self.manifest.onnx_graph("encoder"), device, threads, arena)
        self.decoder = OnnxDecoder(self.manifest.onnx_graph("decoder"), info, device, threads, arena)
        self.embed_table = np.load(self.manifest.artifact("embed_tokens"), mmap_mode="r")
        self.tokenizer = QwenTokenizer(self.manifest.artifact("tokenizer"), info["audio_locator_tag"])

    def generate(self, prompts: Sequence[Sequence[int]], audios, budgets: Sequence[int]) -> list[list[int]]:
        """Greedy ids (eos excluded) per clip, each with its own prompt ids, in one encoder and decoder batch."""
        embeds, valid = splice_and_pad(
            prompts, self.encoder(audios), self.embed_table.__getitem__, self.tokenizer.placeholder_id
        )
        return self.decoder.generate(self.embed_table, embeds, valid, budgets)

    def transcribe(self, audios, *, prompt=None, max_new_tokens=MAX_NEW_TOKENS) -> list[Transcription]:
        if not len(audios):
            return []
        tok = self.tokenizer
        ids = prompt_ids(tok, prompt)
        tokens = self.generate([ids] * len(audios), audios, token_budgets(max_new_tokens, len(audios)))
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]

    def engine(self, max_batch: int) -> OnnxBatchEngine:
        return OnnxBatchEngine(self, max_batch)


NO_LLM_MODE = (
    "the onnx engine has no LLM mode: its decoder graph has the LoRA merged in (serve LLM mode with torch-fast or "
    "vllm; docs/llm-mode.md)"
)


class OnnxBatchEngine:
    """ONNX Runtime as a step engine (``canary_qwen.engines.StepEngine``, taking audio): each step decodes up to
    ``max_batch`` waiting clips as one batch to its end. Requests that come meanwhile wait for the next batch
    (the decoder graph's cache has no slots to join), and a request's tokens all come at its batch's end."""

    takes = AUDIO

    def __init__(self, backend: OnnxBackend, max_batch: int):
        self.backend, self.tokenizer, self.max_batch = backend, backend.tokenizer, max_batch
        self._waiting: deque[EngineRequest] = deque()

    def admit(self, requests: Sequence[EngineRequest]) -> list[InputError | None]:
        """Queue the clips; LLM-mode rows are refused (the export's decoder graph has its LoRA merged)."""
        refusals: list[InputError | None] = []
        for request in requests:
            if request.mode == ASR:
                self._waiting.append(request)
                refusals.append(None)
            else:
                refusals.append(InputError(NO_LLM_MODE))
        return refusals

    def step(self) -> list[tuple[str, list[int], bool]]:
        batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
        tokens = self.backend.generate(
            [r.prompt_ids for r in batch],
            [np.asarray(r.source, dtype=np.float32) for r in batch],
            [r.budget for r in batch],
        )
        return [(r.request_id, t, True) for r, t in zip(batch, tokens)]

    def abort(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        self._waiting = deque(r for r in self._waiting if r.request_id not in gone)

    @property
    def busy(self) -> bool:
        return bool(self._waiting)

    def close(self) -> None:
        self._waiting.clear()
