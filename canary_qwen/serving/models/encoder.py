"""Triton python model ``encoder``: AUDIO (float32 16 kHz samples) -> EMBEDDINGS [frames, hidden].

The dynamic batcher hands over several requests of different lengths at once (ragged batching);
their valid rows are padded together and run through ``encoder.onnx`` in ONE ONNX Runtime call.
Bad requests get their own error and do not hold up the others.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import OnnxEncoder
from canary_qwen.bounds import RequestBounds
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.serving.checks import check_audio, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        self.encoder = OnnxEncoder(
            manifest.onnx_graph("encoder"),
            params.get("device", "cpu"),
            int(params.get("ort_threads", "0") or 0),
            arena=False,  # a long-running server (onnx_runtime.session)
        )
        self.max_audio_s = RequestBounds.from_parameters(params).audio_s
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = [None] * len(requests)
        rows, owners = [], []  # every valid row of every request, and which request it came from
        for i, request in enumerate(requests):
            try:
                audio = check_audio(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), self.max_audio_s)
            except InputError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            rows.extend(audio)
            owners.extend([i] * len(audio))
        if rows:
            try:
                embeds = self.encoder(rows)
            except Exception as e:
                self.logger.log_error(f"encoder: {traceback.format_exc()}")
                error = pb_utils.TritonError(f"encoder failed: {e}")
                return [r or pb_utils.InferenceResponse(error=error) for r in responses]
            for i in sorted(set(owners)):
                mine = [e for e, o in zip(embeds, owners) if o == i]
                # rows of one request have the same length, hence the same number of frames
                out = mine[0][None] if len(mine) == 1 else np.stack(mine)
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("EMBEDDINGS", out)])
        return responses
