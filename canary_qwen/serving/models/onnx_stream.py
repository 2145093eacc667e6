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

import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import OnnxDecoder, OnnxEncoder
from canary_qwen.decoding import splice_and_pad
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.checks import (
    MAX_NEW_TOKENS_LIMIT,
    TextStream,
    check_audio,
    encode_prompt,
    model_parameters,
    read_budgets,
    read_strings,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.05  # is_cancelled() is a round trip to the server process: ask a few times a second per row


class _NoOneWaiting(Exception):
    """Every row of the batch has ended or was cancelled: stop decoding."""


class _Row:
    """One request: its inputs, its sender, and where its text stands."""

    def __init__(self, request, samples, prompt_ids, budget, tokenizer):
        self.request = request
        self.sender = request.get_response_sender()
        self.samples, self.prompt_ids, self.budget = samples, prompt_ids, budget
        self.text = TextStream(tokenizer)
        self.closed = False
        self.next_check = 0.0

    def cancelled(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CANCEL_CHECK_S
        return self.request.is_cancelled()

    def send(self, piece: str, final: bool = False) -> None:
        response = None
        if piece:
            response = pb_utils.InferenceResponse(
                [pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=object))]
            )
        try:
            self.sender.send(response, flags=FINAL if final else 0)
        except Exception:  # the client went away between our checks: nothing more goes to it
            self.end()
            return
        self.closed = self.closed or final

    def end(self) -> None:
        """Close the request without more text (its client cancelled or went away). The final flag must go out
        all the same: Triton 2.51 does not unload a decoupled model while a request of it has had none."""
        self.closed = True
        try:
            self.sender.send(flags=FINAL)
        except Exception:
            pass


def _fail(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.info = manifest.model
        device, threads = params.get("device", "cpu"), int(params.get("ort_threads", "0") or 0)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), self.info["audio_locator_tag"])
        self.encoder = OnnxEncoder(manifest.onnx_graph("encoder"), device, threads)
        self.decoder = OnnxDecoder(manifest.onnx_graph("decoder"), self.info, device, threads)
        self.embed_table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
        self.max_audio_s = float(params["max_audio_s"])
        self.default_budget = int(params["max_new_tokens"])
        self.budget_limit = int(params.get("max_new_tokens_limit", MAX_NEW_TOKENS_LIMIT))
        self.name = args["model_name"]

    def _row(self, request) -> _Row:
        audio = check_audio(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), self.max_audio_s)
        if len(audio) != 1:
            raise InputError(f"{self.name} takes one clip per request, got a batch of {len(audio)}")
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        prompt = read_strings(None if prompt is None else prompt.as_numpy(), 1)[0]
        budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        budget = read_budgets(None if budget is None else budget.as_numpy(), 1, self.default_budget, self.budget_limit)[
            0
        ]
        return _Row(request, audio[0], encode_prompt(self.tokenizer, prompt), budget, self.tokenizer)

    def execute(self, requests):
        rows = []
        for request in requests:
            try:
                rows.append(self._row(request))
            except InputError as e:
                _fail(request.get_response_sender(), str(e))
        if rows:
            try:
                self._decode(rows)
            except Exception as e:
                pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
                for row in rows:
                    if not row.closed:
                        row.closed = True
                        _fail(row.sender, f"streaming failed: {e}")
        return None

    def _decode(self, rows: list) -> None:
        embeds = self.encoder([row.samples for row in rows])
        x, valid = splice_and_pad(
            [row.prompt_ids for row in rows], embeds, self.embed_table.__getitem__, self.info["placeholder_id"]
        )

        def on_token(i, token, finished):
            row = rows[i]
            if not row.closed and row.cancelled():
                row.end()
            if not row.closed:
                piece = "" if token is None else row.text.push(token)
                if finished:
                    piece += row.text.finish()
                if piece or finished:
                    row.send(piece, final=finished)
            if all(r.closed for r in rows):
                raise _NoOneWaiting

        try:
            self.decoder.generate(self.embed_table, x, valid, [row.budget for row in rows], on_token=on_token)
        except _NoOneWaiting:
            pass
