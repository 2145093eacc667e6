"""torch-fast's forward pass over the LLM: a static KV cache, a prefill whose projections and MLPs run on packed
(unpadded) tokens with one causal attention call per sequence and logits for the last position only, and a decode
step over the running slots (eager) or every slot (captured as a CUDA graph). A sequence's logits are the same alone or in any batch
(tests/test_batch_invariance.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.qwen3 import rope_cos_sin


class StaticKVCache:
    """[layers, slots, kv_heads, max_len, head_dim] keys and values plus the filled length per slot."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, slots, kv_heads, max_len, head_dim)
        # Off CUDA graphs a slot only ever reads the keys it wrote, so the cache is left unwritten: the pages of
        # positions no request reaches (most of a row sized for long LLM answers) are never made resident. The
        # graphed decode attends over the whole cache, masked, where a stray NaN would still reach the output.
        make = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)


class DecoderForward:
    """The forward pass of ``model``'s LLM (its layers fused, ``fast_layers``) with ``head`` as the output layer, on
    ``device``; ``cuda_graphs``: decode steps captured as CUDA graphs on CUDA."""

    def __init__(self, model, head: nn.Module, device: torch.device, cuda_graphs: bool):
        self.model, self.head, self.device, self.cuda_graphs = model, head, device, cuda_graphs

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin for ``positions``, computed once per forward: every layer uses the same."""
        return rope_cos_sin(positions[None], self.model.llm_cfg.head_dim, self.model.llm_cfg.rope_theta, dtype)

    def adapter_rows(self, adapter: Sequence[bool], repeats: Sequence[int] | None = None) -> torch.Tensor:
        """[N, 1] in the model's dtype: 1 for the rows decoded with the LoRA (ASR), 0 without (LLM); each
        sequence's flag repeated ``repeats`` times (its packed tokens) where given."""
        flags = torch.tensor([float(a) for a in adapter])
        if repeats is not None:
            flags = flags.repeat_interleave(torch.tensor(list(repeats)))
        return flags[:, None].to(self.device, self.model.dtype)

    def prefill(
        self, cache: StaticKVCache, slots: list[int], prompts: list[torch.Tensor], adapter: Sequence[bool]
    ) -> torch.Tensor:
        """Run new sequences, ``adapter[i]``: sequence i with the LoRA (ASR) or without (LLM); returns last-position
        logits [len(slots), V].

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
        rope = self.rope(positions, x.dtype)
        on = self.adapter_rows(adapter, lengths)
        for li, layer in enumerate(self.model.llm.layers):
            q, k, v = layer.qkv(x, rope, on)
            attended = []
            for slot, qs, ks, vs in zip(slots, q.split(lengths), k.split(lengths), v.split(lengths)):
                qs, ks, vs = (t.transpose(0, 1)[None] for t in (qs, ks, vs))  # [1, heads, length, d]
                cache.k[li, slot, :, : ks.shape[2]] = ks[0]
                cache.v[li, slot, :, : vs.shape[2]] = vs[0]
                o = nn.functional.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=layer.head_dim**-0.5, enable_gqa=True
                )
                attended.append(o[0].transpose(0, 1))
            x = layer.mlp_residual(layer.attention_residual(torch.cat(attended).reshape(x.shape[0], -1), x, on), on)
        at = torch.tensor(slots, device=self.device)
        cache.lengths[at] = counts.to(self.device)
        last = (counts.cumsum(0) - 1).to(self.device)
        return self.logits(self.model.llm.norm(x[last]))

    def decode(
        self, cache: StaticKVCache, slots: Sequence[int], tokens: torch.Tensor, on: torch.Tensor, lengths: Sequence[int]
    ) -> torch.Tensor:
        """One token for each of ``slots`` (running sequences; ``tokens`` [n] their last tokens, ``on`` [n, 1] their
        LoRA flags (``adapter_rows``), ``lengths`` their filled lengths on the host); returns logits [n, V].

        Only these rows are computed: a slot left idle costs nothing (sixteen slots holding one request cost what
        one slot does). Each attends over exactly its own keys, one attention call per slot, so its bits never
        depend on the other slots (a kernel's blocking follows the key length).
        """
        at = torch.tensor(list(slots), device=self.device)
        positions = torch.tensor(list(lengths), device=self.device)

        def attend(li: int, layer, q: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [
                    nn.functional.scaled_dot_product_attention(
                        q[i, :, None][None],
                        cache.k[li, slot, :, : filled + 1][None],
                        cache.v[li, slot, :, : filled + 1][None],
                        scale=layer.head_dim**-0.5,
                        enable_gqa=True,
                    )[0]
                    for i, (slot, filled) in enumerate(zip(slots, lengths))
                ]
            )

        logits = self._decode_layers(cache, at, positions, tokens, on, attend)
        cache.lengths[at] += 1
        return logits

    def decode_masked(
        self, cache: StaticKVCache, tokens: torch.Tensor, active: torch.Tensor, on: torch.Tensor
    ) -> torch.Tensor:
        """One token for every slot, idle ones too (the static shapes a CUDA graph needs): each attends over the
        whole cache, masked beyond its length; ``active`` [slots] 1 where a sequence runs. Idle slots keep length 0,
        so they only ever touch position 0 of their own cache row. Returns logits [slots, V]."""
        positions = cache.lengths
        span = torch.arange(cache.k.shape[3], device=self.device)
        visible = (span[None] <= positions[:, None])[:, None, None]

        def attend(li: int, layer, q: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(
                q[:, :, None], cache.k[li], cache.v[li], attn_mask=visible, scale=layer.head_dim**-0.5, enable_gqa=True
            )

        slots = torch.arange(tokens.shape[0], device=self.device)
        logits = self._decode_layers(cache, slots, positions, tokens, on, attend)
        cache.lengths += active
        return logits

    def _decode_layers(self, cache: StaticKVCache, at, positions, tokens, on, attend) -> torch.Tensor:
        """A decode step's layers: each writes the new keys and values at ``positions`` of the slots ``at`` and
        attends with ``attend(layer index, layer, q)``; returns the logits."""
        x = self.model.embed_tokens(tokens)
        rope = self.rope(positions, x.dtype)
        for li, layer in enumerate(self.model.llm.layers):
            q, k, v = layer.qkv(x, rope, on)
            cache.k[li, at, :, positions] = k
            cache.v[li, at, :, positions] = v
            x = layer.mlp_residual(
                layer.attention_residual(attend(li, layer, q).reshape(tokens.shape[0], -1), x, on), on
            )
        return self.logits(self.model.llm.norm(x))

    def decoder(self, cache: StaticKVCache):
        """The decode step ``(slots, tokens, on, lengths) -> logits [len(slots), V]`` for this cache, ``tokens`` and
        ``on`` given for every slot and ``lengths`` each slot's filled length on the host: eager over the running
        slots only (``decode``), or on CUDA (when enabled) a CUDA graph over the whole cache (``decode_masked``)."""
        if self.device.type != "cuda" or not self.cuda_graphs:

            def step(slots, tokens, on, lengths):
                at = torch.tensor(list(slots), device=self.device)
                return self.decode(cache, slots, tokens[at], on[at], [lengths[s] for s in slots])

            return step
        return _GraphedDecode(self.decode_masked, cache, self.adapter_rows([True] * cache.lengths.shape[0]))

    def cache(self, slots: int, max_len: int) -> StaticKVCache:
        cfg = self.model.llm_cfg
        return StaticKVCache(
            cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, self.model.dtype, self.device
        )


class _GraphedDecode:
    """``step(cache, tokens, active, on)`` (``DecoderForward.decode_masked``) captured once as a CUDA graph over static input buffers; each call
    copies the inputs in and replays it (one launch for the whole step instead of hundreds of kernels).

    The warm-up runs before capture (as CUDA graphs require) use ``active`` all zero: lengths stay as
    they are, and the keys/values they write sit at each slot's next position, which the next real
    step overwrites.
    """

    def __init__(self, step, cache: StaticKVCache, on: torch.Tensor):
        slots = cache.lengths.shape[0]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=cache.k.device)
        self.active = torch.zeros(slots, dtype=torch.long, device=cache.k.device)
        self.on = on.clone()
        side = torch.cuda.Stream(cache.k.device)
        side.wait_stream(torch.cuda.current_stream(cache.k.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(cache, self.tokens, self.active, self.on)
        torch.cuda.current_stream(cache.k.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(cache, self.tokens, self.active, self.on)

    def __call__(self, slots: Sequence[int], tokens: torch.Tensor, on: torch.Tensor, lengths: Sequence[int]):
        self.tokens.copy_(tokens)  # the graph attends over the whole cache, masked by the device's lengths
        self.active.zero_()
        self.active[list(slots)] = 1
        self.on.copy_(on)
        self.graph.replay()
        return self.logits[list(slots)]
