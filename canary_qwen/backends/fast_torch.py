"""Throughput path in PyTorch: length-bucketed encoder batches, a static KV cache, a prefill whose
projections and MLPs run on packed (unpadded) tokens, with one causal attention call per layer and
logits for the last position only, and continuous batching in the decoder
(finished sequences leave their cache slot at once and queued clips take it over). A decode step has
static shapes (every slot, the whole cache behind a mask, no host synchronisation), so on CUDA it is
captured once per call as a CUDA graph and replayed for every token.

Greedy tokens are those of the reference (same weights with LoRA merged; q/k/v and gate/up each as one
matrix, ``FusedLayer``); only the order of floating-point operations differs. ``dtype="int8"`` (CPUs
with VNNI or AMX) runs every linear in int8 (``cpu_linear.Int8Linear``), the norms, SiLU and residual
adds between them in compiled row kernels (``Int8Layer``, ``Int8FeedForward``): several times faster,
and its tokens part from fp32's at near-ties (docs/accuracy.md). On a CPU, freed memory stays in the
process while it transcribes (``cpu_heap``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from ..decoding import splice_row, token_budgets
from ..defaults import MAX_NEW_TOKENS
from ..engines.base import AUDIO, EngineRequest
from ..errors import BackendUnavailable, InputError, UsageError
from ..model.conformer import ConformerLayer, FeedForward
from ..model.prompt import prompt_ids
from ..model.qwen3 import DecoderLayer, apply_rope, merge_lora, rope_cos_sin
from ..model.salm import load_model
from ..precision import Precision, resolve_precision
from .base import Transcription, pad_waveforms
from .cpu_heap import freed_memory_kept
from .cpu_linear import (
    Int8Linear,
    PackedLinear,
    bias_silu_quantize_rows,
    compile_row_kernels,
    quantize_rows,
    replace_linears,
    rms_norm_quantize_rows,
    row_kernel,
    silu_gate_quantize_rows,
)
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


class StaticKVCache:
    """[layers, slots, kv_heads, max_len, head_dim] keys and values plus the filled length per slot."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)


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
        # its way to int8, LoRA merged there in fp32: loading never holds an fp32 copy of the whole model.
        int8 = self.dtype == Precision.INT8
        self.model, self.tokenizer, self.files = load_model(
            model, dtype=None if int8 else precision.torch_dtype, device=self.device, merge_lora=not int8
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
        load's layers come as stored, LoRA unmerged: each is made fp32 and merged on its way."""
        int8 = linear is Int8Linear
        fused = Int8Layer if int8 else FusedLayer
        layers = self.model.llm.layers
        for i, layer in enumerate(layers):
            assert isinstance(layer, DecoderLayer)
            if int8:
                merge_lora(layer.float())
            layers[i] = fused(layer, linear)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    @contextmanager
    def _timed(self, stage: str):
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
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin for ``positions``, computed once per forward: every layer uses the same."""
        return rope_cos_sin(positions[None], self.model.llm_cfg.head_dim, self.model.llm_cfg.rope_theta, dtype)

    def _prefill(self, cache: StaticKVCache, slots: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Run new sequences; returns last-position logits [len(slots), V].

        Projections and MLPs run on the tokens packed end to end (no padding; their rows are independent:
        per-row norms and quantization, and in int8 exact int32 sums). Attention runs per sequence on its
        own length: a kernel's blocking follows the key length, so attending over a batch's longest would
        make a sequence's bits depend on the others prefilled with it (a served request on its arrival
        group). With this, a sequence's logits are the same alone or in any batch (tests/test_batch_invariance.py).
        """
        lengths = [p.shape[0] for p in prompts]
        x = torch.cat(prompts)
        # Index tensors are built on the host and copied once (not hundreds of tiny device kernels).
        counts = torch.tensor(lengths)
        positions = torch.cat([torch.arange(length) for length in lengths]).to(self.device)
        rope = self._rope(positions, x.dtype)
        for li, layer in enumerate(self.model.llm.layers):
            q, k, v = layer.qkv(x, rope)
            attended = []
            for slot, qs, ks, vs in zip(slots, q.split(lengths), k.split(lengths), v.split(lengths)):
                qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # [1, heads, length, d]
                cache.k[li, slot, :, : ks.shape[2]] = ks[0]
                cache.v[li, slot, :, : vs.shape[2]] = vs[0]
                o = nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=layer.head_dim**-0.5, enable_gqa=True
                )
                attended.append(o[0].transpose(0, 1))
            x = layer.mlp_residual(layer.attention_residual(torch.cat(attended).reshape(x.shape[0], -1), x))
        at = torch.tensor(slots, device=self.device)
        cache.lengths[at] = counts.to(self.device)
        last = (counts.cumsum(0) - 1).to(self.device)
        return self._logits(self.model.llm.norm(x[last]))

    def _decode(
        self, cache: StaticKVCache, tokens: torch.Tensor, active: torch.Tensor, lengths: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One token for every slot (idle slots too); returns logits [slots, V].

        With ``lengths`` (each slot's filled length on the host, 0 for idle slots), each running slot attends
        over exactly its own keys, one attention call per slot: its bits then never depend on the other slots
        (a kernel's blocking follows the key length) and idle slots cost nothing. Without (the static shapes a
        CUDA graph needs), every slot attends over the whole cache, masked beyond its length. Idle slots keep
        length 0, so they only ever touch position 0 of their own cache row.
        """
        slots = torch.arange(tokens.shape[0], device=self.device)
        positions = cache.lengths
        visible = None
        if lengths is None:
            span = torch.arange(cache.k.shape[3], device=self.device)
            visible = (span[None] <= positions[:, None])[:, None, None]
        x = self.model.embed_tokens(tokens)
        rope = self._rope(positions, x.dtype)
        for li, layer in enumerate(self.model.llm.layers):
            q, k, v = layer.qkv(x, rope)
            cache.k[li, slots, :, positions] = k
            cache.v[li, slots, :, positions] = v
            scale = layer.head_dim**-0.5
            if lengths is None:
                o = nn.functional.scaled_dot_product_attention(
                    q[:, :, None], cache.k[li], cache.v[li], attn_mask=visible, scale=scale, enable_gqa=True
                )
            else:
                o = q.new_zeros(q.shape[0], q.shape[1], 1, q.shape[2])
                for slot, filled in enumerate(lengths):
                    if filled:
                        o[slot] = nn.functional.scaled_dot_product_attention(
                            q[slot, :, None][None],
                            cache.k[li, slot, :, : filled + 1][None],
                            cache.v[li, slot, :, : filled + 1][None],
                            scale=scale,
                            enable_gqa=True,
                        )[0]
            x = layer.mlp_residual(layer.attention_residual(o.reshape(tokens.shape[0], -1), x))
        cache.lengths += active
        return self._logits(self.model.llm.norm(x))

    def _decoder(self, cache: StaticKVCache):
        """The decode step ``(tokens, active, lengths)`` for this cache: eager, each slot over its own keys,
        or captured as a CUDA graph over the whole cache on CUDA (when enabled)."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return lambda tokens, active, lengths: self._decode(cache, tokens, active, lengths)
        return _GraphedDecode(self._decode, cache)

    def _splice(self, ids: list[int], audio: torch.Tensor) -> torch.Tensor:
        def embed(token_ids):
            return self.model.embed_tokens(torch.from_numpy(token_ids).to(self.device))

        return splice_row(ids, audio, embed, self.tokenizer.placeholder_id)

    def _cache(self, slots: int, max_len: int) -> StaticKVCache:
        cfg = self.model.llm_cfg
        return StaticKVCache(
            cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, self.model.dtype, self.device
        )

    @torch.inference_mode()
    def next_token_logits(self, audio, prefix: list[int], prompt: str | None = None) -> torch.Tensor:
        """Logits [V] (fp32) of the token after the prompt, the clip and ``prefix``, teacher-forced in one
        prefill: this path's own arithmetic at a chosen step (the divergence report's error of a path)."""
        row = self._splice(prompt_ids(self.tokenizer, prompt), self.encode([audio])[0])
        if prefix:
            row = torch.cat((row, self.model.embed_tokens(torch.tensor(prefix, device=self.device))))
        return self._prefill(self._cache(1, row.shape[0]), [0], [row])[0].float()

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

    @torch.inference_mode()
    def _transcribe(self, audios, prompt, max_new_tokens) -> list[Transcription]:
        """Every clip through one engine sized for this call, longest prompts first."""
        tok = self.tokenizer
        ids = prompt_ids(tok, prompt)
        budgets = token_budgets(max_new_tokens, len(audios))
        with self._timed("encode"):
            embeds = self.encode(audios)
        prompts = [self._splice(ids, a) for a in embeds]
        engine = FastTorchEngine(
            self,
            slots=min(self.max_slots, len(prompts)),
            max_len=max(p.shape[0] + b for p, b in zip(prompts, budgets)),
            heap=False,  # transcribe() holds the setting
        )
        order = sorted(range(len(prompts)), key=lambda i: -prompts[i].shape[0])
        engine.queue_prompts([(str(i), prompts[i], budgets[i]) for i in order if budgets[i] > 0])
        tokens: list[list[int]] = [[] for _ in prompts]
        while engine.busy:
            for request_id, new, _ in engine.step():
                tokens[int(request_id)].extend(new)
        return [Transcription(text=tok.decode(t).strip(), token_ids=t) for t in tokens]


class FastTorchEngine:
    """torch-fast's continuous batching as a step engine (``canary_qwen.engines.StepEngine``, taking audio).

    A static KV cache holds ``slots`` sequences. Each ``step`` first prefills waiting requests into the
    free slots, then hands out every running request's next token (the stop rule of
    ``decoding.TokenStreams``: eos or a full budget ends it, and its slot is free at once), then decodes
    one more token for the rest. Requests admitted between steps join the running batch. Off CUDA graphs,
    each sequence attends over its own keys only, so its tokens are the same whichever requests share the
    batch (a served answer is the local one).
    """

    takes = AUDIO

    def __init__(self, backend: FastTorchBackend, *, slots: int, max_len: int, heap: bool = True):
        if slots < 1 or max_len < 2:
            raise UsageError(f"a torch-fast engine needs slots >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.backend, self.tokenizer, self.max_len = backend, backend.tokenizer, max_len
        self.cache = backend._cache(slots, max_len)
        self._decode = backend._decoder(self.cache)
        self._waiting: deque[tuple[str, torch.Tensor, int]] = deque()
        self._running: dict[int, list] = {}  # slot -> [request id, budget, tokens handed out]
        self._lengths = [0] * slots  # cache.lengths on the host: no device sync to find each attention's keys
        self._next = torch.full((slots,), backend.tokenizer.pad_id, dtype=torch.long, device=backend.device)
        self._heap = ExitStack()
        if heap and backend.device.type == "cpu":  # a served engine keeps it for its lifetime (cpu_heap)
            self._heap.enter_context(freed_memory_kept())

    @torch.inference_mode()
    def admit(self, requests: Sequence[EngineRequest]) -> list[InputError | None]:
        """Encode the clips as one batch (by length, ``FastTorchBackend.encode``), splice and queue them."""
        with self.backend._timed("encode"):
            embeds = self.backend.encode([np.asarray(r.source, dtype=np.float32) for r in requests])
        refusals: list[InputError | None] = []
        for request, frames in zip(requests, embeds):
            row = self.backend._splice(list(request.prompt_ids), frames)
            refusals.append(self._refusal(row.shape[0], request.budget))
            if refusals[-1] is None:
                self._waiting.append((request.request_id, row, request.budget))
        return refusals

    def _refusal(self, positions: int, budget: int) -> InputError | None:
        if positions + budget <= self.max_len:
            return None
        return InputError(
            f"the prompt takes {positions} positions (text tokens + audio frames) and asks for {budget} new tokens; "
            f"the engine holds {self.max_len}: send shorter audio or ask for fewer tokens"
        )

    def queue_prompts(self, prompts: Sequence[tuple[str, torch.Tensor, int]]) -> None:
        """Queue spliced prompts (request id, row [L, H], budget >= 1) that are known to fit."""
        for request_id, row, budget in prompts:
            refused = self._refusal(row.shape[0], budget)
            if refused is not None:
                raise refused
            self._waiting.append((request_id, row, budget))

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def abort(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        self._waiting = deque(w for w in self._waiting if w[0] not in gone)
        for slot in [s for s, run in self._running.items() if run[0] in gone]:
            self._retire(slot)

    def _retire(self, slot: int) -> None:
        del self._running[slot]
        self.cache.lengths[slot] = 0
        self._lengths[slot] = 0

    @torch.inference_mode()
    def step(self) -> list[tuple[str, list[int], bool]]:
        backend, eos = self.backend, self.tokenizer.eos_id
        free = [s for s in range(len(self._lengths)) if s not in self._running]
        if self._waiting and free:
            admitted = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
            taken = free[: len(admitted)]
            with backend._timed("prefill"):
                logits = backend._prefill(self.cache, taken, [row for _, row, _ in admitted])
            self._next[taken] = logits.argmax(-1)
            for slot, (request_id, row, budget) in zip(taken, admitted):
                self._running[slot] = [request_id, budget, 0]
                self._lengths[slot] = row.shape[0]
        events: list[tuple[str, list[int], bool]] = []
        emitted = self._next.tolist()
        for slot, run in list(self._running.items()):
            token = emitted[slot]
            if token == eos:
                events.append((run[0], [], True))
            else:
                run[2] += 1
                events.append((run[0], [token], run[2] >= run[1]))
            if events[-1][2]:
                self._retire(slot)
        if self._running:
            active = torch.zeros(len(self._lengths), dtype=torch.long, device=backend.device)
            active[list(self._running)] = 1
            with backend._timed("decode"):
                self._next = self._decode(self._next, active, self._lengths).argmax(-1)
            for slot in self._running:
                self._lengths[slot] += 1
        return events

    def close(self) -> None:
        self._waiting.clear()
        self._running.clear()
        self._heap.close()


class DenseLinear(nn.Module):
    """``x @ weight.T + bias`` over the tensors given (the fused matrices where nothing prepacks them).

    On a CPU a one-row input is computed as two rows: MKL's one-row kernel sums in another order than its
    many-row one (bf16 on CPUs without bf16 units, measured), so a sequence decoding alone would get other bits
    than in a batch. A decode step reads the weights once either way."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.device.type == "cpu":
            return nn.functional.linear(torch.cat((x, x)), self.weight, self.bias)[:1]
        return nn.functional.linear(x, self.weight, self.bias)


class FusedLayer(nn.Module):
    """A Qwen3 decoder layer (LoRA merged) with q/k/v as one matmul and gate/up as another: one pass over
    the input instead of three and two, and in int8 one activation quantization each. Every output
    element is the same dot product as the separate matrices' (in int8 exactly so: int32 sums)."""

    def __init__(self, layer: DecoderLayer, linear):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv, attn.head_dim
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv_proj = linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        self.o_proj = linear(attn.o_proj.weight)
        self.gate_up_proj = linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = linear(mlp.down_proj.weight)

    def qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] (packed tokens, before the layer's norm) -> q [N, heads, d], k/v [N, kv_heads, d], RoPE applied."""
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_projection(x).split([self.n_heads * d, self.n_kv * d, self.n_kv * d], -1)
        q = self.q_norm(q.reshape(n, self.n_heads, d))
        k = self.k_norm(k.reshape(n, self.n_kv, d))
        cos, sin = rope
        q = apply_rope(q.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        k = apply_rope(k.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)
        return q, k, v.reshape(n, self.n_kv, d)

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv_proj(self.input_norm(x))

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x plus the attention's output ([N, heads * d]) projected."""
        return x + self.o_proj(attention)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the MLP of x (after the post-attention norm)."""
        gate, up = self.gate_up_proj(self.post_norm(x)).chunk(2, -1)
        return x + self.down_proj(nn.functional.silu(gate) * up)


class Int8Layer(FusedLayer):
    """``FusedLayer`` on ``Int8Linear``s with the work between matmuls in compiled row kernels (cpu_linear):
    each norm with the quantization after it, silu(gate) * up with the gate/up product's row scales and the
    down matmul's quantization, each residual add with a matmul's row scales. Eager, these were as many
    passes over the activations as operations (~20 % of a prefill's MLP time, docs/fast-path.md)."""

    def qkv_projection(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.input_norm.weight, self.input_norm.eps)
        return self.qkv_proj.scaled(self.qkv_proj.product(quantized), scale)

    def attention_residual(self, attention: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attention, residual=x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(rms_norm_quantize_rows)(x, self.post_norm.weight, self.post_norm.eps)
        hidden, hidden_scale = row_kernel(silu_gate_quantize_rows)(self.gate_up_proj.product(quantized), scale)
        return self.down_proj.scaled(self.down_proj.product(hidden), hidden_scale, residual=x)


class Int8FeedForward(nn.Module):
    """The Conformer's feed-forward (linear, SiLU, linear) on ``Int8Linear``s, with the first one's bias
    and the SiLU fused into the second one's quantization (``bias_silu_quantize_rows``): one pass over
    the 4x wider hidden rows instead of three."""

    def __init__(self, ff: FeedForward):
        super().__init__()
        self.linear1 = Int8Linear(ff.linear1.weight)  # its bias is added in the kernel after it
        self.bias1 = ff.linear1.bias.detach().float()
        self.linear2 = Int8Linear(ff.linear2.weight, ff.linear2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = row_kernel(quantize_rows)(x.reshape(-1, x.shape[-1]).float())
        hidden, hidden_scale = row_kernel(bias_silu_quantize_rows)(self.linear1.product(quantized), scale, self.bias1)
        return self.linear2.scaled(self.linear2.product(hidden), hidden_scale).reshape(*x.shape[:-1], -1)


class _GraphedDecode:
    """``step(cache, tokens, active)`` captured once as a CUDA graph over static input buffers; each call
    copies the inputs in and replays it (one launch for the whole step instead of hundreds of kernels).

    The warm-up runs before capture (as CUDA graphs require) use ``active`` all zero: lengths stay as
    they are, and the keys/values they write sit at each slot's next position, which the next real
    step overwrites.
    """

    def __init__(self, step, cache: StaticKVCache):
        slots = cache.lengths.shape[0]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=cache.k.device)
        self.active = torch.zeros(slots, dtype=torch.long, device=cache.k.device)
        side = torch.cuda.Stream(cache.k.device)
        side.wait_stream(torch.cuda.current_stream(cache.k.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(cache, self.tokens, self.active)
        torch.cuda.current_stream(cache.k.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(cache, self.tokens, self.active)

    def __call__(self, tokens: torch.Tensor, active: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        self.tokens.copy_(tokens)  # the graph attends over the whole cache, masked by the device's lengths
        self.active.copy_(active)
        self.graph.replay()
        return self.logits
