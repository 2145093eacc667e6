"""Triton python model ``canary_qwen`` of the engine flavours (torch-fast, vllm): the stream model's answer as one
response, so Triton's standard unary inference (HTTP ``/v2/models/canary_qwen/infer``, gRPC ModelInfer,
``perf_analyzer``) reaches an engine that streams.

AUDIO + PROMPT (optional) + MAX_NEW_TOKENS (optional), or DIALOGUE in place of AUDIO (LLM mode) -> TEXT and
OUTPUT_IDS: the engine model's (``canary_qwen_stream``, decoupled) answer for the same inputs, which it sends as
one response when asked (request parameter ``whole_answer``). The model checks nothing itself (the engine refuses
bad requests, and its error is this request's answer).

``execute`` hands each request to a worker thread and returns at once; the worker waits for the engine (BLS) and
answers through the request's response sender, which Triton 2.51's python backend lets a model that is not
decoupled use for its one response. So the instance takes the next batch while the engine decodes this one, and
requests reach the engine as they come, to join its running batch. A coroutine ``execute`` would not do that: the
python backend runs one concurrently only for decoupled models, so each instance held a batch until its longest
request ended (and ``async_exec`` had a use-after-free fixed after 2.51, python_backend #439). At most
``max_pending`` requests are held (the engine's slots and a full queue); one more is refused as busy at once, in
Triton's own words for a full queue.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.serving.checks import model_parameters
from canary_qwen.serving.models.responses import WHOLE_ANSWER

INPUTS = ("AUDIO", "PROMPT", "DIALOGUE", "MAX_NEW_TOKENS")
OUTPUTS = ["TEXT", "OUTPUT_IDS"]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        _, params, _ = model_parameters(args)
        self.engine_model = params["engine_model"]
        self.max_pending = int(params["max_pending"])
        self.pending = 0
        self.lock = threading.Lock()
        self.workers = ThreadPoolExecutor(self.max_pending, thread_name_prefix="gather")

    def execute(self, requests):
        for request in requests:
            with self.lock:
                busy = self.pending >= self.max_pending
                self.pending += not busy
            if busy:
                message = f"Exceeds maximum queue size: canary_qwen holds {self.max_pending} requests; retry later"
                _send(request, pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
            else:
                self.workers.submit(self._answer, request)
        return None

    def _answer(self, request):
        try:
            _send(request, self._gather(request))
        finally:
            with self.lock:
                self.pending -= 1

    def _gather(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS) if t is not None]
        try:
            pieces = pb_utils.InferenceRequest(
                model_name=self.engine_model,
                inputs=inputs,
                requested_output_names=OUTPUTS,
                parameters={WHOLE_ANSWER: True},  # one response, not a round trip per piece
            ).exec(decoupled=True)
        except Exception as e:  # the engine model could not be reached
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"canary_qwen failed: {e}"))
        text, ids = [], []
        for response in pieces:
            if response.has_error():
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(response.error().message()))
            piece = pb_utils.get_output_tensor_by_name(response, "TEXT")
            if piece is not None:
                text.extend(piece.as_numpy().reshape(-1))
                ids.extend(pb_utils.get_output_tensor_by_name(response, "OUTPUT_IDS").as_numpy().reshape(-1))
        joined = "".join(p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in text).strip()
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("TEXT", np.array([[joined.encode("utf-8")]], dtype=object)),
                pb_utils.Tensor("OUTPUT_IDS", np.array([ids], dtype=np.int64)),
            ]
        )

    def finalize(self):
        self.workers.shutdown(wait=True, cancel_futures=False)


def _send(request, response):
    try:
        request.get_response_sender().send(response, flags=FINAL)
    except Exception:  # the client went away
        pass
