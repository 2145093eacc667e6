"""The client's second mode: send audio embeddings straight to the server's LLM model.

The clip's projected encoder frames come from the server's ``encoder`` model or a local ONNX Runtime
encoder; the prompt is tokenized here (from the export's tokenizer). Then, by flavour:

- onnx: the ``llm`` model takes PROMPT_IDS with the audio placeholder
  + EMBEDDINGS [T, H] -> OUTPUT_IDS.
- trt: the ``tensorrt_llm`` model takes the prompt with the placeholder replaced by T fake ids
  (``vocab_size .. vocab_size + T - 1``) + the frames as ``prompt_embedding_table`` in the engine's
  dtype, ``prompt_vocab_size`` and per-token ``prompt_table_extra_ids`` (``canary_qwen.protocol.prompt_table``)
  -> output_ids / sequence_length. A decoupled ``tensorrt_llm`` is driven over gRPC streaming.

So one client drives either flavour without the ensemble, e.g. to put a different encoder in front.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends.base import Transcription
from ..decoding import until_eos
from ..defaults import MAX_NEW_TOKENS
from ..export.manifest import ENGINE_BUILD, read_manifest
from ..export.tensorrt.encoder_engine import pad_to_min_samples
from ..model.prompt import prompt_ids
from ..model.tokenizer import QwenTokenizer
from ..precision import Precision
from ..protocol import prompt_table
from ..protocol.trt_requests import generated_rows
from .errors import ModelNotReadyError
from .triton import TritonClient
from .wire import as_samples

LLM_MODELS = ("tensorrt_llm", "llm")  # looked for in this order


def trtllm_request_arrays(
    prompt: Sequence[int],
    embeddings: np.ndarray,
    *,
    placeholder_id: int,
    end_id: int,
    pad_id: int,
    vocab_size: int,
    table_dtype: str = "bfloat16",
    max_new_tokens: int = MAX_NEW_TOKENS,
    streaming: bool | None = None,
) -> tuple[dict[str, np.ndarray], prompt_table.PromptTableRequest]:
    """The trt flavour's ``tensorrt_llm`` inputs for one clip (batch dimension 1), and the request they encode.
    ``vocab_size``: the engine's (the LLM config's ``vocab_size``, 151936 for Qwen3-1.7B)."""
    request = prompt_table.build_request(
        prompt, embeddings, placeholder_id=placeholder_id, vocab_size=vocab_size, dtype=table_dtype
    )
    arrays = prompt_table.triton_request_inputs(
        request, max_new_tokens=max_new_tokens, end_id=end_id, pad_id=pad_id, streaming=streaming
    )
    return arrays, request


def onnx_llm_arrays(prompt: Sequence[int], embeddings: np.ndarray, max_new_tokens: int) -> dict[str, np.ndarray]:
    """The onnx flavour's ``llm`` inputs for one clip (batch dimension 1)."""
    return {
        "PROMPT_IDS": np.asarray([prompt], dtype=np.int64),
        "EMBEDDINGS": np.asarray(embeddings, dtype=np.float32)[None],
        "MAX_NEW_TOKENS": np.array([[max_new_tokens]], dtype=np.int32),
    }


class EmbeddingsClient:
    """Transcribe through the server's LLM model with embeddings computed first (see the module's docstring).

    ``export_dir``: the export the server's repository was made from (tokenizer and token ids).
    ``local_encoder``: compute the embeddings here with ONNX Runtime instead of the server's encoder.
    ``llm_model``: default the first of tensorrt_llm, llm the server has ready.
    """

    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        *,
        export_dir,
        local_encoder: bool = False,
        encoder_model: str = "encoder",
        llm_model: str | None = None,
        timeout_s: float = 120.0,
    ):
        manifest = read_manifest(export_dir)
        self.info = manifest.model
        # a TensorRT encoder plan refuses clips under its profile minimum (which build-engines records)
        self.min_samples = int(manifest.data.get(ENGINE_BUILD, {}).get("encoder_profile", {}).get("min_samples", 0))
        self.tokenizer = QwenTokenizer(manifest.artifact("tokenizer"), self.info["audio_locator_tag"])
        self.client = TritonClient(url, protocol, timeout_s=timeout_s)
        try:
            self.local_encoder = None
            if local_encoder:
                from ..backends.onnx_runtime import OnnxEncoder

                self.local_encoder = OnnxEncoder(manifest.onnx_graph("encoder"))
            self.encoder_model = encoder_model
            self._plan_encoder: bool | None = None  # read from the server's encoder config on first use
            self.llm_model = llm_model or self._find_llm()
            config = self.client.model_config(self.llm_model)
            self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
            inputs = {i["name"]: i["data_type"] for i in config.get("input", [])}
            self.trt = "prompt_embedding_table" in inputs
            self.table_dtype = Precision.parse_float(inputs.get("prompt_embedding_table", "TYPE_BF16")).long_name
        except BaseException:
            self.client.close()
            raise

    def _find_llm(self) -> str:
        for name in LLM_MODELS:
            try:
                self.client.check(name)
                return name
            except ModelNotReadyError:
                continue
        raise ModelNotReadyError(
            f"the server at {self.client.url} has none of {', '.join(LLM_MODELS)} ready", self.client.url
        )

    def embed(self, audio) -> np.ndarray:
        """One clip's projected encoder frames [T, H] (float32)."""
        samples = as_samples(audio)
        if self.local_encoder is not None:
            return self.local_encoder([samples])[0]
        if self._plan_encoder is None:  # the TensorRT plan takes audio_lengths too
            inputs = self.client.model_config(self.encoder_model).get("input", [])
            self._plan_encoder = any(i["name"] == "audio_lengths" for i in inputs)
        if self._plan_encoder:
            out = self.client.call(
                self.encoder_model,
                {
                    "audio": pad_to_min_samples(samples[None], self.min_samples),
                    "audio_lengths": np.array([[len(samples)]], dtype=np.int64),
                },
                ["embeddings", "embedding_lengths"],
            )
            return np.asarray(out["embeddings"][0, : int(out["embedding_lengths"].reshape(-1)[0])], dtype=np.float32)
        return self.client.call(self.encoder_model, {"AUDIO": samples[None]}, ["EMBEDDINGS"])["EMBEDDINGS"][0]

    def generate(
        self, embeddings: np.ndarray, prompt: str | None = None, *, max_new_tokens: int = MAX_NEW_TOKENS
    ) -> list[int]:
        """Greedy token ids (eos not included) for one clip's embeddings [T, H]."""
        ids = prompt_ids(self.tokenizer, prompt)
        info = self.info
        if self.trt:
            arrays, _ = trtllm_request_arrays(
                ids,
                embeddings,
                placeholder_id=info["placeholder_id"],
                end_id=info["eos_id"],
                pad_id=info["pad_id"],
                vocab_size=info["vocab_size"],
                table_dtype=self.table_dtype,
                max_new_tokens=max_new_tokens,
            )
            outputs = ["output_ids", "sequence_length"]
        else:
            arrays, outputs = onnx_llm_arrays(ids, embeddings, max_new_tokens), ["OUTPUT_IDS"]
        if not self.decoupled:
            out = self.client.call(self.llm_model, arrays, outputs)
            if self.trt:
                return generated_rows(out["output_ids"], out["sequence_length"], info["eos_id"])[0]
            return [int(t) for t in out["OUTPUT_IDS"].reshape(-1)]
        tokens: list[int] = []  # decoupled: the new tokens arrive over one or more responses
        for result in self.client.stream_results(self.llm_model, arrays):
            if result.as_numpy(outputs[0]) is None:  # the empty final response
                continue
            if self.trt:
                tokens += generated_rows(
                    result.as_numpy("output_ids"), result.as_numpy("sequence_length"), info["eos_id"]
                )[0]
            else:
                tokens += [int(t) for t in result.as_numpy("OUTPUT_IDS").reshape(-1)]
        return until_eos(tokens, info["eos_id"])

    def transcribe(self, audio, prompt: str | None = None, *, max_new_tokens: int = MAX_NEW_TOKENS) -> Transcription:
        tokens = self.generate(self.embed(audio), prompt, max_new_tokens=max_new_tokens)
        return Transcription(text=self.tokenizer.decode(tokens).strip(), token_ids=tokens)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EmbeddingsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
