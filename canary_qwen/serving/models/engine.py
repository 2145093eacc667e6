"""Triton python model ``engine``: one in-process engine (parameter ``engine``: torch-fast or vllm) for every
request (decoupled).

AUDIO + PROMPT (optional) + MAX_NEW_TOKENS (optional) -> a stream of responses, each with the TEXT piece and
the OUTPUT_IDS its tokens added, then the final flag; the pieces join to the transcription's text.

``execute`` only checks a request and submits it to the ``EngineLoop``, whose thread owns the engine: between
two steps it admits what arrived (one batch, encoded together; it joins the running batch), stops the requests
whose client cancelled, and sends each request's new tokens as they come. The engine is made (weights loaded,
kernels compiled) in ``initialize``: the server is not ready before it can answer.
"""

import locale
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.defaults import MAX_NEW_TOKENS
from canary_qwen.engines import EngineLoop
from canary_qwen.engines.local import SOURCES, open_engine
from canary_qwen.errors import CanaryQwenError
from canary_qwen.serving.checks import MAX_NEW_TOKENS_LIMIT, TextStream, model_parameters
from canary_qwen.serving.models.responses import CANCEL_CHECK_S, one_clip_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(piece: str, ids: list[int]):
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=object)),
            pb_utils.Tensor("OUTPUT_IDS", np.array([ids], dtype=np.int64)),
        ]
    )


class _Reply:
    """One request's sink (``canary_qwen.engines.Sink``): its text so far, sent piece by piece."""

    def __init__(self, request, tokenizer):
        self.request = request
        self.sender = request.get_response_sender()
        self.text = TextStream(tokenizer)
        self.closed = False
        self.sent_any = False
        self.next_check = 0.0

    def send(self, ids, finished):
        if self.closed:
            return
        piece = "".join(self.text.push(t) for t in ids)
        if finished:
            piece += self.text.finish()
        if piece or ids or (finished and not self.sent_any):  # a request answered with no tokens still gets one
            self.sender.send(_response(piece, list(ids)))
            self.sent_any = True
        if finished:
            self.closed = True
            self.sender.send(flags=FINAL)

    def fail(self, message):
        if not self.closed:
            self.closed = True
            self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def cancelled(self):
        if self.closed:
            return False
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CANCEL_CHECK_S  # is_cancelled() is a round trip to the server process
        if not self.request.is_cancelled():
            return False
        # The final flag must go out all the same: Triton 2.51 does not unload a decoupled model while a request
        # of it has had none.
        self.closed = True
        try:
            self.sender.send(flags=FINAL)
        except Exception:
            pass
        return True


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        self.name = config["name"]
        # The stub's embedded Python starts with LC_CTYPE "C": files opened without an encoding would read as
        # ASCII, and importing vLLM or torch's compiler reads non-ASCII kernel templates that way.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        kind = params["engine"]
        self.max_audio_s = float(params["max_audio_s"])
        self.default_budget = int(params.get("max_new_tokens", MAX_NEW_TOKENS))
        self.budget_limit = int(params.get("max_new_tokens_limit", MAX_NEW_TOKENS_LIMIT))
        source = version_dir / SOURCES[kind]
        engine = open_engine(
            kind,
            str(source),
            device=params.get("device", "cpu"),
            dtype=params.get("dtype") or None,
            max_batch=int(config["max_batch_size"]),
            max_audio_s=self.max_audio_s,
            max_new_tokens_limit=self.budget_limit,
            kv_cache_gib=float(params.get("kv_cache_gib", "1")),
        )
        self.loop = EngineLoop(engine, name=f"{self.name} ({kind})")
        self.tokenizer = self.loop.tokenizer

    def execute(self, requests):
        for request in requests:
            reply = _Reply(request, self.tokenizer)
            try:
                samples, ids, budget = one_clip_request(
                    request, self.name, self.tokenizer, self.max_audio_s, self.default_budget, self.budget_limit, 0
                )
                self.loop.submit(ids, samples, budget, reply)
            except CanaryQwenError as e:
                reply.fail(str(e))
        return None

    def finalize(self):
        self.loop.close()
