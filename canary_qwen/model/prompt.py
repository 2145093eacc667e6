"""NeMo's ``qwen`` prompt format: one user turn with the audio placeholder (ASR mode), or a text-only dialogue
(LLM mode), each followed by the assistant prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError, UsageError

DEFAULT_PROMPT = "Transcribe the following:"


def user_message(prompt: str | None, audio_locator_tag: str) -> str:
    """The user turn's text; the placeholder is appended (after a space) when the prompt lacks it."""
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    if audio_locator_tag not in prompt:
        prompt = f"{prompt} {audio_locator_tag}" if prompt else audio_locator_tag
    return prompt


ASSISTANT_PREFIX = "<|im_start|>assistant\n"


def user_turn_text(prompt: str | None, audio_locator_tag: str) -> str:
    return f"<|im_start|>user\n{user_message(prompt, audio_locator_tag)}<|im_end|>\n"


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One turn of an LLM-mode dialogue: ``role`` is system, user or assistant."""

    role: str
    content: str


def about(question: str, transcript: str) -> str:
    """A user turn asking ``question`` about a transcript, as the model card writes it."""
    return f"{question}\n\n{transcript}"


def dialogue_ids(tokenizer, turns: Sequence[Turn]) -> list[int]:
    """A text-only dialogue (LLM mode) ending with a user turn, then the assistant prefix.

    The released checkpoint's ``qwen`` format has user and assistant turns only; system turns are written as NeMo's
    ``qwen3`` format writes them, which for inference is ``qwen`` plus that role: ``<|im_start|>system\n...``.
    As there, an empty system turn at the start is dropped, an earlier assistant turn keeps only what follows its
    ``</think>``, thinking stays on (no empty think block is added), and each turn is tokenized alone."""
    if not turns:
        raise InputError("the dialogue has no turns")
    for turn in turns:
        if turn.role not in ROLES:
            raise InputError(f"unknown role {turn.role!r} (one of {', '.join(ROLES)})")
        if tokenizer.audio_locator_tag in turn.content:
            raise InputError(f"a text turn cannot hold the audio placeholder {tokenizer.audio_locator_tag}")
    if turns[-1].role != "user":
        raise InputError(f"the dialogue must end with a user turn, not {turns[-1].role!r}")
    if turns[0].role == "system" and not turns[0].content.strip():
        turns = turns[1:]
    ids: list[int] = []
    for i, turn in enumerate(turns):
        content = turn.content
        if turn.role == "assistant" and i < len(turns) - 1 and "</think>" in content:
            content = content.split("</think>")[1].strip()
        ids += tokenizer.encode(f"<|im_start|>{turn.role}\n{content}<|im_end|>\n")
    return ids + tokenizer.encode(ASSISTANT_PREFIX)


def prompt_ids(tokenizer, prompt: str | None) -> list[int]:
    # NeMo tokenizes the user turn and the assistant prefix separately and concatenates them.
    ids = tokenizer.encode(user_turn_text(prompt, tokenizer.audio_locator_tag)) + tokenizer.encode(ASSISTANT_PREFIX)
    count = ids.count(tokenizer.placeholder_id)
    if count != 1:
        raise UsageError(f"the prompt must hold exactly one audio placeholder, found {count}")
    return ids
