"""Decoupled BLS streaming model, the base of the trt flavour's ``canary_qwen_stream`` (``trt_stream``); same
interface as the ``canary_qwen`` ensemble.

AUDIO [S] float32 (+ optional PROMPT, MAX_NEW_TOKENS) -> a stream of TEXT pieces, then an empty
response carrying the final flag. The pieces join to exactly the ensemble's TEXT.

Each request is handled on a worker thread, so ``execute`` returns at once and many streams run
together: the audio goes to the encoder and the embeddings to a decoupled LLM model through BLS.
Token ids are turned into text pieces as they arrive (``serving.TextStream``).
Caution: with Triton 2.51's python backend (the bundled server), BLS calls made from these threads under
16+ concurrent streams corrupted the stub's heap (glibc aborts, measured); the onnx flavour no longer uses
this model (``onnx_stream``). Whether newer python backends (the TensorRT-LLM containers) are safe is unverified.
"""

import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.defaults import MAX_NEW_TOKENS
from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.checks import (
    InputError,
    TextStream,
    check_audio,
    encode_prompt,
    model_parameters,
    read_budgets,
    read_strings,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ComposingModelError(Exception):
    """An error response from a model called through BLS; its message goes to the client unchanged."""


def _text_response(piece: str):
    return pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=object))])


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        self.name = config["name"]
        manifest = read_manifest(version_dir)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.max_audio_s = float(params["max_audio_s"])
        self.encoder_model = params.get("encoder_model", "encoder")
        self.llm_model = params.get("llm_model", "llm_stream")
        self.default_budget = int(params.get("max_new_tokens", MAX_NEW_TOKENS))
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_streams", "32")), thread_name_prefix="stream")
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._stream, request)
        return None

    def _bls(self, model, inputs, outputs, decoupled=False):
        request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
        if not decoupled:
            response = request.exec()
            if response.has_error():
                raise ComposingModelError(response.error().message())
            return response
        return request.exec(decoupled=True)

    def _token_arrays(self, audio, ids, budget):
        """The new token ids of one clip as they are generated (arrays): encoder, then the decoupled llm."""
        encoded = self._bls(self.encoder_model, [pb_utils.Tensor("AUDIO", audio)], ["EMBEDDINGS"])
        embeds = pb_utils.get_output_tensor_by_name(encoded, "EMBEDDINGS").as_numpy()
        inputs = [
            pb_utils.Tensor("PROMPT_IDS", np.array([ids], dtype=np.int64)),
            pb_utils.Tensor("EMBEDDINGS", embeds),
            pb_utils.Tensor("MAX_NEW_TOKENS", np.array([[budget]], dtype=np.int32)),
        ]
        for response in self._bls(self.llm_model, inputs, ["OUTPUT_IDS"], decoupled=True):
            if response.has_error():
                raise ComposingModelError(response.error().message())
            tokens = pb_utils.get_output_tensor_by_name(response, "OUTPUT_IDS")
            if tokens is not None:  # None: the empty response that carries the final flag
                yield tokens.as_numpy().reshape(-1)

    def _stream(self, request):
        sender = request.get_response_sender()
        try:
            audio = check_audio(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), self.max_audio_s)
            if len(audio) != 1:
                raise InputError(f"{self.name} takes one clip per request, got a batch of {len(audio)}")
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
            prompt = read_strings(None if prompt is None else prompt.as_numpy(), 1)[0]
            ids = encode_prompt(self.tokenizer, prompt)
            budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
            budget = read_budgets(None if budget is None else budget.as_numpy(), 1, self.default_budget)[0]
            text = TextStream(self.tokenizer)
            cancelled = False
            for tokens in self._token_arrays(audio, ids, budget):
                # The llm row cannot be stopped from here: after a cancellation its tokens are drained unsent.
                cancelled = cancelled or sender.is_cancelled()
                if cancelled:
                    continue
                for token in tokens:
                    piece = text.push(int(token))
                    if piece:
                        sender.send(_text_response(piece))
            tail = text.finish()
            if tail and not cancelled:
                sender.send(_text_response(tail))
            sender.send(flags=FINAL)
        except (InputError, ComposingModelError) as e:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
        except Exception as e:
            self.logger.log_error(f"{self.name}: {traceback.format_exc()}")
            try:
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"streaming failed: {e}")), flags=FINAL
                )
            except Exception:
                pass  # the final flag already went out, or the client is gone

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
