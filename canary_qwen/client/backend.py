"""The ``Transcriber`` interface over Triton servers, so ``batching`` and the benchmark can drive them."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..backends.base import Transcription
from ..decoding import token_budgets
from .triton import TritonClient
from .wire import DEFAULT_MODEL


class TritonBackend:
    """The ``Transcriber`` interface over a Triton server, so ``batching`` and the benchmark can drive it.

    Each call sends its clips as concurrent single-clip requests (up to ``concurrency``); the
    server's dynamic batchers put them together. ``token_ids`` come from the ensemble's OUTPUT_IDS.
    The server is checked at construction: an unreachable server or a missing model fails here.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        protocol: str = "http",
        model: str = DEFAULT_MODEL,
        *,
        concurrency: int = 8,
        timeout_s: float = 300.0,
    ):
        self.client = TritonClient(url, protocol, model, timeout_s=timeout_s)
        self.concurrency = concurrency
        self.device = f"triton {protocol}://{self.client.url}"
        try:
            self.client.check()
        except BaseException:
            self.client.close()
            raise

    def transcribe(
        self,
        audios: Sequence[np.ndarray],
        *,
        prompt: str | None = None,
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> list[Transcription]:
        """``max_new_tokens`` None: the server's configured budget."""
        if not len(audios):
            return []
        budgets = None if max_new_tokens is None else token_budgets(max_new_tokens, len(audios))
        results = self.client.infer_many(
            list(audios), prompt, max_new_tokens=budgets, with_ids=True, concurrency=self.concurrency
        )
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [Transcription(text=text, token_ids=ids) for text, ids in results]

    def answer(self, dialogues, *, max_new_tokens: int | Sequence[int] | None = None) -> list[Transcription]:
        """LLM mode (``Answerer``; the torch-fast and vllm flavours): the dialogues as concurrent requests.
        ``max_new_tokens`` None: the server's LLM-mode default."""
        if not len(dialogues):
            return []
        budgets = [None] * len(dialogues) if max_new_tokens is None else token_budgets(max_new_tokens, len(dialogues))
        with ThreadPoolExecutor(max(1, min(self.concurrency, len(dialogues)))) as pool:
            answers = list(pool.map(lambda i: self.client.ask(dialogues[i], max_new_tokens=budgets[i]),
                                    range(len(dialogues))))  # fmt: skip
        return [Transcription(text=text, token_ids=ids) for text, ids, _ in answers]

    def close(self) -> None:
        self.client.close()
