"""Triton python model ``llm`` (and ``llm_stream``, the same file with a decoupled config).

PROMPT_IDS [L] + EMBEDDINGS [T, H] (+ optional MAX_NEW_TOKENS) -> OUTPUT_IDS [N] (eos not included).
Every request the dynamic batcher hands over joins ONE greedy decode: each row's audio frames
replace its prompt's placeholder, rows are left-padded, ``decoder.onnx`` runs one step per token
for the whole batch with a KV cache, and each row stops at eos or its own budget.

Decoupled (``llm_stream``): every new token of a row is sent as soon as the step produced it
(OUTPUT_IDS [1, 1]), and the row's request is closed with an empty final response the moment
the row is done, while the other rows go on.
"""

import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from canary_qwen.backends.onnx_runtime import OnnxDecoder
from canary_qwen.decoding import splice_and_pad
from canary_qwen.export.manifest import read_manifest
from canary_qwen.serving.checks import (
    DEFAULT_MAX_NEW_TOKENS,
    InputError,
    check_embeddings,
    check_prompt_ids,
    model_parameters,
    pad_ids,
    read_budgets,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config, params, version_dir = model_parameters(args)
        manifest = read_manifest(version_dir)
        info = manifest.model
        self.info = info
        self.decoder = OnnxDecoder(
            manifest.onnx_graph("decoder"), info, params.get("device", "cpu"), int(params.get("ort_threads", "0") or 0)
        )
        self.embed_table = np.load(manifest.artifact("embed_tokens"), mmap_mode="r")
        self.default_budget = int(params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.name = args["model_name"]
        self.logger = pb_utils.Logger

    def _read(self, request):
        """One request -> (prompt id rows, embedding rows, budgets), or InputError."""
        embeds = check_embeddings(
            pb_utils.get_input_tensor_by_name(request, "EMBEDDINGS").as_numpy(), self.info["hidden_size"]
        )
        ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        if self.decoupled and len(embeds) != 1:
            raise InputError(f"{self.name} streams one clip per request; got a batch of {len(embeds)}")
        if len(ids) != len(embeds):
            raise InputError(f"PROMPT_IDS has {len(ids)} rows but EMBEDDINGS has {len(embeds)}")
        prompts = [check_prompt_ids(row, self.info["placeholder_id"], len(self.embed_table)) for row in ids]
        budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        budgets = read_budgets(None if budget is None else budget.as_numpy(), len(embeds), self.default_budget)
        return prompts, list(embeds), budgets

    def execute(self, requests):
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        closed = [False] * len(requests)  # decoupled: requests whose final response went out
        responses = [None] * len(requests)

        def fail(i, message):
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            if senders:
                if not closed[i]:
                    closed[i] = True
                    senders[i].send(response, flags=FINAL)
            else:
                responses[i] = response

        prompts, embeds, budgets, owners = [], [], [], []
        for i, request in enumerate(requests):
            try:
                p, e, b = self._read(request)
            except InputError as err:
                fail(i, str(err))
                continue
            prompts += p
            embeds += e
            budgets += b
            owners += [i] * len(e)
        if prompts:
            try:
                tokens = self._generate(prompts, embeds, budgets, owners, senders, closed)
            except Exception as err:
                self.logger.log_error(f"llm: {traceback.format_exc()}")
                for i in sorted(set(owners)):
                    fail(i, f"llm decoding failed: {err}")
                return None if senders else responses
            if senders:  # every row ended inside the decode; this only guards against a request left open
                for i in sorted(set(owners)):
                    if not closed[i]:
                        closed[i] = True
                        senders[i].send(flags=FINAL)
            else:
                pad = self.info["pad_id"]
                for i in sorted(set(owners)):
                    rows = [t for t, o in zip(tokens, owners) if o == i]
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT_IDS", pad_ids(rows, pad))])
        return None if senders else responses

    def _generate(self, prompts, embeds, budgets, owners, senders, closed):
        x, valid = splice_and_pad(prompts, embeds, self.embed_table.__getitem__, self.info["placeholder_id"])
        on_token = None
        if senders:
            # Streaming, one row per request (checked in _read): each kept token goes out at once, the
            # request is closed the moment the decoding core says its row ended.
            def send(row, response=None, flags=0):
                try:
                    senders[owners[row]].send(response, flags=flags)
                except Exception as err:  # e.g. the caller went away: stop sending to it, keep the batch going
                    closed[owners[row]] = True
                    self.logger.log_warn(f"llm_stream: dropping a row: {err}")

            def on_token(row, token, finished):
                if closed[owners[row]]:
                    return
                if token is not None:
                    out = pb_utils.Tensor("OUTPUT_IDS", np.array([[token]], dtype=np.int64))
                    send(row, pb_utils.InferenceResponse([out]))
                if finished:
                    send(row, flags=FINAL)
                    closed[owners[row]] = True

        return self.decoder.generate(self.embed_table, x, valid, budgets, on_token=on_token)
