"""``canary-qwen ask``: LLM mode, a text question answered by the LLM with the LoRA off (vLLM)."""

from __future__ import annotations

import json

from ..defaults import MAX_NEW_TOKENS
from ..precision import Precision


def add_ask(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="LLM mode: answer a text prompt (about a transcript) with the LoRA off (vllm)",
        description="Canary-Qwen's LLM mode: the Qwen3 answers a text-only user turn with the speech LoRA switched "
        "off. With --about FILE the file is transcribed first (through the LoRA, by the same vLLM engine) and the "
        "transcript follows the question. Needs an export written with `canary-qwen export --lora-adapter` and vLLM.",
    )
    p.add_argument("question", help="the user turn, e.g. 'Summarise this transcript:'")
    p.add_argument("--model", required=True, help="export directory with llm_base/ and lora/")
    p.add_argument("--about", default=None, help="audio file whose transcript is appended to the question")
    p.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="answer budget in tokens (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--dtype",
        choices=Precision.choices(*Precision.floats()),
        default=None,
        help="default: bf16 on cuda, fp32 on cpu",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"text", "token_ids", "transcript"} (transcript: of --about, else null)',
    )
    p.set_defaults(run=run_ask)


def run_ask(args) -> int:
    from ..backends.vllm import VllmBackend
    from ..errors import CanaryQwenError
    from ..pipeline.batching import transcribe_files

    backend = VllmBackend(args.model, device=args.device, dtype=args.dtype)
    question, transcript = args.question, None
    if args.about:
        (heard,) = transcribe_files(backend, [args.about])
        if heard.transcription is None:
            raise CanaryQwenError(heard.error or f"{args.about}: not transcribed")
        transcript = heard.transcription.text
        question = f"{question}\n\n{transcript}"
    (answer,) = backend.chat([question], max_new_tokens=args.max_new_tokens)
    if args.json:
        row = {"text": answer.text, "token_ids": answer.token_ids, "transcript": transcript}
        print(json.dumps(row, ensure_ascii=False), flush=True)
    else:
        print(answer.text, flush=True)
    return 0
