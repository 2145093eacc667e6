"""``canary-qwen client ask``: LLM mode through a Triton server (the torch-fast and vllm flavours)."""

from __future__ import annotations


def add_client_ask(actions, url_help: str) -> None:
    ask = actions.add_parser(
        "ask",
        help="LLM mode through a Triton server (torch-fast or vllm flavour): answer a question about recordings",
        description="Canary-Qwen's LLM mode served: the server's engine answers a text-only dialogue with the speech "
        "LoRA off (`canary-qwen ask`, served). With --about FILE each file is first transcribed by the same server "
        "(windowed as `client transcribe` does) and the transcripts follow the question after a blank line. Needs "
        "a torch-fast or vllm repository (`canary-qwen triton-repo --flavor torch-fast|vllm`); the answer alone "
        "goes to stdout.",
    )
    ask.add_argument("question", help="the user turn, e.g. 'Summarise this call.'")
    ask.add_argument("--url", required=True, help=url_help)
    ask.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default: http")
    ask.add_argument("--about", action="append", default=[], metavar="FILE", help="audio whose transcript follows")
    ask.add_argument("--system", default=None, help="a system turn before the question")
    ask.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer budget (default: the server's LLM-mode default)"
    )
    ask.add_argument("--stream", action="store_true", help="print the answer piece by piece as it is decoded")
    ask.add_argument("--model", default="canary_qwen", help="model to send requests to (default: canary_qwen)")
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a response (default: 300)")
    ask.add_argument(
        "--json",
        action="store_true",
        help='one JSON object, as `canary-qwen ask --json`: {"text", "token_ids", "transcript"}',
    )
    ask.set_defaults(run=run_client_ask)


def run_client_ask(args) -> int:
    from ..client.backend import TritonBackend
    from ..errors import UsageError
    from .ask import dialogue_of, print_answer

    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.timeout <= 0:
        raise UsageError("--max-new-tokens must be at least 1, --timeout > 0")
    backend = TritonBackend(args.url, args.protocol, args.model, timeout_s=args.timeout)
    try:
        dialogue, transcript = dialogue_of(backend, args.question, args.system, args.about)
        if not args.stream:
            (answer,) = backend.answer([dialogue], max_new_tokens=args.max_new_tokens)
            print_answer(answer.text, answer.token_ids, transcript, args.json)
            return 0
        text, ids = "", list[int]()
        for piece, piece_ids, _ in backend.client.ask_stream(dialogue, max_new_tokens=args.max_new_tokens):
            text, ids = text + piece, ids + piece_ids
            if not args.json:
                print(piece, end="", flush=True)
        if args.json:
            print_answer(text.strip(), ids, transcript, True)
        else:
            print(flush=True)
        return 0
    finally:
        backend.close()
