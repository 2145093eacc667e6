"""Triton python model ``canary_qwen_stream`` (onnx flavour): decoupled, same interface as the ``canary_qwen`` ensemble.

AUDIO [S] float32 (+ optional PROMPT, MAX_NEW_TOKENS) -> TEXT pieces as the tokens are generated, then an
empty response carrying the final flag. The pieces join to exactly the ensemble's TEXT.

All the work happens inside ``execute``, on the requests the dynamic batcher hands over: inputs checked, the
clips encoded in one ONNX Runtime call, then ONE greedy decode for all of them, each row's pieces sent as
its tokens come. No model-to-model (BLS) calls and no threads: with BLS calls made from threads after
``execute`` returned, Triton 2.51's python stub corrupted its heap under concurrent streams, and an ensemble
would not pass a client's cancellation on to its decoupled step. A row whose client cancelled gets nothing
more, and the decode stops as soon as no row is left that someone is waiting for.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import OnnxDecoder, OnnxEncoder
from canary_qwen.bounds import RequestBounds
from canary_qwen.decoding import splice_and_pad
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.checks import model_parameters
from canary_qwen.serving.models.metrics import ModelCounters
from canary_qwen.serving.models.responses import TextReply, one_clip_request


class _NoOneWaiting(Exception):
    """Every row of the batch has ended or was cancelled: stop decoding."""


class _Row(TextReply):
    """One request: its inputs, and its reply."""

    def __init__(self, request, samples, prompt_ids, budget, tokenizer, counters):
        super().__init__(request, tokenizer, counters)
        self.samples, self.prompt_ids, self.budget = samples, prompt_ids, budget


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.info = manifest.model
        device, threads = params.get("device", "cpu"), int(params.get("ort_threads", "0") or 0)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), self.info["audio_locator_tag"])
        # a long-running server: ONNX Runtime's arena off (onnx_runtime.session)
        self.encoder = OnnxEncoder(manifest.onnx_graph("encoder"), device, threads, arena=False)
        self.decoder = OnnxDecoder(manifest.onnx_graph("decoder"), self.info, device, threads, arena=False)
        self.embed_table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
        self.bounds = RequestBounds.from_parameters(params)
        self.name = args["model_name"]
        self.counters = ModelCounters(self.name)

    def _row(self, request) -> _Row:
        samples, prompt_ids, budget = one_clip_request(request, self.name, self.tokenizer, self.bounds)
        return _Row(request, samples, prompt_ids, budget, self.tokenizer, self.counters)

    def execute(self, requests):
        rows = []
        for request in requests:
            try:
                rows.append(self._row(request))
            except InputError as e:
                TextReply(request, self.tokenizer, self.counters).fail(str(e))
        if rows:
            try:
                self._decode(rows)
            except Exception as e:
                pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
                for row in rows:
                    row.fail(f"streaming failed: {e}")
        return None

    def finalize(self):
        self.counters.close()

    def _decode(self, rows: list) -> None:
        embeds = self.encoder([row.samples for row in rows])
        x, valid = splice_and_pad(
            [row.prompt_ids for row in rows], embeds, self.embed_table.__getitem__, self.info["placeholder_id"]
        )

        def on_token(i, token, finished):
            row = rows[i]
            if not row.closed and row.cancelled():
                row.end()
            if token is not None:
                row.push(token)
            if finished:
                row.finish()
            if all(r.closed for r in rows):
                raise _NoOneWaiting

        try:
            self.decoder.generate(self.embed_table, x, valid, [row.budget for row in rows], on_token=on_token)
        except _NoOneWaiting:
            pass
