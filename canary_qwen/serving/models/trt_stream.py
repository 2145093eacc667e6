"""Triton python model ``canary_qwen_stream`` of the trt flavour: decoupled, same interface as the ``canary_qwen``
ensemble. AUDIO [S] float32 (+ optional PROMPT, MAX_NEW_TOKENS) -> TEXT pieces as the tokens are generated, then an
empty response carrying the final flag. The pieces join to exactly the ensemble's TEXT.

Per request, all inside ``execute`` and in this thread: ``encoder`` (TensorRT plan: audio [1, S] + audio_lengths)
-> ``prompt_table`` (fake ids + prompt embedding table) -> ``tensorrt_llm`` (decoupled, ``streaming`` on: a response
per new token), whose tokens become text pieces as they arrive. Tensors pass between the models as they come (DLPack
keeps bf16 embeddings bf16). Model-to-model (BLS) calls made from threads after ``execute`` returned corrupted
Triton 2.51's python stub under concurrent streams, so an instance serves one stream at a time: concurrent streams
run on the model's instances (``instance_group`` count), and TensorRT-LLM batches them in flight. When the client
cancels, its stream gets nothing more and ``tensorrt_llm`` is told to stop that request (a ``stop`` request under
the same request id, as TensorRT-LLM's own ``tensorrt_llm_bls`` model does).
"""

import traceback
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.bounds import RequestBounds
from canary_qwen.decoding import until_eos
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.export.tensorrt.encoder_engine import pad_to_min_samples
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.checks import (
    model_parameters,
)
from canary_qwen.serving.models.metrics import ModelCounters
from canary_qwen.serving.models.responses import TextReply, one_clip_request

TABLE_INPUTS = (
    "input_ids",
    "input_lengths",
    "request_output_len",
    "end_id",
    "pad_id",
    "prompt_embedding_table",
    "prompt_vocab_size",
    "prompt_table_extra_ids",
)
# tensorrt_llm answers a request that does not ask for both with an error
LLM_OUTPUTS = ["output_ids", "sequence_length"]


class ComposingModelError(Exception):
    """An error response from a model called through BLS; its message goes to the client unchanged."""


def _renamed(name, tensor):
    return pb_utils.Tensor.from_dlpack(name, tensor.to_dlpack())


def _checked(response):
    if response.has_error():
        raise ComposingModelError(response.error().message())
    return response


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.name = args["model_name"]
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.eos_id = manifest.model["eos_id"]
        self.bounds = RequestBounds.from_parameters(params)
        self.encoder_model = params["encoder_model"]
        self.prompt_table_model = params["prompt_table_model"]
        self.llm_model = params["llm_model"]
        self.min_samples = int(params["min_samples"])  # the encoder plan's profile minimum
        self.counters = ModelCounters(self.name)

    def execute(self, requests):
        for request in requests:  # one request per call: the model has no dynamic batcher
            reply = TextReply(request, self.tokenizer, self.counters)
            try:
                self._stream(request, reply)
            except (InputError, ComposingModelError) as e:
                reply.fail(str(e))
            except Exception as e:
                pb_utils.Logger.log_error(f"{self.name}: {traceback.format_exc()}")
                reply.fail(f"streaming failed: {e}")
        return None

    def finalize(self):
        self.counters.close()

    def _stream(self, request, reply: TextReply) -> None:
        samples, prompt_ids, budget = one_clip_request(request, self.name, self.tokenizer, self.bounds)
        inputs = self._llm_inputs(samples[None], prompt_ids, budget)
        request_id = uuid.uuid4().hex  # the handle to stop it by
        llm_request = pb_utils.InferenceRequest(
            model_name=self.llm_model, inputs=inputs, requested_output_names=LLM_OUTPUTS, request_id=request_id
        )
        ended = stopped = False
        for response in llm_request.exec(decoupled=True):
            if not stopped and (reply.closed or reply.cancelled()):  # closed here: the client went away
                reply.end()
                self._stop(request_id)
                stopped = True
            if stopped:  # what tensorrt_llm still sends until it stops is drained unsent
                continue
            _checked(response)
            tokens = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if tokens is None or ended:  # None: the empty response that carries the final flag
                continue
            tokens = tokens.as_numpy().reshape(-1)
            kept = until_eos(tokens, self.eos_id)
            ended = len(kept) < len(tokens)
            for token in kept:
                reply.push(int(token))
        reply.finish()

    def _llm_inputs(self, audio, ids, budget) -> list:
        """The tensorrt_llm request for one clip: its frames from the encoder, then the prompt table."""
        encoded = _checked(
            pb_utils.InferenceRequest(
                model_name=self.encoder_model,
                inputs=[
                    pb_utils.Tensor("audio", pad_to_min_samples(audio, self.min_samples)),
                    pb_utils.Tensor("audio_lengths", np.array([[audio.shape[1]]], dtype=np.int64)),
                ],
                requested_output_names=["embeddings", "embedding_lengths"],
            ).exec()
        )
        table = _checked(
            pb_utils.InferenceRequest(
                model_name=self.prompt_table_model,
                inputs=[
                    pb_utils.Tensor("PROMPT_IDS", np.array([ids], dtype=np.int64)),
                    _renamed("EMBEDDINGS", pb_utils.get_output_tensor_by_name(encoded, "embeddings")),
                    _renamed("EMBEDDING_LENGTH", pb_utils.get_output_tensor_by_name(encoded, "embedding_lengths")),
                    pb_utils.Tensor("MAX_NEW_TOKENS", np.array([[budget]], dtype=np.int32)),
                ],
                requested_output_names=list(TABLE_INPUTS),
            ).exec()
        )
        inputs = [pb_utils.get_output_tensor_by_name(table, name) for name in TABLE_INPUTS]
        return inputs + [pb_utils.Tensor("streaming", np.array([[True]]))]

    def _stop(self, request_id: str) -> None:
        """Have tensorrt_llm cancel ``request_id``: a request with ``stop`` true and that id (the backend's
        handleStopRequest, triton_backend/inflight_batcher_llm/src/model_instance_state.cc, answers it with one
        empty final response; input_lengths and request_output_len are required inputs of its config)."""
        stop = pb_utils.InferenceRequest(
            model_name=self.llm_model,
            inputs=[
                pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
                pb_utils.Tensor("input_lengths", np.ones((1, 1), np.int32)),
                pb_utils.Tensor("request_output_len", np.zeros((1, 1), np.int32)),
                pb_utils.Tensor("stop", np.array([[True]])),
            ],
            requested_output_names=[],
            request_id=request_id,
        )
        for response in stop.exec(decoupled=True):
            if response.has_error():  # the stream is closed already: only the log can tell
                pb_utils.Logger.log_warn(f"{self.name}: stopping {request_id}: {response.error().message()}")
