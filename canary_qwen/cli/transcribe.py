"""``canary-qwen transcribe``: audio files through a local backend."""

from __future__ import annotations

import sys
import time

from ..defaults import MAX_NEW_TOKENS, MAX_WINDOW_S
from ..errors import UsageError
from ..registry import (
    BACKENDS,
    DEFAULT_BACKEND,
    DTYPE_CHOICES,
    DTYPE_HELP,
    SERVER,
    create_backend,
)

LOCAL = tuple(name for name, spec in BACKENDS.items() if spec.source != SERVER)


def add_transcribe(sub) -> None:
    p = sub.add_parser(
        "transcribe",
        help="transcribe audio files with a local backend",
        description="Transcribe wav/flac/ogg files (any sample rate, mono or multi-channel) exactly as NeMo's "
        f"SALM.generate does (greedy). Clips over {MAX_WINDOW_S:g} s are cut into windows at quiet points and their "
        "texts joined. Unreadable files are reported one by one; the rest are still transcribed (exit code 1).",
    )
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory or Hugging Face id (torch, torch-fast) / export directory (onnx, vllm, trt)",
    )
    p.add_argument(
        "--backend",
        choices=LOCAL,
        default=DEFAULT_BACKEND,
        help="; ".join(f"{n}: {BACKENDS[n].help} (takes a {BACKENDS[n].source})" for n in LOCAL)
        + f" (default: {DEFAULT_BACKEND}, the fastest path with the reference's tokens)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="clips per batch (default: 8; vllm: every clip at once, its engine batches continuously); torch-fast "
        "schedules a batch continuously over up to 256 cache slots, so on a GPU give it hundreds",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_decoding_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line: audio, text, token_ids, duration_s")
    p.set_defaults(run=run_transcribe)


def add_decoding_options(p) -> None:
    """--max-new-tokens, --dtype, --prompt, --max-window-s: how each clip is decoded (transcribe, transcribe-corpus)."""
    p.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="decoding budget per clip (default: %(default)s)"
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=DTYPE_HELP)
    p.add_argument(
        "--prompt",
        default=None,
        help="user prompt (default 'Transcribe the following:'; the audio placeholder is appended if missing)",
    )
    p.add_argument(
        "--max-window-s",
        type=float,
        default=MAX_WINDOW_S,
        help="cut longer clips into windows of at most this many seconds; 0 disables (default: %(default)s)",
    )


def run_transcribe(args) -> int:
    from ..pipeline.batching import transcribe_files

    if args.batch_size is None:
        args.batch_size = sys.maxsize if BACKENDS[args.backend].continuous else 8
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    backend = create_backend(args.backend, args.model, device=args.device, dtype=args.dtype)
    failed = 0
    start = time.perf_counter()
    audio_s = 0.0
    for result in transcribe_files(
        backend,
        args.files,
        batch_size=args.batch_size,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        max_window_s=args.max_window_s or None,
        progress=True,
    ):
        t = result.transcription
        if t is None:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
            continue
        audio_s += result.duration_s
        if args.json:
            print(result.json(), flush=True)
        else:
            print(f"{result.path}\t{t.text}")
    wall = time.perf_counter() - start
    if audio_s:
        print(f"{audio_s:.1f} s of audio in {wall:.2f} s (RTFx {audio_s / wall:.1f})", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(args.files)} files failed", file=sys.stderr)
    return 1 if failed else 0
