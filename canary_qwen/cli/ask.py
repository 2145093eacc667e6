"""``canary-qwen ask``: LLM mode, a question (about recordings) answered by the LLM with the speech LoRA off."""

from __future__ import annotations

import json
from typing import cast

from ..backends.base import Answerer
from ..defaults import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS, MAX_WINDOW_S
from ..errors import CanaryQwenError, UsageError
from ..model.prompt import Turn, about
from ..registry import BACKENDS, DEFAULT_BACKEND, DTYPE_CHOICES, DTYPE_HELP, create_backend

ANSWERING = tuple(name for name, spec in BACKENDS.items() if spec.answers)


def add_ask(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="LLM mode: answer a question (about recordings) with the speech LoRA off",
        description="Canary-Qwen's LLM mode, as the model card runs it: the Qwen3 answers a text-only dialogue with "
        "the speech LoRA switched off. With --about FILE each file is first transcribed (through the LoRA, by the "
        "same engine, long files windowed as `transcribe` does) and the transcripts follow the question after a "
        "blank line. Greedy decoding; the answer alone goes to stdout.",
    )
    p.add_argument("question", help="the user turn, e.g. 'Summarise this call.'")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory or Hugging Face id (torch, torch-fast) / export written with --lora-adapter (vllm)",
    )
    p.add_argument(
        "--backend",
        choices=ANSWERING,
        default=DEFAULT_BACKEND,
        help="; ".join(f"{n}: {BACKENDS[n].help}" for n in ANSWERING)
        + f" (default: {DEFAULT_BACKEND}, the fastest path with the reference's tokens)",
    )
    p.add_argument(
        "--about",
        action="append",
        default=[],
        metavar="FILE",
        help="an audio file whose transcript is appended to the question (repeat for several, in order)",
    )
    p.add_argument("--system", default=None, help="a system turn before the question")
    p.add_argument(
        "--max-new-tokens", type=int, default=MAX_ANSWER_TOKENS, help="answer budget in tokens (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"text", "token_ids", "transcript"} (transcript: of --about, else null)',
    )
    p.set_defaults(run=run_ask)


def transcripts(backend, files: list[str]) -> str:
    """The files' transcripts (ASR mode, windowed as ``transcribe`` does), joined by blank lines."""
    from ..pipeline.batching import transcribe_files

    texts = []
    for heard in transcribe_files(backend, files, max_new_tokens=MAX_NEW_TOKENS, max_window_s=MAX_WINDOW_S):
        if heard.transcription is None:
            raise CanaryQwenError(heard.error or f"{heard.path}: not transcribed")
        texts.append(heard.transcription.text)
    return "\n\n".join(texts)


def dialogue_of(backend, question: str, system: str | None, files: list[str]) -> tuple[list[Turn], str | None]:
    """The dialogue ``ask`` answers (the system turn, then the question with the files' transcripts after it, as the
    model card writes it), and the transcripts (None without files)."""
    transcript = transcripts(backend, files) if files else None
    question = question if transcript is None else about(question, transcript)
    return ([Turn("system", system)] if system is not None else []) + [Turn("user", question)], transcript


def print_answer(text: str, token_ids: list[int], transcript: str | None, as_json: bool) -> None:
    """The answer on stdout: its text, or with ``as_json`` one object {"text", "token_ids", "transcript"}."""
    if as_json:
        row = {"text": text, "token_ids": token_ids, "transcript": transcript}
        print(json.dumps(row, ensure_ascii=False), flush=True)
    else:
        print(text, flush=True)


def run_ask(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    # The --backend choices are those with LLM mode (BackendSpec.answers): each is an Answerer too.
    backend = cast(Answerer, create_backend(args.backend, args.model, device=args.device, dtype=args.dtype))
    dialogue, transcript = dialogue_of(backend, args.question, args.system, args.about)
    (answer,) = backend.answer([dialogue], max_new_tokens=args.max_new_tokens)
    print_answer(answer.text, answer.token_ids, transcript, args.json)
    return 0
