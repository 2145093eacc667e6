"""Throughput path in PyTorch (torch-fast): the model loaded once with its linears fused and, on a CPU, prepacked by
oneDNN (``fast_layers``), length-bucketed encoder batches, and the decoder run by a static-KV-cache forward pass
(``fast_forward``) under a continuous-batching scheduler (``fast_scheduler``: finished sequences leave their
cache slot at once and queued clips take it over). On CUDA a decode step is captured once per call as a CUDA graph
and replayed for every token.

Greedy tokens are those of the reference (same weights, q/k/v and gate/up each as one matrix, ``FusedLayer``; the
LoRA kept apart and applied per row, so transcriptions and LLM-mode answers share one batch); only the order of
floating-point operations differs. ``dtype="int8"`` (CPUs
with VNNI or AMX) runs every linear in int8 (``cpu_linear.Int8Linear``), the norms, SiLU and residual
adds between them in compiled row kernels (``Int8Layer``, ``Int8FeedForward``): several times faster,
and its tokens part from fp32's at near-ties (docs/accuracy.md). On a CPU, freed memory stays in the
process while it transcribes (``cpu_heap``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from ..decoding import splice_row, token_budgets
from ..defaults import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS
from ..errors import BackendUnavailable
from ..model.conformer import ConformerLayer
from ..model.prompt import dialogue_ids, prompt_ids
from ..model.qwen3 import DecoderLayer
from ..model.salm import load_model
from ..precision import Precision, resolve_precision
from .base import Transcription, pad_waveforms
from .cpu_heap import freed_memory_kept
from .cpu_linear import (
    Int8Linear,
    PackedLinear,
    compile_row_kernels,
    replace_linears,
)
from .fast_forward import DecoderForward
from .fast_layers import DenseLinear, FusedLayer, Int8FeedForward, Int8Layer
from .fast_scheduler import FastTorchEngine, Queued
from .torch_ref import resolve_device


def length_buckets(lengths: list[int], max_batch: int, min_fill: float = 0.8) -> list[list[int]]:
    """Indices longest first, cut into batches of at most ``max_batch`` whose every clip is at least
    ``min_fill`` of the batch's longest: padding stays under 1 - min_fill of a batch's samples.

    Encoder work grows with the padded length, so a batch that mixed 2 s and 8 s clips would spend
    a third of it on padding; where lengths are dense (hundreds of clips) batches still fill up.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch and lengths[i] >= min_fill * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class FastTorchBackend:
    name = "torch-fast"

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        # A decode step reads every weight once whatever the slot count, so more slots cost little until
        # the step turns compute-bound (docs/fast-path.md). A call never opens more slots than clips.
        max_slots: int = 256,
        encoder_batch: int | None = None,
        cuda_graphs: bool = True,
    ):
        self.device = resolve_device(device)
        # "int8": int8 weights and activations in every linear (Int8Linear), fp32 everywhere else.
        precision = resolve_precision(self.name, dtype, self.device.type)
        assert precision is not None
        self.dtype = precision.value
        if self.dtype == Precision.INT8 and self.device.type != "cpu":
            raise BackendUnavailable(f"torch-fast int8 runs on a CPU, not on {self.device} (use bf16 there)")
        if self.dtype == Precision.INT8 and not Int8Linear.available():
            raise BackendUnavailable(
                "torch-fast int8 needs a CPU with int8 dot-product units (AVX512-VNNI or AMX) and a PyTorch "
                "build with oneDNN's quantized linear ops; this machine lacks them"
            )
        # int8 reads the weights as stored (bf16 for the released model) and makes each matrix fp32 only on
        # its way to int8: loading never holds an fp32 copy of the whole model. The LoRA stays unmerged (LoraPath).
        int8 = self.dtype == Precision.INT8
        self.model, self.tokenizer, self.files = load_model(
            model, dtype=None if int8 else precision.torch_dtype, device=self.device
        )
        # On a CPU each clip is encoded alone: in a padded batch its frames come out a few ulps different (the
        # mel and convolution kernels block by shape), which int8's activation rounding turns into other tokens
        # at near-ties. Alone, a clip's tokens never depend on which clips share its batch, so a served answer
        # is the local one; it costs ~5 % of a CPU pass (docs/fast-path.md). GPUs batch by length (64 clips).
        if encoder_batch is None:
            encoder_batch = 1 if self.device.type == "cpu" else 64
        self.max_slots, self.encoder_batch, self.cuda_graphs = max_slots, encoder_batch, cuda_graphs
        self.timings: dict[str, float] = {}
        if int8:
            self._prepack_for_cpu(Int8Linear)
            self.model.float()  # what stays dense: norms, convolutions, biases, embeddings, positions
            compile_row_kernels()
        elif self.device.type == "cpu" and PackedLinear.available(self.model.dtype):
            self._prepack_for_cpu(PackedLinear)
        else:
            self._fuse_layers(DenseLinear)
            self.head = DenseLinear(self.model.output_weight())
        self.forward = DecoderForward(self.model, self.head, self.device, cuda_graphs)

    def _prepack_for_cpu(self, linear: type[PackedLinear] | type[Int8Linear]) -> None:
        """The encoder's, projection's and LLM's linears and the output layer with oneDNN-prepacked weights:
        a decode step reads every weight once, and reordered weights are read at well over twice the speed
        on a CPU (measurements in docs/fast-path.md). In bf16 (on CPUs with bf16 units) the weights are
        packed in bf16: half the bytes to read and the bf16 dot-product instructions; in int8 a quarter of
        the bytes and int8 dot products (Int8Linear)."""
        if linear is Int8Linear:
            for layer in self.model.encoder.layers:
                assert isinstance(layer, ConformerLayer)
                layer.feed_forward1 = Int8FeedForward(layer.feed_forward1)
                layer.feed_forward2 = Int8FeedForward(layer.feed_forward2)
        replace_linears(self.model.encoder, linear)
        self._fuse_layers(linear)
        self.model.proj = linear(self.model.proj.weight, self.model.proj.bias)
        # Tied to the embeddings, which stay dense for lookups: the packed copy is extra memory.
        self.head = linear(self.model.output_weight())

    def _fuse_layers(self, linear) -> None:
        """The LLM's layers as ``FusedLayer``s, one at a time (memory grows by one layer's matrices). An int8
        load's layers come as stored: each is made fp32 on its way."""
        int8 = linear is Int8Linear
        fused = Int8Layer if int8 else FusedLayer
        layers = self.model.llm.layers
        for i, layer in enumerate(layers):
            assert isinstance(layer, DecoderLayer)
            layers[i] = fused(layer.float() if int8 else layer, linear)

    @contextmanager
    def timed(self, stage: str):
        """Adds the stage's wall time to ``self.timings`` (device work included: it synchronises)."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    # -- encoder ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, audios) -> list[torch.Tensor]:
        """Clips batched by length (see ``length_buckets``); results in input order."""
        out: dict[int, torch.Tensor] = {}
        for chunk in length_buckets([len(a) for a in audios], self.encoder_batch):
            audio, lengths = (torch.from_numpy(a).to(self.device) for a in pad_waveforms([audios[i] for i in chunk]))
            embeds, lens = self.model.encode(audio, lengths)
            for j, i in enumerate(chunk):
                out[i] = embeds[j, : int(lens[j])]
        return [out[i] for i in range(len(audios))]

    # -- decoder pieces --------------------------------------------------------------------------
    def splice(self, ids: list[int], audio: torch.Tensor) -> torch.Tensor:
        def embed(token_ids):
            return self.model.embed_tokens(torch.from_numpy(token_ids).to(self.device))

        return splice_row(ids, audio, embed, self.tokenizer.placeholder_id)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """A text-only prompt's embeddings [L, H] (LLM mode)."""
        return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def next_token_logits(self, source, prefix: list[int], prompt: str | None = None) -> torch.Tensor:
        """Logits [V] (fp32) of the token after the prompt and ``prefix``, teacher-forced in one prefill: this path's
        own arithmetic at a chosen step (the divergence report's error of a path). ``source``: a clip (samples; ASR
        mode, the prompt ``prompt``) or a dialogue (turns; LLM mode, the LoRA off)."""
        asr = isinstance(source, np.ndarray)
        if asr:
            row = self.splice(prompt_ids(self.tokenizer, prompt), self.encode([source])[0])
        else:
            row = self.embed(dialogue_ids(self.tokenizer, source))
        if prefix:
            row = torch.cat((row, self.model.embed_tokens(torch.tensor(prefix, device=self.device))))
        return self.forward.prefill(self.forward.cache(1, row.shape[0]), [0], [row], [asr])[0].float()

    # -- scheduler -------------------------------------------------------------------------------
    def engine(self, *, slots: int, max_len: int) -> FastTorchEngine:
        """This model's continuous-batching scheduler over a cache of ``slots`` sequences of ``max_len``
        positions (prompt + answer), fed requests as they come (the served path)."""
        return FastTorchEngine(self, slots=slots, max_len=max_len)

    def transcribe(self, audios, *, prompt=None, max_new_tokens=MAX_NEW_TOKENS) -> list[Transcription]:
        if not len(audios):
            return []
        # On a CPU freed activations stay in the process for the next layer's (cpu_heap).
        with freed_memory_kept() if self.device.type == "cpu" else nullcontext():
            return self._transcribe(audios, prompt, max_new_tokens)

    def answer(self, dialogues, *, max_new_tokens=MAX_ANSWER_TOKENS) -> list[Transcription]:
        """LLM mode (``Answerer``): the dialogues through the same engine as transcriptions, the LoRA left out."""
        if not len(dialogues):
            return []
        with freed_memory_kept() if self.device.type == "cpu" else nullcontext(), torch.inference_mode():
            rows = [self.embed(dialogue_ids(self.tokenizer, d)) for d in dialogues]
            return self._decode(rows, token_budgets(max_new_tokens, len(rows)), adapter=False)

    @torch.inference_mode()
    def _transcribe(self, audios, prompt, max_new_tokens) -> list[Transcription]:
        ids = prompt_ids(self.tokenizer, prompt)
        budgets = token_budgets(max_new_tokens, len(audios))
        with self.timed("encode"):
            embeds = self.encode(audios)
        return self._decode([self.splice(ids, a) for a in embeds], budgets, adapter=True)

    def _decode(self, prompts: list[torch.Tensor], budgets: list[int], *, adapter: bool) -> list[Transcription]:
        """Every prompt through one engine sized for this call, longest first."""
        tok = self.tokenizer
        engine = FastTorchEngine(
            self,
            slots=min(self.max_slots, len(prompts)),
            max_len=max(p.shape[0] + b for p, b in zip(prompts, budgets)),
            heap=False,  # transcribe() and answer() hold the setting
        )
        order = sorted(range(len(prompts)), key=lambda i: -prompts[i].shape[0])
        engine.queue_prompts([Queued(str(i), prompts[i], budgets[i], adapter) for i in order if budgets[i] > 0])
        tokens: list[list[int]] = [[] for _ in prompts]
        while engine.busy:
            for request_id, new, _ in engine.step():
                tokens[int(request_id)].extend(new)
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]
