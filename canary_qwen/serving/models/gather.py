"""Triton python model ``canary_qwen`` of the engine flavours (torch-fast, vllm): the stream model's answer as one
response, so Triton's standard unary inference (HTTP ``/v2/models/canary_qwen/infer``, gRPC ModelInfer,
``perf_analyzer``) reaches an engine that streams.

AUDIO + PROMPT (optional) + MAX_NEW_TOKENS (optional), or DIALOGUE in place of AUDIO (LLM mode) -> TEXT and
OUTPUT_IDS, the joined pieces of the engine model (``canary_qwen_stream``, decoupled) for the same inputs. ``execute`` is a coroutine: every request of the batch is
sent to the engine at once (BLS, ``async_exec``), so they decode together in its running batch; the model checks
nothing itself (the engine refuses bad requests, and its error is this request's answer).
"""

import asyncio

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.serving.checks import model_parameters

INPUTS = ("AUDIO", "PROMPT", "DIALOGUE", "MAX_NEW_TOKENS")
OUTPUTS = ["TEXT", "OUTPUT_IDS"]


class TritonPythonModel:
    def initialize(self, args):
        _, params, _ = model_parameters(args)
        self.engine_model = params["engine_model"]

    async def execute(self, requests):
        return await asyncio.gather(*(self._answer(request) for request in requests))

    async def _answer(self, request):
        inputs = [t for t in (pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS) if t is not None]
        pieces = await pb_utils.InferenceRequest(
            model_name=self.engine_model, inputs=inputs, requested_output_names=OUTPUTS
        ).async_exec(decoupled=True)
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
