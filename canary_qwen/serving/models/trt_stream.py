"""Triton python model ``canary_qwen_stream`` of the trt flavour: the onnx flavour's streaming BLS model
(``canary_qwen.serving.models.stream``) with TensorRT engines behind it.

Per clip: ``encoder`` (TensorRT plan: audio [1, S] + audio_lengths) -> ``prompt_table`` (fake ids +
prompt embedding table) -> ``tensorrt_llm`` (decoupled, ``streaming`` true: a response per new token),
whose tokens are turned into text pieces exactly as in the onnx flavour. Tensors pass between the
models as they come (DLPack keeps bf16 embeddings bf16).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.decoding import until_eos
from canary_qwen.export.manifest import read_manifest
from canary_qwen.export.tensorrt.encoder_engine import pad_to_min_samples
from canary_qwen.serving.checks import model_parameters
from canary_qwen.serving.models.stream import ComposingModelError
from canary_qwen.serving.models.stream import TritonPythonModel as StreamModel

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


def _renamed(name, tensor):
    return pb_utils.Tensor.from_dlpack(name, tensor.to_dlpack())


class TritonPythonModel(StreamModel):
    def initialize(self, args):
        super().initialize(args)
        _, params, version_dir = model_parameters(args)
        self.prompt_table_model = params["prompt_table_model"]
        self.eos_id = read_manifest(version_dir).model["eos_id"]
        self.min_samples = int(params["min_samples"])  # the encoder plan's profile minimum

    def _token_arrays(self, audio, ids, budget):
        encoded = self._bls(
            self.encoder_model,
            [
                pb_utils.Tensor("audio", pad_to_min_samples(audio, self.min_samples)),
                pb_utils.Tensor("audio_lengths", np.array([[audio.shape[1]]], dtype=np.int64)),
            ],
            ["embeddings", "embedding_lengths"],
        )
        table = self._bls(
            self.prompt_table_model,
            [
                pb_utils.Tensor("PROMPT_IDS", np.array([ids], dtype=np.int64)),
                _renamed("EMBEDDINGS", pb_utils.get_output_tensor_by_name(encoded, "embeddings")),
                _renamed("EMBEDDING_LENGTH", pb_utils.get_output_tensor_by_name(encoded, "embedding_lengths")),
                pb_utils.Tensor("MAX_NEW_TOKENS", np.array([[budget]], dtype=np.int32)),
            ],
            list(TABLE_INPUTS),
        )
        inputs = [pb_utils.get_output_tensor_by_name(table, name) for name in TABLE_INPUTS]
        inputs.append(pb_utils.Tensor("streaming", np.array([[True]])))
        ended = False
        # tensorrt_llm answers a request that does not ask for both with an error
        for response in self._bls(self.llm_model, inputs, ["output_ids", "sequence_length"], decoupled=True):
            if response.has_error():
                raise ComposingModelError(response.error().message())
            tokens = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if tokens is None or ended:  # drain what follows eos unsent
                continue
            tokens = tokens.as_numpy().reshape(-1)
            kept = until_eos(tokens, self.eos_id)
            ended = len(kept) < len(tokens)
            yield kept
