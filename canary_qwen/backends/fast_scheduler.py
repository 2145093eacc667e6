"""torch-fast's scheduler: continuous batching over a static KV cache, as a step engine
(``canary_qwen.engines.StepEngine``). It drives the backend through its public parts: ``encode``, ``splice``,
``timed`` and the forward pass (``FastTorchBackend.forward``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..engines.base import AUDIO, EngineRequest
from ..errors import InputError, UsageError
from ..model.tokenizer import QwenTokenizer
from ..modes import ASR
from .cpu_heap import freed_memory_kept
from .fast_forward import DecoderForward


class Scheduled(Protocol):
    """What the scheduler needs of a model (``FastTorchBackend``)."""

    tokenizer: QwenTokenizer
    device: torch.device
    forward: DecoderForward

    def encode(self, audios) -> list[torch.Tensor]: ...

    def splice(self, ids: list[int], audio: torch.Tensor) -> torch.Tensor: ...

    def embed(self, ids: list[int]) -> torch.Tensor: ...

    def timed(self, stage: str) -> AbstractContextManager: ...


class Queued(NamedTuple):
    """A request waiting for a slot: its prompt's embeddings [L, H], budget >= 1, and whether it runs through the
    LoRA (ASR) or not (LLM)."""

    request_id: str
    row: torch.Tensor
    budget: int
    adapter: bool


class FastTorchEngine:
    """torch-fast's continuous batching as a step engine (``canary_qwen.engines.StepEngine``, taking audio).

    A static KV cache holds ``slots`` sequences. Each ``step`` first prefills waiting requests into the
    free slots, then hands out every running request's next token (the stop rule of
    ``decoding.TokenStreams``: eos or a full budget ends it, and its slot is free at once), then decodes
    one more token for the rest. Requests admitted between steps join the running batch. Off CUDA graphs,
    each sequence attends over its own keys only, so its tokens are the same whichever requests share the
    batch (a served answer is the local one). ASR rows (a clip) run through the LoRA and LLM rows (text only)
    without it, in the same batch (``fast_layers.LoraPath``).
    """

    takes = AUDIO

    def __init__(self, backend: Scheduled, *, slots: int, max_len: int, heap: bool = True):
        if slots < 1 or max_len < 2:
            raise UsageError(f"a torch-fast engine needs slots >= 1 and max_len >= 2, got {slots} and {max_len}")
        self.backend, self.tokenizer, self.max_len = backend, backend.tokenizer, max_len
        self.cache = backend.forward.cache(slots, max_len)
        self._decode = backend.forward.decoder(self.cache)
        self._waiting: deque[Queued] = deque()
        self._running: dict[int, list] = {}  # slot -> [request id, budget, tokens handed out]
        self._adapter = [True] * slots  # per slot: its row runs through the LoRA (ASR)
        self._on = backend.forward.adapter_rows(self._adapter)  # the same on the device, remade at each admission
        self._lengths = [0] * slots  # cache.lengths on the host: no device sync to find each attention's keys
        self._next = torch.full((slots,), backend.tokenizer.pad_id, dtype=torch.long, device=backend.device)
        self._heap = ExitStack()
        if heap and backend.device.type == "cpu":  # a served engine keeps it for its lifetime (cpu_heap)
            self._heap.enter_context(freed_memory_kept())

    @torch.inference_mode()
    def admit(self, requests: Sequence[EngineRequest]) -> list[InputError | None]:
        """Encode the clips as one batch (by length, ``FastTorchBackend.encode``), splice and queue them; LLM rows
        are their dialogue's embeddings."""
        clips = [r for r in requests if r.mode == ASR]
        with self.backend.timed("encode"):
            frames = dict(
                zip(
                    (r.request_id for r in clips),
                    self.backend.encode([np.asarray(r.source, dtype=np.float32) for r in clips]) if clips else [],
                )
            )
        refusals: list[InputError | None] = []
        for request in requests:
            ids = list(request.prompt_ids)
            asr = request.mode == ASR
            row = self.backend.splice(ids, frames[request.request_id]) if asr else self.backend.embed(ids)
            refusals.append(self._refusal(row.shape[0], request.budget))
            if refusals[-1] is None:
                self._waiting.append(Queued(request.request_id, row, request.budget, asr))
        return refusals

    def _refusal(self, positions: int, budget: int) -> InputError | None:
        if positions + budget <= self.max_len:
            return None
        return InputError(
            f"the prompt takes {positions} positions (text tokens + audio frames) and asks for {budget} new tokens; "
            f"the engine holds {self.max_len}: send shorter audio or ask for fewer tokens"
        )

    def queue_prompts(self, prompts: Sequence[Queued]) -> None:
        """Queue embedded prompts (budget >= 1) that are known to fit."""
        for queued in prompts:
            refused = self._refusal(queued.row.shape[0], queued.budget)
            if refused is not None:
                raise refused
            self._waiting.append(queued)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def abort(self, request_ids: Sequence[str]) -> None:
        gone = set(request_ids)
        self._waiting = deque(w for w in self._waiting if w.request_id not in gone)
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
            with backend.timed("prefill"):
                logits = backend.forward.prefill(
                    self.cache, taken, [q.row for q in admitted], [q.adapter for q in admitted]
                )
            self._next[taken] = logits.argmax(-1)
            for slot, queued in zip(taken, admitted):
                self._running[slot] = [queued.request_id, queued.budget, 0]
                self._lengths[slot] = queued.row.shape[0]
                self._adapter[slot] = queued.adapter
            self._on = backend.forward.adapter_rows(self._adapter)
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
            running = sorted(self._running)
            with backend.timed("decode"):
                self._next[running] = self._decode(running, self._next, self._on, self._lengths).argmax(-1)
            for slot in running:
                self._lengths[slot] += 1
        return events

    def close(self) -> None:
        self._waiting.clear()
        self._running.clear()
        self._heap.close()
