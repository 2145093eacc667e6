"""Triton python model ``prompt_table`` (trt flavour): the encoder's frames -> a ``tensorrt_llm`` request.

PROMPT_IDS [L] + EMBEDDINGS [T, H] (fp32 or bf16, the encoder plan's dtype) + EMBEDDING_LENGTH [1]
(+ optional MAX_NEW_TOKENS) -> input_ids with the placeholder replaced by T fake ids, the frames as
prompt_embedding_table in the engine's dtype, prompt_vocab_size, prompt_table_extra_ids (a content
hash, so equal clips may share KV-cache blocks) and the scalars ``tensorrt_llm`` needs
(``canary_qwen.protocol.trt_requests.tensorrt_llm_inputs``). bf16 tensors travel through DLPack
(numpy has no bf16), so this model needs torch, which the NGC Triton + TensorRT-LLM containers have.
It refuses to load when the server's TensorRT or TensorRT-LLM is not the one the engines were built with
(the manifest's build record; the GPU's compute capability is not checked here, to keep CUDA out of this stub).
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from canary_qwen.bounds import RequestBounds
from canary_qwen.export.manifest import check_engine_build, installed_version, read_manifest
from canary_qwen.protocol.trt_requests import tensorrt_llm_inputs
from canary_qwen.serving.checks import model_parameters, read_budgets
from canary_qwen.serving.models.responses import respond_each


def _as_float32(tensor) -> np.ndarray:
    return from_dlpack(tensor.to_dlpack()).float().cpu().numpy()


def _output(name: str, array: np.ndarray):
    if array.dtype.name == "bfloat16":  # ml_dtypes bf16 -> torch bf16, same bits
        return pb_utils.Tensor.from_dlpack(
            name, to_dlpack(torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16))
        )
    return pb_utils.Tensor(name, array)


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        check_engine_build(manifest.engine_build(), {p: installed_version(p) for p in ("tensorrt", "tensorrt_llm")})
        info = manifest.model
        self.settings = dict(
            placeholder_id=info["placeholder_id"],
            end_id=info["eos_id"],
            pad_id=info["pad_id"],
            vocab_size=int(params["vocab_size"]),
            table_dtype=params["table_dtype"],
        )
        self.bounds = RequestBounds.from_parameters(params)

    def _one(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
        frames = _as_float32(pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS"))
        lengths = pb_utils.get_input_tensor_by_name(request, "EMBEDDING_LENGTH").as_numpy()
        budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        budgets = read_budgets(None if budget is None else budget.as_numpy(), len(ids), self.bounds)
        inputs = tensorrt_llm_inputs(ids, frames, lengths, budgets, **self.settings)
        return pb_utils.InferenceResponse([_output(name, array) for name, array in inputs.items()])

    def execute(self, requests):
        return respond_each(requests, self._one, "prompt_table")
