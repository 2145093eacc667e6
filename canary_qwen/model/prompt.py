"""NeMo's ``qwen`` prompt format for one user turn followed by the assistant prefix."""

from __future__ import annotations

from ..errors import UsageError

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


def text_prompt_ids(tokenizer, message: str) -> list[int]:
    """A user turn without audio (LLM mode) followed by the assistant prefix, tokenized as :func:`prompt_ids`."""
    if tokenizer.audio_locator_tag in message:
        raise UsageError(f"a text-only prompt cannot hold the audio placeholder {tokenizer.audio_locator_tag}")
    return tokenizer.encode(f"<|im_start|>user\n{message}<|im_end|>\n") + tokenizer.encode(ASSISTANT_PREFIX)


def prompt_ids(tokenizer, prompt: str | None) -> list[int]:
    # NeMo tokenizes the user turn and the assistant prefix separately and concatenates them.
    ids = tokenizer.encode(user_turn_text(prompt, tokenizer.audio_locator_tag)) + tokenizer.encode(ASSISTANT_PREFIX)
    count = ids.count(tokenizer.placeholder_id)
    if count != 1:
        raise UsageError(f"the prompt must hold exactly one audio placeholder, found {count}")
    return ids
