"""Audio embeddings into a TensorRT-LLM engine through its prompt-tuning table (pure numpy).

The clip's placeholder becomes T "fake" ids ``vocab_size .. vocab_size + T - 1``, its projected encoder
frames [T, H] the request's table, and every fake id carries the clip's extra id so KV-cache reuse never
mixes clips. docs/tensorrt-llm.md gives the TensorRT-LLM sources each rule was read from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, UsageError
from ..precision import Precision

QWEN3_VOCAB_SIZE = 151936  # Qwen3-1.7B config vocab_size (the embedding rows), > tokenizer length 151670
INT32_MAX = np.iinfo(np.int32).max
UINT64_MAX = np.iinfo(np.uint64).max


class PromptTableError(InputError):
    """A prompt-table request that TensorRT-LLM would refuse or, worse, silently mis-read."""


def resolve_dtype(dtype) -> np.dtype:
    """A numpy dtype from a name ("bfloat16", "bf16", "float16", "float32", ...) or a numpy/ml_dtypes dtype.

    bfloat16 is ``ml_dtypes.bfloat16`` (the numpy extension type TensorRT-LLM and ONNX use).
    """
    if isinstance(dtype, str):
        try:
            return Precision.parse_float(dtype).numpy_dtype
        except UsageError:
            raise PromptTableError(f"unknown table dtype {dtype!r} (bfloat16, float16 or float32)") from None
    return np.dtype(dtype)


def fake_ids(vocab_size: int, num_rows: int) -> np.ndarray:
    """The ids that address rows 0..num_rows-1 of a request's table: vocab_size .. vocab_size+num_rows-1 (int32)."""
    if num_rows < 1:
        raise PromptTableError(f"a prompt table needs at least one row, got {num_rows}")
    if vocab_size < 1 or vocab_size + num_rows - 1 > INT32_MAX:
        raise PromptTableError(
            f"fake ids {vocab_size}..{vocab_size + num_rows - 1} do not fit TensorRT-LLM's int32 token ids"
        )
    return np.arange(vocab_size, vocab_size + num_rows, dtype=np.int32)


def expand_placeholder(
    prompt_ids: Sequence[int], placeholder_id: int, num_frames: int, vocab_size: int
) -> tuple[np.ndarray, int]:
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
        validate_request(
            self.input_ids,
            self.prompt_embedding_table,
            self.prompt_vocab_size,
            self.prompt_table_extra_ids,
            vocab_size=vocab_size,
            **limits,
        )


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
        raise PromptTableError(
            f"input_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}"
        )
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
        raise PromptTableError(
            f"prompt_embedding_table rows have {hidden} values, the model's hidden size is {hidden_size}"
        )
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
        raise PromptTableError(
            f"prompt_table_extra_ids must be non-negative integers (uint64), got dtype {extra.dtype}"
        )
    unmarked = np.flatnonzero(fake & (extra.astype(np.uint64) == 0))
    if unmarked.size:
        raise PromptTableError(
            f"fake ids at positions {unmarked[:5].tolist()} have extra id 0: every audio frame needs its clip's id (>= 1), "
            "or KV-cache reuse can serve another clip's cached blocks"
        )


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
