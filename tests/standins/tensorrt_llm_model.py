"""Stand-in for TensorRT-LLM 1.2's ``tensorrtllm`` backend as a Triton python model, for tests on a machine where
TensorRT-LLM cannot run. It serves our generated ``tensorrt_llm`` config (only ``backend`` changed to python) and
behaves as the backend's source says it does (``trtllm_contract``): it refuses to load a config the backend would
refuse, answers a request that breaks the contract with the backend's own error, answers each row of a request
separately, a token at a time when ``streaming`` is on. The tokens are real: greedy decoding with the export's
``decoder.onnx`` over the prompt with every id >= the engine's vocab size read from the request's prompt table.
Decoupled, it works as the backend's executor does: ``execute`` only enqueues (each request decodes on its own
thread, so concurrent requests decode together), and a request stops early when its client cancelled (the backend's
WaitForCancel) or a ``stop`` request with its request id came (handleStopRequest). With the ``trace_dir`` parameter,
each request leaves a record of how many tokens it decoded and how it ended there.
"""

import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
import trtllm_contract
from google.protobuf import json_format
from torch.utils.dlpack import from_dlpack
from tritonclient.grpc import model_config_pb2

from canary_qwen.backends.onnx_runtime import OnnxDecoder
from canary_qwen.export.manifest import read_manifest

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Stopped(Exception):
    """The request was cancelled or stopped: the executor stops decoding it."""


def _array(tensor):
    array = from_dlpack(tensor.to_dlpack())
    return array.float().numpy() if str(array.dtype) == "torch.bfloat16" else array.numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        cfg = json_format.ParseDict(config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
        cfg.backend = "tensorrtllm"  # judged as the real model's config
        problems = trtllm_contract.config_problems(cfg)
        path = cfg.parameters[trtllm_contract.ENGINE_PATH_PARAMETER].string_value
        if not problems and not os.path.exists(path):
            problems.append(f"Decoder (GPT) model path at {path} does not exist.")
        if problems:
            raise RuntimeError("; ".join(problems))
        self.decoupled = cfg.model_transaction_policy.decoupled
        self.kv_cache_reuse = trtllm_contract.kv_cache_reuse(cfg)
        engine = json.loads(open(os.path.join(path, "config.json")).read())
        self.vocab_size = int(engine["pretrained_config"]["vocab_size"])
        manifest = read_manifest(cfg.parameters["export_dir"].string_value)
        self.decoder = OnnxDecoder(manifest.artifact("decoder"), manifest.model)
        self.embed_table = np.load(manifest.artifact("embed_tokens"))
        self.trace_dir = cfg.parameters["trace_dir"].string_value if "trace_dir" in cfg.parameters else ""
        self.stopped = set()  # request ids a stop request named
        self.lock = threading.Lock()
        self.threads = []

    def _embeddings(self, ids, table):
        text = np.asarray(self.embed_table[np.minimum(ids, self.vocab_size - 1)], np.float32)
        fake = ids >= self.vocab_size
        text[fake] = table[ids[fake] - self.vocab_size]
        return text[None]

    def _row(self, inputs, row, respond, streaming, stopped):
        """Row ``row`` of a request, answered through ``respond(tokens, last_of_row)``; ``stopped()``: whether the
        request was cancelled. Returns (tokens decoded, whether it was stopped)."""
        n = int(np.asarray(inputs["input_lengths"]).reshape(-1)[row])
        ids = np.asarray(inputs["input_ids"])[row, :n].astype(np.int64)
        table = np.asarray(inputs["prompt_embedding_table"])[row]
        budget = int(np.asarray(inputs["request_output_len"]).reshape(-1)[row])
        end_id = int(np.asarray(inputs["end_id"]).reshape(-1)[row])
        embeds = self._embeddings(ids, table)
        produced = []  # exclude_input_in_output: the new tokens, end_id included when generated

        def on_token(_, token, finished):
            if streaming and stopped():
                raise _Stopped
            produced.append(end_id if token is None else token)
            if streaming:  # one response per token, the last one final
                respond(produced[-1:], finished)

        try:
            self.decoder.generate(
                self.embed_table, embeds, np.ones(embeds.shape[:2], bool), [budget], on_token=on_token
            )
        except _Stopped:  # the executor ends a cancelled request with a final response
            respond([], True)
            return len(produced), True
        if not streaming:
            respond(produced, True)
        return len(produced), False

    def _answer(self, request, send, sender=None):
        """The backend's answer to one request (``_read``): ``send(response, final)`` per response (``sender``: the
        decoupled request's, whose cancellation stops it)."""
        inputs, requested, request_id = request
        problems = trtllm_contract.request_problems(
            inputs, requested, decoupled=self.decoupled, kv_cache_reuse=self.kv_cache_reuse
        )
        if problems:
            send(pb_utils.InferenceResponse(error=pb_utils.TritonError("; ".join(problems))), True)
            return
        streaming = "streaming" in inputs and bool(np.asarray(inputs["streaming"]).reshape(-1)[0])

        def stopped():
            with self.lock:
                if request_id and request_id in self.stopped:
                    return True
            return sender is not None and sender.is_cancelled()

        rows = len(inputs["input_ids"])
        decoded, was_stopped = 0, False
        for row in range(rows):

            def respond(tokens, last_of_row, row=row):
                out = [
                    pb_utils.Tensor("output_ids", np.array(tokens, np.int32).reshape(1, 1, len(tokens))),
                    pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], np.int32)),
                ]
                if "batch_index" in requested and rows > 1:  # only when batch > 1 (fillTritonResponse)
                    out.append(pb_utils.Tensor("batch_index", np.array([[row]], np.int32)))
                # each row's final response; only the last row's carries the FINAL flag (WaitForResponse)
                send(pb_utils.InferenceResponse(out), last_of_row and row == rows - 1)

            n, was_stopped = self._row(inputs, row, respond, streaming, stopped)
            decoded += n
            if was_stopped:
                break
        if self.trace_dir:
            record = {"request_id": request_id, "decoded": decoded, "stopped": was_stopped}
            with open(os.path.join(self.trace_dir, f"{request_id or threading.get_ident()}.json"), "w") as f:
                json.dump(record, f)

    def _stop(self, request, sender):
        """handleStopRequest: the request named by this one's id is cancelled; one empty final response."""
        request_id = request.request_id()
        if not request_id:
            error = pb_utils.TritonError("Trying to stop a request but request ID is not provided")
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
            return
        with self.lock:
            self.stopped.add(request_id)
        sender.send(pb_utils.InferenceResponse([]), flags=FINAL)

    @staticmethod
    def _read(request):
        return (
            {t.name(): _array(t) for t in request.inputs()},
            list(request.requested_output_names()),
            request.request_id(),
        )

    def execute(self, requests):
        if not self.decoupled:
            responses = []
            for request in requests:
                self._answer(self._read(request), lambda response, final: responses.append(response))
            return responses
        for request in requests:
            stop = pb_utils.get_input_tensor_by_name(request, trtllm_contract.STOP_INPUT)
            if stop is not None and bool(stop.as_numpy().reshape(-1)[0]):
                self._stop(request, request.get_response_sender())
                continue
            # the executor decodes enqueued requests in flight: execute returns at once
            thread = threading.Thread(
                target=self._decode, args=(self._read(request), request.get_response_sender()), daemon=True
            )
            thread.start()
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        return None

    def _decode(self, request, sender):
        try:
            self._answer(request, lambda response, final: sender.send(response, flags=FINAL if final else 0), sender)
        except Exception as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"stand-in failed: {e}")), flags=FINAL)

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
