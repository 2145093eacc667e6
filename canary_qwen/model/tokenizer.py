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
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        if self.eos_token is None or self.token_to_id(self.eos_token) is None:
            raise CheckpointError(f"{directory}: tokenizer has no usable eos_token")
        self._tok.add_special_tokens([AddedToken(audio_locator_tag, special=True, normalized=False)])
        self.audio_locator_tag = audio_locator_tag
        self.placeholder_id = self.token_to_id(audio_locator_tag)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        # NeMo falls back to unk, then 0, when there is no pad token; Qwen has <|endoftext|>.
        if self.pad_token is not None and self.token_to_id(self.pad_token) is not None:
            return self.token_to_id(self.pad_token)
        return 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_token_pieces(self, ids: list[int]) -> list[str]:
        """Text added by each id in turn (for streaming): decoded prefixes, differenced."""
        pieces, previous = [], ""
        for i in range(1, len(ids) + 1):
            text = self.decode(ids[:i])
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
                pieces.append("")
                continue
            pieces.append(text[len(previous) :])
            previous = text
        return pieces
