"""Triton python model ``vllm``: one vLLM engine for every request (decoupled).

PROMPT_IDS + EMBEDDINGS (+ optional MAX_NEW_TOKENS) -> a stream of responses, each with the TEXT piece and the
OUTPUT_IDS its tokens added, then an empty response carrying the final flag. The pieces join to the
transcription's text.

``execute`` only checks a request and hands it to the engine thread, which owns the engine: between two
engine steps it admits the requests that arrived (they join the running batch: vLLM's continuous batching),
then sends each request's new tokens as they come. A cancelled request is aborted in the engine.
"""

import locale
import queue
import threading
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.vllm import VllmEngine
from canary_qwen.defaults import MAX_NEW_TOKENS
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.serving.checks import (
    MAX_NEW_TOKENS_LIMIT,
    TextStream,
    check_embeddings,
    check_prompt_ids,
    model_parameters,
    read_budgets,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(piece: str, ids: list[int]):
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("OUTPUT_IDS", np.array([ids], dtype=np.int64)),
        ]
    )


class _Stream:
    """One request's sender and the text it has sent so far."""

    def __init__(self, sender, tokenizer):
        self.sender = sender
        self.text = TextStream(tokenizer)

    def send(self, ids: list[int], eos_id: int, finished: bool) -> None:
        ids = [t for t in ids if t != eos_id]
        piece = "".join(self.text.push(t) for t in ids)
        if finished:
            piece += self.text.finish()
        if piece or ids:
            self.sender.send(_response(piece, ids))
        if finished:
            self.sender.send(flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        self.name = config["name"]
        # The stub's embedded Python starts with LC_CTYPE "C": files opened without an encoding would read as
        # ASCII, and importing vLLM reads torch's non-ASCII kernel templates that way.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        self.engine = VllmEngine(
            read_manifest(version_dir),
            device=params.get("device", "cpu"),
            dtype=params.get("dtype", "fp32"),
            kv_cache_gib=float(params.get("kv_cache_gib", "1")),
            max_model_len=int(params.get("max_model_len", "2048")),
        )
        self.tokenizer = self.engine.tokenizer
        self.default_budget = int(params.get("max_new_tokens", MAX_NEW_TOKENS))
        self.budget_limit = int(params.get("max_new_tokens_limit", MAX_NEW_TOKENS_LIMIT))
        self.hidden = int(self.engine.embed_table.shape[1])
        self.arrivals = queue.Queue()
        self.streams = {}
        self.next_id = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._engine_loop, name="vllm-engine", daemon=True)
        self.thread.start()
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
                embeds = check_embeddings(
                    pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy(), self.hidden
                )
                if len(embeds) != 1:
                    raise InputError(f"{self.name} takes one clip per request, got a batch of {len(embeds)}")
                ids = check_prompt_ids(ids, self.tokenizer.placeholder_id, len(self.engine.embed_table))
                budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
                budget = read_budgets(
                    None if budget is None else budget.as_numpy(), 1, self.default_budget, self.budget_limit
                )[0]
                prompt = self.engine.audio_prompt(ids, embeds[0])
                self.engine.check_length(prompt)
            except InputError as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
                continue
            self.next_id += 1
            self.arrivals.put((str(self.next_id), prompt, budget, _Stream(sender, self.tokenizer)))
        return None

    def _admit(self, block: bool) -> None:
        while True:
            try:
                item = self.arrivals.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if item is None:
                return
            request_id, prompt, budget, stream = item
            self.streams[request_id] = stream
            self.engine.add(request_id, prompt, budget)
            block = False

    def _engine_loop(self):
        while not self.stopping:
            try:
                self._admit(block=not self.engine.busy)
                cancelled = [rid for rid, s in self.streams.items() if s.sender.is_cancelled()]
                if cancelled:
                    self.engine.abort(cancelled)
                    for rid in cancelled:
                        self.streams.pop(rid).sender.send(flags=FINAL)
                if not self.engine.busy:
                    continue
                for request_id, ids, finished in self.engine.step():
                    stream = self.streams.get(request_id)
                    if stream is None:
                        continue
                    stream.send(ids, self.tokenizer.eos_id, finished)
                    if finished:
                        del self.streams[request_id]
            except Exception as e:  # the engine failed: every open stream gets the error, the loop goes on
                self.logger.log_error(f"{self.name}: {traceback.format_exc()}")
                for stream in list(self.streams.values()):
                    try:
                        stream.sender.send(
                            pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vllm failed: {e}")), flags=FINAL
                        )
                    except Exception:
                        pass  # the client is gone
                self.engine.abort(list(self.streams))
                self.streams.clear()

    def finalize(self):
        self.stopping = True
        self.arrivals.put(None)
        self.thread.join(timeout=30)
