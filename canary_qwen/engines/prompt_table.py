"""Injecting audio embeddings into a TensorRT-LLM engine through its prompt-tuning table (pure numpy).

A TensorRT-LLM engine built with ``trtllm-build --max_prompt_embedding_table_size N`` looks up every
input id ``>= vocab_size`` in a per-request table instead of its word embeddings. Canary-Qwen's
prompt holds one ``<|audioplaceholder|>`` per clip; the protocol here replaces it by the clip's T
"fake" ids ``vocab_size .. vocab_size + T - 1`` and sends the clip's projected encoder frames [T, H]
as that request's table. Verified against NVIDIA/TensorRT-LLM sources of the TensorRT-engine flow
(1.x line; the 1.2.x release tags could not be fetched here, files read at the newest stored commits):

- ``tensorrt_llm/layers/embedding.py`` ``PromptTuningEmbedding.forward``: a token is a prompt token
  iff ``token > vocab_size - 1``; its row is ``token - vocab_size`` (+ ``task * task_vocab_size``,
  the slot the runtime gives each request). ``vocab_size`` is the model's (``pretrained_config.vocab_size``
  in the engine's ``config.json``; 151936 for Qwen3-1.7B), not the tokenizer length.
- ``cpp/tensorrt_llm/batch_manager/promptTuningBuffers.cpp``: each request's table is copied into
  slot ``batch_idx * (max_prompt_embedding_table_size / max_batch_size)``; a request with more rows
  than ``max_prompt_embedding_table_size / max_batch_size`` is refused ("Prompt vocab size ... is
  larger than max prompt vocab size"), the table dtype must equal the model dtype, and its row count
  is the request's prompt vocab size (the executor derives it from the table; Triton's
  ``prompt_vocab_size`` input is "unused by executor").
- ``prompt_table_extra_ids`` (executor ``PromptTuningConfig.input_token_extra_ids``, uint64): one value
  per input token. ``cpp/include/tensorrt_llm/batch_manager/llmRequest.h`` pairs token i with extra id i
  into a ``UniqueToken{tokenId, tokenExtraId}`` and the KV-cache block hash (batch manager
  ``BlockKeyHasher``) mixes both, so two clips whose fake ids are equal (every clip starts at
  ``vocab_size``) only share cached blocks when their extra ids are equal too. The length must equal
  the input length: the executor throws otherwise, and Triton's C++ backend
  (``triton_backend/inflight_batcher_llm/src/utils.cc`` ``getPromptTuningConfigFromTensors``) silently
  drops extra ids of the wrong length. With ``enable_kv_cache_reuse`` and a prompt table the executor
  requires them ("Input token extra ids must be provided when enabling kv cache reuse with prompt table").
  The reference layout (``triton_backend/all_models/inflight_batcher_llm/preprocessing/1/model.py``) is
  ``where(input_id >= vocab_size, prompt_table_extra_id, 0)``; docs/multimodal.md: "a unique identifier
  representing the image (or prompt table), the same image uses the same id ... uint64, and the minimum
  value is 1". Here the id is, by default, a 64-bit hash of the table's bytes: equal clips may reuse
  each other's blocks, different clips never collide in practice; text positions keep 0 so the shared
  text prefix is reused across all requests.
- Layout: engines are built with ``remove_input_padding`` (the default), so requests are never padded:
  each request is its own 1-D id list (``ModelRunnerCpp.generate`` takes ``List[Tensor]``, Triton's
  ``input_ids`` is ``allow_ragged_batch``); :func:`pack_batch` gives the concatenated form.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

QWEN3_VOCAB_SIZE = 151936  # Qwen3-1.7B config vocab_size (the embedding rows), > tokenizer length 151670
INT32_MAX = np.iinfo(np.int32).max
UINT64_MAX = np.iinfo(np.uint64).max

_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


class PromptTableError(ValueError):
    """A prompt-table request that TensorRT-LLM would refuse or, worse, silently mis-read."""


def resolve_dtype(dtype) -> np.dtype:
    """A numpy dtype from a name ("bfloat16", "bf16", "float16", "float32", ...) or a numpy/ml_dtypes dtype.

    bfloat16 is ``ml_dtypes.bfloat16`` (the numpy extension type TensorRT-LLM and ONNX use).
    """
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower())
        if name is None:
            raise PromptTableError(f"unknown table dtype {dtype!r} (bfloat16, float16 or float32)")
        if name == "bfloat16":
            try:
                import ml_dtypes
            except ImportError as e:  # pragma: no cover - ml_dtypes comes with onnx
                raise PromptTableError("a bfloat16 table needs the ml_dtypes package (pip install ml_dtypes)") from e
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)
    return np.dtype(dtype)


def fake_ids(vocab_size: int, num_rows: int) -> np.ndarray:
    """The ids that address rows 0..num_rows-1 of a request's table: vocab_size .. vocab_size+num_rows-1 (int32)."""
    if num_rows < 1:
        raise PromptTableError(f"a prompt table needs at least one row, got {num_rows}")
    if vocab_size < 1 or vocab_size + num_rows - 1 > INT32_MAX:
        raise PromptTableError(f"fake ids {vocab_size}..{vocab_size + num_rows - 1} do not fit TensorRT-LLM's int32 token ids")
    return np.arange(vocab_size, vocab_size + num_rows, dtype=np.int32)


def expand_placeholder(prompt_ids: Sequence[int], placeholder_id: int, num_frames: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """Replace the one ``placeholder_id`` in ``prompt_ids`` by ``num_frames`` fake ids.

    Returns (input_ids int32 [len(prompt_ids) - 1 + num_frames], offset of the first fake id).
    """
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) and ids.size:
        raise PromptTableError(f"prompt ids must be a 1-D list of integers, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    where = np.flatnonzero(ids == placeholder_id)
    if len(where) != 1:
        raise PromptTableError(
            f"the prompt must hold exactly one audio placeholder (id {placeholder_id}) per clip, found {len(where)}"
        )
    text = np.delete(ids, where)
    bad = text[(text < 0) | (text >= vocab_size)]
    if bad.size:
        raise PromptTableError(
            f"prompt ids {sorted(set(bad.tolist()))[:5]} are not text tokens of a vocabulary of {vocab_size}: "
            "ids >= vocab_size are read from the prompt table"
        )
    at = int(where[0])
    out = np.concatenate((ids[:at], fake_ids(vocab_size, num_frames), ids[at + 1 :])).astype(np.int32)
    return out, at


def extra_ids_for(input_ids: np.ndarray, vocab_size: int, extra_id: int) -> np.ndarray:
    """``prompt_table_extra_ids``: ``extra_id`` where the token is a fake id (>= vocab_size), 0 elsewhere (uint64)."""
    check_extra_id(extra_id)
    ids = np.asarray(input_ids)
    return np.where(ids >= vocab_size, np.uint64(extra_id), np.uint64(0)).astype(np.uint64)


def check_extra_id(extra_id) -> int:
    value = int(extra_id)
    if not 1 <= value <= UINT64_MAX:
        raise PromptTableError(f"a prompt-table extra id is a uint64 >= 1 (0 means 'text token'), got {extra_id}")
    return value


def content_extra_id(table: np.ndarray) -> int:
    """A uint64 >= 1 that identifies the table's content (dtype, shape and bytes; blake2b, 8 bytes)."""
    table = np.ascontiguousarray(table)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{table.dtype.name}{table.shape}".encode())
    digest.update(table.tobytes())
    return int.from_bytes(digest.digest(), "little") or 1


@dataclass(frozen=True)
class PromptTableRequest:
    """One request in the engine's terms (the names are the Triton ``tensorrt_llm`` model's inputs)."""

    input_ids: np.ndarray  # int32 [L]: the prompt with the placeholder replaced by fake ids
    prompt_embedding_table: np.ndarray  # [T, H] in the model dtype: row t is fake id vocab_size + t
    prompt_vocab_size: int  # T
    prompt_table_extra_ids: np.ndarray  # uint64 [L]: extra_id at the fake ids, 0 at text tokens
    extra_id: int  # the clip's id (>= 1)
    audio_offset: int  # index of the first fake id in input_ids

    @property
    def input_length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.prompt_embedding_table.shape[1])

    def validate(self, vocab_size: int, **limits) -> None:
        """:func:`validate_request` on this request (``limits``: hidden_size, dtype, max_prompt_vocab_size, ...)."""
        validate_request(self.input_ids, self.prompt_embedding_table, self.prompt_vocab_size,
                         self.prompt_table_extra_ids, vocab_size=vocab_size, **limits)


def build_request(
    prompt_ids: Sequence[int],
    embeddings: np.ndarray,
    *,
    placeholder_id: int,
    vocab_size: int = QWEN3_VOCAB_SIZE,
    dtype=None,
    extra_id: int | None = None,
) -> PromptTableRequest:
    """The request for one clip: ``embeddings`` [T, H] (projected encoder frames, T >= 1) become the table.

    ``dtype``: the engine's dtype for the table (default: keep ``embeddings``' dtype). ``extra_id``:
    default :func:`content_extra_id` of the (cast) table.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise PromptTableError(f"a clip's embeddings must be [T, H], got shape {emb.shape}")
    if emb.shape[0] < 1 or emb.shape[1] < 1:
        raise PromptTableError(f"a clip's embeddings need T >= 1 frames and H >= 1, got shape {emb.shape}")
    table = np.ascontiguousarray(emb, dtype=resolve_dtype(dtype) if dtype is not None else emb.dtype)
    input_ids, offset = expand_placeholder(prompt_ids, placeholder_id, table.shape[0], vocab_size)
    extra = content_extra_id(table) if extra_id is None else check_extra_id(extra_id)
    return PromptTableRequest(
        input_ids=input_ids,
        prompt_embedding_table=table,
        prompt_vocab_size=int(table.shape[0]),
        prompt_table_extra_ids=extra_ids_for(input_ids, vocab_size, extra),
        extra_id=extra,
        audio_offset=offset,
    )


def _per_request_prompts(prompt_ids, n: int) -> list:
    if len(prompt_ids) and isinstance(prompt_ids[0], (Sequence, np.ndarray)) and not isinstance(prompt_ids[0], str):
        if len(prompt_ids) != n:
            raise PromptTableError(f"{len(prompt_ids)} prompts for {n} clips")
        return list(prompt_ids)
    return [prompt_ids] * n


def build_batch(
    prompt_ids,
    embeddings: Sequence[np.ndarray],
    *,
    placeholder_id: int,
    vocab_size: int = QWEN3_VOCAB_SIZE,
    dtype=None,
    extra_ids: Sequence[int] | None = None,
) -> list[PromptTableRequest]:
    """One request (one table) per clip. ``prompt_ids``: one prompt for every clip, or one per clip.

    Requests whose tables differ never share an extra id (that would let KV-cache reuse serve one
    clip's cached blocks to another); equal tables may.
    """
    embeddings = list(embeddings)
    if not embeddings:
        return []
    prompts = _per_request_prompts(prompt_ids, len(embeddings))
    if extra_ids is not None and len(extra_ids) != len(embeddings):
        raise PromptTableError(f"{len(extra_ids)} extra ids for {len(embeddings)} clips")
    requests = [
        build_request(p, e, placeholder_id=placeholder_id, vocab_size=vocab_size, dtype=dtype,
                      extra_id=None if extra_ids is None else extra_ids[i])
        for i, (p, e) in enumerate(zip(prompts, embeddings))
    ]
    check_distinct_extra_ids(requests)
    return requests


def check_distinct_extra_ids(requests: Sequence[PromptTableRequest]) -> None:
    """Raise if two requests carry the same extra id for different tables."""
    seen: dict[int, int] = {}
    for i, r in enumerate(requests):
        j = seen.setdefault(r.extra_id, i)
        if j != i:
            a, b = requests[j].prompt_embedding_table, r.prompt_embedding_table
            if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b):
                raise PromptTableError(
                    f"requests {j} and {i} use extra id {r.extra_id} for different audio: KV-cache reuse would mix them"
                )


@dataclass(frozen=True)
class PackedBatch:
    """A batch in the remove_input_padding layout: requests concatenated, no padding tokens."""

    input_ids: np.ndarray  # int32 [sum L]
    input_lengths: np.ndarray  # int32 [B]
    offsets: np.ndarray  # int64 [B + 1]: request i is input_ids[offsets[i]:offsets[i + 1]]
    prompt_table_extra_ids: np.ndarray  # uint64 [sum L]
    prompt_vocab_sizes: np.ndarray  # int32 [B]

    def request_ids(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]]


def pack_batch(requests: Sequence[PromptTableRequest]) -> PackedBatch:
    lengths = np.array([r.input_length for r in requests], dtype=np.int32)
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    empty_i32, empty_u64 = np.zeros(0, np.int32), np.zeros(0, np.uint64)
    return PackedBatch(
        input_ids=np.concatenate([r.input_ids for r in requests]) if requests else empty_i32,
        input_lengths=lengths,
        offsets=offsets,
        prompt_table_extra_ids=np.concatenate([r.prompt_table_extra_ids for r in requests]) if requests else empty_u64,
        prompt_vocab_sizes=np.array([r.prompt_vocab_size for r in requests], dtype=np.int32),
    )


def stack_tables(requests: Sequence[PromptTableRequest]) -> tuple[np.ndarray, str]:
    """(tables [B, max T, H] zero-padded, prompt_tasks "0,1,...") for ``ModelRunnerCpp.generate(prompt_table=,
    prompt_tasks=)``, which hands request i ``prompt_table[i]``. Padded rows are never addressed (request i's
    fake ids stop at vocab_size + T_i - 1), but every request then counts max T rows against the engine's
    per-request limit."""
    if not requests:
        raise PromptTableError("no requests to stack")
    hidden = {r.hidden_size for r in requests}
    dtypes = {r.prompt_embedding_table.dtype for r in requests}
    if len(hidden) != 1 or len(dtypes) != 1:
        raise PromptTableError(f"tables differ in hidden size {sorted(hidden)} or dtype {sorted(map(str, dtypes))}")
    rows = max(r.prompt_vocab_size for r in requests)
    out = np.zeros((len(requests), rows, hidden.pop()), dtype=dtypes.pop())
    for i, r in enumerate(requests):
        out[i, : r.prompt_vocab_size] = r.prompt_embedding_table
    return out, ",".join(str(i) for i in range(len(requests)))


def validate_request(
    input_ids,
    prompt_embedding_table,
    prompt_vocab_size: int,
    prompt_table_extra_ids=None,
    *,
    vocab_size: int,
    hidden_size: int | None = None,
    dtype=None,
    max_prompt_vocab_size: int | None = None,
    require_extra_ids: bool = False,
) -> None:
    """Check one request the way the engine will read it; raise :class:`PromptTableError` naming the problem.

    ``max_prompt_vocab_size``: the engine's per-request limit,
    ``max_prompt_embedding_table_size // max_batch_size``. ``require_extra_ids``: the engine runs with
    KV-cache block reuse (then the executor demands extra ids with every prompt table).
    A table with a leading batch dimension of 1 ([1, T, H], as Triton sends it) is accepted.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise PromptTableError(f"input_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    table = np.asarray(prompt_embedding_table)
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    if table.ndim != 2:
        raise PromptTableError(f"prompt_embedding_table must be [T, H] (or [1, T, H]), got shape {table.shape}")
    rows, hidden = table.shape
    if int(prompt_vocab_size) != rows:
        raise PromptTableError(
            f"prompt_embedding_table has {rows} rows but prompt_vocab_size is {int(prompt_vocab_size)}: "
            "they must be equal (the table row count is the request's prompt vocab size)"
        )
    if rows < 1:
        raise PromptTableError("prompt_embedding_table has no rows")
    if hidden_size is not None and hidden != hidden_size:
        raise PromptTableError(f"prompt_embedding_table rows have {hidden} values, the model's hidden size is {hidden_size}")
    if dtype is not None and table.dtype != resolve_dtype(dtype):
        raise PromptTableError(
            f"prompt_embedding_table is {table.dtype}, the engine's dtype is {resolve_dtype(dtype)}: "
            "TensorRT-LLM requires the table in the model dtype"
        )
    if max_prompt_vocab_size is not None and rows > max_prompt_vocab_size:
        raise PromptTableError(
            f"{rows} table rows exceed the engine's per-request limit of {max_prompt_vocab_size} "
            "(max_prompt_embedding_table_size / max_batch_size): cut the audio or rebuild the engine"
        )
    ids64 = ids.astype(np.int64)
    if (ids64 < 0).any():
        raise PromptTableError(f"negative input ids at positions {np.flatnonzero(ids64 < 0)[:5].tolist()}")
    fake = ids64 >= vocab_size
    beyond = np.flatnonzero(ids64 >= vocab_size + rows)
    if beyond.size:
        raise PromptTableError(
            f"fake ids {ids64[beyond][:5].tolist()} at positions {beyond[:5].tolist()} are out of range: "
            f"this table serves ids {vocab_size}..{vocab_size + rows - 1}"
        )
    if prompt_table_extra_ids is None:
        if require_extra_ids and fake.any():
            raise PromptTableError(
                "prompt_table_extra_ids are missing: with KV-cache reuse TensorRT-LLM requires them for every prompt table"
            )
        return
    extra = np.asarray(prompt_table_extra_ids)
    if extra.ndim == 2 and extra.shape[0] == 1:
        extra = extra[0]
    if extra.shape != ids.shape:
        raise PromptTableError(
            f"prompt_table_extra_ids has shape {extra.shape}, input_ids {ids.shape}: one extra id per input token "
            "(Triton's backend silently ignores extra ids of another length)"
        )
    if not np.issubdtype(extra.dtype, np.integer) or (extra.astype(np.float64) < 0).any():
        raise PromptTableError(f"prompt_table_extra_ids must be non-negative integers (uint64), got dtype {extra.dtype}")
    unmarked = np.flatnonzero(fake & (extra.astype(np.uint64) == 0))
    if unmarked.size:
        raise PromptTableError(
            f"fake ids at positions {unmarked[:5].tolist()} have extra id 0: every audio frame needs its clip's id (>= 1), "
            "or KV-cache reuse can serve another clip's cached blocks"
        )


# -- Triton ----------------------------------------------------------------------------------------------
# The tensorrt_llm model's inputs this protocol fills, with their config.pbtxt dtypes (numpy side).
TRITON_INPUT_DTYPES = {
    "input_ids": np.int32,
    "input_lengths": np.int32,
    "request_output_len": np.int32,
    "end_id": np.int32,
    "pad_id": np.int32,
    "streaming": np.bool_,
    "prompt_embedding_table": None,  # the model dtype (config: ${prompt_embedding_table_data_type})
    "prompt_vocab_size": np.int32,
    "prompt_table_extra_ids": np.uint64,
}


def triton_request_inputs(
    request: PromptTableRequest, *, max_new_tokens: int, end_id: int, pad_id: int, streaming: bool | None = None
) -> dict[str, np.ndarray]:
    """One inference request to the Triton ``tensorrt_llm`` model (batch dimension 1), by input name."""
    scalar = lambda v, t: np.array([[v]], dtype=t)  # noqa: E731 - dims [1] with a batch dimension
    inputs = {
        "input_ids": request.input_ids.astype(np.int32)[None],
        "input_lengths": scalar(request.input_length, np.int32),
        "request_output_len": scalar(max_new_tokens, np.int32),
        "end_id": scalar(end_id, np.int32),
        "pad_id": scalar(pad_id, np.int32),
        "prompt_embedding_table": request.prompt_embedding_table[None],
        "prompt_vocab_size": scalar(request.prompt_vocab_size, np.int32),
        "prompt_table_extra_ids": request.prompt_table_extra_ids.astype(np.uint64)[None],
    }
    if streaming is not None:
        inputs["streaming"] = scalar(bool(streaming), np.bool_)
    return inputs
