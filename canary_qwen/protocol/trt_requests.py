"""What the trt flavour's python models do to tensors, without any Triton import (unit-testable here).

``prompt_table`` turns the encoder's frames into a ``tensorrt_llm`` request with the prompt-table
protocol (``canary_qwen.protocol.prompt_table``); ``postprocessing`` reads ``tensorrt_llm``'s
``output_ids`` / ``sequence_length`` back into token lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..decoding import check_prompt_ids, until_eos
from ..errors import InputError
from ..protocol import prompt_table


def tensorrt_llm_inputs(
    prompt_ids: np.ndarray,
    embeddings: np.ndarray,
    lengths: np.ndarray,
    budgets: Sequence[int],
    *,
    placeholder_id: int,
    vocab_size: int,
    table_dtype: str,
    end_id: int,
    pad_id: int,
    streaming: bool = False,
) -> dict[str, np.ndarray]:
    """One clip's ``tensorrt_llm`` request (batch dimension 1), by input name.

    ``prompt_ids`` [1, L] (one placeholder), ``embeddings`` [1, T, H] (the encoder's frames, any float dtype),
    ``lengths`` [1] valid frames, ``budgets`` [new tokens]. One row only: ``tensorrt_llm`` answers each row of a
    request as a response of its own, untagged (decoupled), or refuses the request (not decoupled).
    """
    if len(budgets) != 1:
        raise InputError(f"one clip per request, got {len(budgets)} rows: send each clip as its own request")
    ids = np.asarray(prompt_ids).reshape(-1)
    frames = np.asarray(embeddings)
    frames = frames.reshape(-1, *frames.shape[-2:])[0]
    check_prompt_ids(ids, placeholder_id, vocab_size)
    try:
        request = prompt_table.build_request(
            ids.tolist(),
            frames[: int(np.asarray(lengths).reshape(-1)[0])].astype(np.float32),
            placeholder_id=placeholder_id,
            vocab_size=vocab_size,
            dtype=table_dtype,
        )
    except prompt_table.PromptTableError as e:
        raise InputError(str(e)) from None
    return prompt_table.triton_request_inputs(
        request, max_new_tokens=budgets[0], end_id=end_id, pad_id=pad_id, streaming=streaming
    )


def generated_rows(output_ids: np.ndarray, sequence_length: np.ndarray | None, end_id: int) -> list[list[int]]:
    """``tensorrt_llm`` outputs (``output_ids`` [B, beams, N], ``sequence_length`` [B, beams]; the model runs
    with exclude_input_in_output) -> the new tokens of beam 0 per row, cut at ``end_id`` as NeMo's are."""
    ids = np.asarray(output_ids)
    ids = ids.reshape(ids.shape[0], -1, ids.shape[-1])[:, 0]
    if sequence_length is None:
        counts = [ids.shape[1]] * len(ids)
    else:
        counts = [int(n) for n in np.asarray(sequence_length).reshape(len(ids), -1)[:, 0]]
    return [until_eos(row[:n], end_id) for row, n in zip(ids, counts)]
