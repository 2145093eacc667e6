"""Triton python model ``postprocessing``: OUTPUT_IDS -> TEXT (special tokens skipped, stripped).

The ids are passed on as TOKEN_IDS: the ensemble's OUTPUT_IDS output comes from here so that a
client asking for TEXT alone does not starve this step (Triton prunes unrequested ensemble outputs).
"""
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.export.manifest import read_manifest
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.triton_repo.serving import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        _, _, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "OUTPUT_IDS").as_numpy()
                ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
                # object dtype: a fixed-width bytes array would drop trailing NUL bytes
                text = np.array([[self.tokenizer.decode(row.tolist()).strip().encode("utf-8")] for row in ids], dtype=object)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", text), pb_utils.Tensor("TOKEN_IDS", ids)]))
            except Exception as e:
                self.logger.log_error(f"postprocessing: {traceback.format_exc()}")
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocessing failed: {e}")))
        return responses
