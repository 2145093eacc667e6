"""What goes over the wire to a Canary-Qwen Triton server: its address, a request's tensors, and each answer's
TEXT and OUTPUT_IDS (a whole answer, or one piece of a stream)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from ..errors import UsageError

PROTOCOLS = ("http", "grpc")
DEFAULT_MODEL = "canary_qwen"
DEFAULT_STREAM_MODEL = "canary_qwen_stream"


def split_url(url: str, protocol: str) -> str:
    """``host:port`` from ``host:port``, ``http://host:port/`` or ``grpc://host:port``."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    address = url.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if address.lower().startswith(scheme):
            if scheme == "https://":
                raise UsageError("https is not supported by this client; use host:port of a plain HTTP endpoint")
            address = address[len(scheme) :]
    address = address.rstrip("/")
    if not address or "/" in address:
        raise UsageError(f"Triton URL must be host:port, got {url!r}")
    return address


def as_samples(audio) -> np.ndarray:
    """One waveform as a contiguous 1-D float32 array; refuses what is not already 16 kHz mono samples."""
    a = np.asarray(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise UsageError(
            f"audio must be one 1-D 16 kHz mono waveform, got shape {list(a.shape)} "
            "(use canary_qwen.audio.to_mono_16k to downmix and resample)"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(
            f"audio must be float samples in [-1, 1], got {a.dtype} (use canary_qwen.audio.to_mono_16k to convert PCM)"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def request_arrays(audio, prompt: str | None, max_new_tokens: int | None) -> dict[str, np.ndarray]:
    """One clip's request tensors (batch dimension 1): AUDIO, and PROMPT and MAX_NEW_TOKENS where given."""
    arrays = {"AUDIO": as_samples(audio)[None]}
    if prompt is not None:
        arrays["PROMPT"] = np.array([[str(prompt).encode("utf-8")]], dtype=object)
    if max_new_tokens is not None:
        arrays["MAX_NEW_TOKENS"] = np.array([[int(max_new_tokens)]], dtype=np.int32)
    return arrays


def dialogue_arrays(turns, max_new_tokens: int | None) -> dict[str, np.ndarray]:
    """An LLM-mode request's tensors (batch dimension 1): DIALOGUE (the turns, ``model.prompt.Turn``, as JSON) and
    MAX_NEW_TOKENS where given."""
    dialogue = json.dumps([{"role": t.role, "content": t.content} for t in turns], ensure_ascii=False)
    arrays = {"DIALOGUE": np.array([[dialogue.encode("utf-8")]], dtype=object)}
    if max_new_tokens is not None:
        arrays["MAX_NEW_TOKENS"] = np.array([[int(max_new_tokens)]], dtype=np.int32)
    return arrays


def text_and_ids(outputs: Mapping[str, np.ndarray | None]) -> tuple[str, list[int]]:
    """An answer's (or a streamed piece's) TEXT and OUTPUT_IDS; missing ones are empty."""
    text = outputs.get("TEXT")
    piece = text.reshape(-1)[0] if text is not None and text.size else ""
    ids = outputs.get("OUTPUT_IDS")
    return (
        piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else str(piece),
        [] if ids is None else [int(i) for i in np.asarray(ids).reshape(-1)],
    )


def prompt_tokens(outputs: Mapping[str, np.ndarray | None]) -> int | None:
    """An answer's PROMPT_TOKENS (the engine models send it), or None."""
    value = outputs.get("PROMPT_TOKENS")
    return None if value is None or not np.asarray(value).size else int(np.asarray(value).reshape(-1)[0])


def event_body(arrays: Mapping[str, np.ndarray]) -> bytes:
    """One clip's request as Triton's generate_stream takes it: JSON fields become inputs (a list gets the batch
    dimension added)."""
    body = {}
    for name, array in arrays.items():  # one clip: drop the batch dimension
        value = np.asarray(array)[0]
        if value.dtype == object:
            value = value.reshape(-1)[0]
            body[name] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        else:
            body[name] = value.reshape(-1)[0].item() if value.size == 1 and name != "AUDIO" else value.tolist()
    return json.dumps(body).encode()


def event_outputs(event: Mapping) -> dict[str, np.ndarray]:
    """A generate_stream event's outputs as arrays (a one-element tensor comes back as a scalar there)."""
    return {name: np.asarray(value, dtype=object if name == "TEXT" else None) for name, value in event.items()}
