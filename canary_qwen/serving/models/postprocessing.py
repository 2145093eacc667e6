"""Triton python model ``postprocessing``: OUTPUT_IDS -> TEXT (special tokens skipped, stripped).

onnx flavour: OUTPUT_IDS [N] int64 from the ``llm`` model. trt flavour: ``tensorrt_llm``'s
output_ids [beams, N] int32 and sequence_length [beams] (as OUTPUT_IDS / SEQUENCE_LENGTH), read as
beam 0 cut at its length and at eos.

The ids are passed on as TOKEN_IDS: the ensemble's OUTPUT_IDS output comes from here so that a
client asking for TEXT alone does not starve this step (Triton prunes unrequested ensemble outputs).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.protocol.trt_requests import generated_rows
from canary_qwen.serving.checks import model_parameters, pad_ids
from canary_qwen.serving.models.responses import respond_each


class TritonPythonModel:
    def initialize(self, args):
        _, _, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.eos_id, self.pad_id = manifest.model["eos_id"], manifest.model["pad_id"]

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "OUTPUT_IDS").as_numpy()
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH")
        if ids.ndim == 3:  # tensorrt_llm: [B, beams, N]
            ids = pad_ids(
                generated_rows(ids, None if lengths is None else lengths.as_numpy(), self.eos_id), self.pad_id
            )
        # object dtype: a fixed-width bytes array would drop trailing NUL bytes
        text = np.array([[self.tokenizer.decode(row.tolist()).strip().encode("utf-8")] for row in ids], dtype=object)
        return pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", text), pb_utils.Tensor("TOKEN_IDS", ids)])

    def execute(self, requests):
        return respond_each(requests, self._one, "postprocessing")
