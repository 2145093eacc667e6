"""Qwen tokenizer from ``tokenizer.json`` + ``tokenizer_config.json`` (the ``tokenizers`` library only),
with the audio placeholder added as a special token the way NeMo's SALM adds it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from ..errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class QwenTokenizer:
    def __init__(self, directory: Path, audio_locator_tag: str):
        directory = Path(directory)
        missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"tokenizer files missing in {directory}: {', '.join(missing)}")
        try:
            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise CheckpointError(f"{directory / 'tokenizer.json'} could not be read: {e}") from None
        config = json.loads((directory / "tokenizer_config.json").read_text())
        eos_token = _token_text(config.get("eos_token"))
        eos_id = None if eos_token is None else self.token_to_id(eos_token)
        if eos_id is None:
            raise CheckpointError(f"{directory}: tokenizer has no usable eos_token")
        self.eos_id: int = eos_id
        pad_token = _token_text(config.get("pad_token"))
        pad_id = None if pad_token is None else self.token_to_id(pad_token)
        # NeMo falls back to unk, then 0, when there is no pad token; Qwen has <|endoftext|>.
        self.pad_id: int = 0 if pad_id is None else pad_id
        self._tok.add_special_tokens([AddedToken(audio_locator_tag, special=True, normalized=False)])
        self.audio_locator_tag = audio_locator_tag
        placeholder_id = self.token_to_id(audio_locator_tag)
        if placeholder_id is None:
            raise CheckpointError(
                f"{directory}: the tokenizer did not take the audio placeholder {audio_locator_tag!r}"
            )
        self.placeholder_id: int = placeholder_id

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
