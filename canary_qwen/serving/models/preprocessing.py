"""Triton python model ``preprocessing``: AUDIO + PROMPT (optional string) -> SAMPLES + PROMPT_IDS
(+ AUDIO_LENGTH, the sample count the TensorRT encoder plan takes, where the config declares it).

AUDIO is checked here (empty, too long, NaN/inf) and passed on as SAMPLES for the encoder, so a bad
request fails at this one step with one clear message; PROMPT becomes the prompt token ids with the
audio placeholder (the default transcription prompt when it is left out).

trt flavour parameters: ``min_samples`` pads SAMPLES up to the encoder plan's profile minimum (AUDIO_LENGTH keeps
the clip's own length, so the frames come out as for the clip itself); ``rows_per_request`` refuses requests with
more rows (``tensorrt_llm`` answers the rows of one request separately and untagged).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.bounds import RequestBounds
from canary_qwen.errors import InputError
from canary_qwen.export.manifest import read_manifest
from canary_qwen.export.tensorrt.encoder_engine import pad_to_min_samples
from canary_qwen.model.tokenizer import QwenTokenizer
from canary_qwen.serving.checks import check_audio, encode_prompt, model_parameters, read_strings
from canary_qwen.serving.models.responses import respond_each


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        self.with_length = any(o["name"] == "AUDIO_LENGTH" for o in config["output"])
        manifest = read_manifest(version_dir)
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), manifest.model["audio_locator_tag"])
        self.max_audio_s = RequestBounds.from_parameters(params).audio_s
        self.min_samples = int(params.get("min_samples", 0))
        self.max_rows = int(params.get("rows_per_request", 0))

    def _one(self, request):
        audio = check_audio(pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy(), self.max_audio_s)
        if self.max_rows and len(audio) > self.max_rows:
            raise InputError(
                f"this server takes {self.max_rows} clip per request, got {len(audio)} rows: "
                "send each clip as its own request"
            )
        prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT")
        prompts = read_strings(None if prompt is None else prompt.as_numpy(), len(audio))
        rows = [encode_prompt(self.tokenizer, p) for p in prompts]
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows):  # a tensor is rectangular: different prompts in one request
            raise InputError(
                "rows of one request must use prompts of the same token length; send them as separate requests"
            )
        outputs = [
            pb_utils.Tensor("PROMPT_IDS", np.asarray(rows, dtype=np.int64)),
            pb_utils.Tensor("SAMPLES", pad_to_min_samples(audio, self.min_samples)),
        ]
        if self.with_length:
            outputs.append(pb_utils.Tensor("AUDIO_LENGTH", np.full((len(audio), 1), audio.shape[1], dtype=np.int64)))
        return pb_utils.InferenceResponse(outputs)

    def execute(self, requests):
        return respond_each(requests, self._one, "preprocessing")
