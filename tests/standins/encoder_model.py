"""Stand-in for the trt flavour's ``encoder`` (a TensorRT plan) as a Triton python model: the same ONNX graph the
plan is built from (``audio`` [B, S] + ``audio_lengths`` -> ``embeddings`` + ``embedding_lengths``), run by ONNX
Runtime, and refusing sample counts outside the plan's optimisation profile as TensorRT does (the profile the
export's manifest records for the built plan)."""

import json

import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import session
from canary_qwen.export.manifest import read_manifest


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        manifest = read_manifest(params["export_dir"])
        self.profile = manifest.data["tensorrt_build"]["encoder_profile"]
        self.session = session(manifest.artifact("encoder"), "cpu")

    def _one(self, request):
        audio = pb_utils.get_input_tensor_by_name(request, "audio").as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, "audio_lengths").as_numpy().reshape(-1)
        lo, hi = self.profile["min_samples"], self.profile["max_samples"]
        if not lo <= audio.shape[1] <= hi:
            raise ValueError(f"audio has {audio.shape[1]} samples, outside the plan's profile [{lo}, {hi}]")
        embeds, lens = self.session.run(None, {"audio": audio, "audio_lengths": lengths})
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor("embeddings", embeds), pb_utils.Tensor("embedding_lengths", lens.reshape(-1))]
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
