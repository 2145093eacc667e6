"""What the onnx flavour's python-backend models share, without any Triton import (so it is unit-testable).

Input checks that give one clear sentence per bad request, padding of generated ids, and the
incremental detokenizer the streaming model uses (the ONNX Runtime sessions and the prompt splicing
are ``canary_qwen.backends.onnx_runtime``' and ``canary_qwen.decoding``'). Nothing here imports torch: every python stub imports this,
and torch would cost each of them ~1 s and a few hundred MB.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..bounds import RequestBounds
from ..defaults import MAX_PROMPT_TOKENS, SAMPLE_RATE
from ..errors import InputError
from ..modes import ASR

MAX_PROMPT_BYTES = 64 * MAX_PROMPT_TOKENS  # refused before tokenizing: no 1,024-token prompt is this long
MIN_AUDIO_SAMPLES = 320  # 20 ms, as the command line refuses shorter clips
MAX_ABS_SAMPLE = 100.0  # float audio is in [-1, 1]; far beyond that is not audio (and overflows the mel frontend)


# -- reading request tensors ------------------------------------------------------------------------
def check_audio(audio: np.ndarray, max_audio_s: float, name: str = "AUDIO") -> np.ndarray:
    """Validate one request's ``AUDIO`` tensor ([B, S] or [S]) and return it as [B, S] float32."""
    audio = np.asarray(audio)
    if audio.dtype != np.float32:
        # Triton refuses other dtypes before the model sees them; this guards direct BLS callers.
        raise InputError(f"{name} must be float32 samples (16 kHz mono), got {audio.dtype}")
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise InputError(
            f"{name} must be [batch, samples] (one 16 kHz mono waveform per row), got shape {list(audio.shape)}"
        )
    if audio.shape[1] == 0:
        raise InputError(f"{name} is empty (0 samples): send at least one 16 kHz mono float32 sample")
    seconds = audio.shape[1] / SAMPLE_RATE
    if seconds > max_audio_s:
        raise InputError(
            f"{name} is {seconds:.1f} s long ({audio.shape[1]} samples at 16 kHz), over this server's "
            f"{max_audio_s:g} s limit; split it into shorter windows (canary_qwen.pipeline.windowing)"
        )
    finite = np.isfinite(audio)
    if not finite.all():
        bad = int(audio.size - np.count_nonzero(finite))
        raise InputError(f"{name} contains {bad} NaN/inf samples; send finite float32 values in [-1, 1]")
    peak = float(np.abs(audio).max())
    if peak > MAX_ABS_SAMPLE:
        raise InputError(f"{name} has samples up to {peak:g}; send float32 audio in [-1, 1] (not integer PCM values)")
    if audio.shape[1] < MIN_AUDIO_SAMPLES:
        raise InputError(
            f"{name} is {audio.shape[1]} samples long; send at least {MIN_AUDIO_SAMPLES} (20 ms at 16 kHz)"
        )
    return audio


def read_strings(values: np.ndarray | None, rows: int, name: str = "PROMPT") -> list[str | None]:
    """A BYTES tensor ([B, 1] or [1]) as one ``str`` per row; ``None`` (input absent) -> ``[None] * rows``."""
    if values is None:
        return [None] * rows
    flat = np.asarray(values, dtype=object).reshape(-1)
    if flat.size == 1 and rows > 1:
        flat = np.repeat(flat, rows)
    if flat.size != rows:
        raise InputError(f"{name} has {flat.size} values for {rows} audio rows (send one per row)")
    out: list[str | None] = []
    for v in flat:
        if isinstance(v, (bytes, np.bytes_)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{name} is not valid UTF-8 ({e})") from None
        out.append(str(v))
    return out


def read_budgets(
    values: np.ndarray | None, rows: int, bounds: RequestBounds, least: int = 1, mode: str = ASR
) -> list[int]:
    """``MAX_NEW_TOKENS`` ([B, 1] or [1], optional) as one budget per row: the bounds' default for ``mode``, or each
    in ``least``..that mode's limit."""
    if values is None:
        return [bounds.budget(None, mode=mode)] * rows
    flat = np.asarray(values).reshape(-1)
    if flat.size == 1 and rows > 1:
        flat = np.repeat(flat, rows)
    if flat.size != rows:
        raise InputError(f"MAX_NEW_TOKENS has {flat.size} values for {rows} rows")
    return [bounds.budget(int(v), mode=mode, least=least, name="MAX_NEW_TOKENS") for v in flat]


def encode_prompt(tokenizer, prompt: str | None) -> list[int]:
    """Prompt token ids with the one audio placeholder, or an InputError saying what is wrong."""
    from ..model.prompt import prompt_ids

    if prompt is not None and len(prompt.encode("utf-8", errors="replace")) > MAX_PROMPT_BYTES:
        raise InputError(f"PROMPT is {len(prompt)} characters long, far over the {MAX_PROMPT_TOKENS}-token limit")
    try:
        ids = prompt_ids(tokenizer, prompt)
    except ValueError as e:
        raise InputError(
            f"PROMPT: {e} (the audio goes where {tokenizer.audio_locator_tag} stands, or at the end)"
        ) from None
    if len(ids) > MAX_PROMPT_TOKENS:
        raise InputError(f"PROMPT is {len(ids)} tokens long, over the {MAX_PROMPT_TOKENS}-token limit")
    return ids


def read_dialogue(value: str) -> list:
    """A ``DIALOGUE`` string (JSON: a list of ``{"role", "content"}`` turns, ending with a user turn) as turns
    (``canary_qwen.model.prompt.Turn``), or an InputError saying what is wrong; roles and content are checked where
    the turns are tokenized (``dialogue_ids``)."""
    from ..model.prompt import Turn

    try:
        turns = json.loads(value)
    except ValueError as e:
        raise InputError(f"DIALOGUE is not JSON ({e}): send a list of {{role, content}} turns") from None
    if not isinstance(turns, list) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns
    ):
        raise InputError('DIALOGUE must be a JSON list of {"role": ..., "content": ...} turns (strings)')
    return [Turn(t["role"], t["content"]) for t in turns]


def check_embeddings(embeds: np.ndarray, hidden_size: int) -> np.ndarray:
    """One request's ``EMBEDDINGS`` as [B, T, H] float32."""
    embeds = np.asarray(embeds)
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[2] != hidden_size:
        raise InputError(f"EMBEDDINGS must be [batch, frames, {hidden_size}], got shape {list(embeds.shape)}")
    if not np.isfinite(embeds).all():
        raise InputError("EMBEDDINGS contain NaN/inf values")
    return embeds.astype(np.float32, copy=False)


# -- batching -----------------------------------------------------------------------------------------
def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """Token lists as one int64 [B, N] array, right-padded with ``pad_id`` (a special token: decoding skips it)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


# -- streaming text ---------------------------------------------------------------------------------------
class TextStream:
    """Turns token ids, one at a time, into text pieces whose concatenation is exactly
    ``tokenizer.decode(ids).strip()`` (the text the non-streaming path returns).

    Like ``QwenTokenizer.decode_token_pieces``: the decoded prefix is differenced, and nothing is sent
    while it ends in an incomplete UTF-8 sequence. Leading whitespace is dropped and trailing whitespace
    is held back until something visible follows it, so no piece ever has to be taken back.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def _advance(self, target: str) -> str:
        if not target.startswith(self.sent):  # cannot happen with byte-level BPE; never send a wrong piece
            return ""
        piece, self.sent = target[len(self.sent) :], target
        return piece

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.strip())

    def finish(self) -> str:
        """Whatever is still held back (an undecodable tail decodes to U+FFFD, as decode() returns it)."""
        return self._advance(self.tokenizer.decode(self.ids).strip())


# -- model configuration (read inside the stub) ------------------------------------------------------------
def model_parameters(args: dict) -> tuple[dict, dict[str, str], Path]:
    """The python backend's ``initialize`` args -> (model config dict, string parameters, version directory)."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / str(args["model_version"])
    return config, params, version_dir
