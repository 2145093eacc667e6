"""Triton python model ``llm``: PROMPT_IDS [L] + EMBEDDINGS [T, H] (+ optional MAX_NEW_TOKENS) -> OUTPUT_IDS [N]
(eos not included).

Every request the dynamic batcher hands over joins ONE greedy decode: each row's audio frames
replace its prompt's placeholder, rows are left-padded, ``decoder.onnx`` runs one step per token
for the whole batch with a KV cache, and each row stops at eos or its own budget.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import OnnxDecoder
from canary_qwen.bounds import RequestBounds
from canary_qwen.decoding import check_prompt_ids, splice_and_pad
from canary_qwen.export.manifest import read_manifest
from canary_qwen.serving.checks import (
    InputError,
    check_embeddings,
    model_parameters,
    pad_ids,
    read_budgets,
)


class TritonPythonModel:
    def initialize(self, args):
        _, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        info = manifest.model
        self.info = info
        self.decoder = OnnxDecoder(
            manifest.onnx_graph("decoder"),
            info,
            params.get("device", "cpu"),
            int(params.get("ort_threads", "0") or 0),
            arena=False,  # a long-running server (onnx_runtime.session)
        )
        self.embed_table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
        self.bounds = RequestBounds.from_parameters(params)
        self.logger = pb_utils.Logger

    def _read(self, request):
        """One request -> (prompt id rows, embedding rows, budgets), or InputError."""
        embeds = check_embeddings(
            pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy(), self.info["hidden_size"]
        )
        ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        if len(ids) != len(embeds):
            raise InputError(f"PROMPT_IDS has {len(ids)} rows but EMBEDDINGS has {len(embeds)}")
        prompts = [check_prompt_ids(row, self.info["placeholder_id"], len(self.embed_table)) for row in ids]
        budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        budgets = read_budgets(None if budget is None else budget.as_numpy(), len(embeds), self.bounds)
        return prompts, list(embeds), budgets

    def execute(self, requests):
        responses = [None] * len(requests)
        prompts, embeds, budgets, owners = [], [], [], []
        for i, request in enumerate(requests):
            try:
                p, e, b = self._read(request)
            except InputError as err:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
                continue
            prompts += p
            embeds += e
            budgets += b
            owners += [i] * len(e)
        if not prompts:
            return responses
        try:
            x, valid = splice_and_pad(prompts, embeds, self.embed_table.__getitem__, self.info["placeholder_id"])
            tokens = self.decoder.generate(self.embed_table, x, valid, budgets)
        except Exception as err:
            self.logger.log_error(f"llm: {traceback.format_exc()}")
            error = pb_utils.TritonError(f"llm decoding failed: {err}")
            return [r or pb_utils.InferenceResponse(error=error) for r in responses]
        for i in sorted(set(owners)):
            rows = [t for t, o in zip(tokens, owners) if o == i]
            responses[i] = pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT_IDS", pad_ids(rows, self.info["pad_id"]))]
            )
        return responses
