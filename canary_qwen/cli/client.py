"""``canary-qwen client transcribe``: send audio files to a running Canary-Qwen Triton server."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..defaults import MAX_NEW_TOKENS, MAX_WINDOW_S, SAMPLE_RATE
from .client_ask import add_client_ask
from .client_live import add_client_live

DESCRIPTION = """\
Transcribe audio files with a Canary-Qwen Triton server (`canary-qwen serve`, or the NGC container).
Files are read and resampled to 16 kHz mono here; clips longer than --max-window-s are cut into
windows at quiet points and their texts joined. Each file prints as `PATH<TAB>TEXT`; with --stream
the text is printed piece by piece as the server produces it (gRPC streaming, or HTTP server-sent
events). Unreadable files and requests the server refuses are reported one by one on stderr while
the others go on; the exit code is 1 if any failed.

With --via-embeddings the client does the ensemble's work itself: it gets each clip's embeddings
(from the server's encoder model, or --local-encoder with ONNX Runtime), tokenizes the prompt with
the export's tokenizer (--artifacts), and sends both to the LLM model: `llm` (onnx flavour) or
`tensorrt_llm` (trt flavour: fake token ids + prompt embedding table, as TensorRT-LLM expects).
"""


URL_HELP = (
    "HOST:PORT of the server's HTTP endpoint (its gRPC one with --protocol grpc); several servers comma-separated: "
    "requests are spread over them, and one a server does not answer goes to the next"
)
LOADTEST_DESCRIPTION = """\
Load test running Canary-Qwen Triton servers: --concurrency clients send requests one after another for
--duration seconds, taking the audio files (cut into windows of at most 40 s) in turn; --stream-share of
the requests are streams. Prints how many requests were answered, latency percentiles (p50/p90/p99, and
the time to the first streamed piece), throughput, and the requests refused (busy, rate limited, server down
or restarting: the client then waits as the server's Retry-After says, or 1 s) apart from those that failed.
With --reference, every answer is checked against `transcribe --json`'s for the same file. Exits 1 if any
request failed or differed from the reference.
"""


def add_client_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "client",
        help="talk to a running Canary-Qwen Triton server",
        description="Client commands for a Canary-Qwen Triton server.",
    )
    actions = p.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    t = actions.add_parser(
        "transcribe",
        help="transcribe audio files through a Triton server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, ...; any sample rate and channel count)")
    t.add_argument("--url", required=True, help=URL_HELP)
    t.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default: http")
    t.add_argument(
        "--stream", action="store_true", help="print text pieces as they are produced (model canary_qwen_stream)"
    )
    t.add_argument("--prompt", default=None, help="user prompt (default 'Transcribe the following:')")
    t.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"decoding budget per clip (default: the server's, {MAX_NEW_TOKENS} unless configured)",
    )
    t.add_argument("--model", default="canary_qwen", help="model to send requests to (default: canary_qwen)")
    t.add_argument(
        "--stream-model", default="canary_qwen_stream", help="model for --stream (default: canary_qwen_stream)"
    )
    t.add_argument("--concurrency", type=int, default=4, help="requests in flight without --stream (default: 4)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a response (default: 120)")
    t.add_argument(
        "--max-window-s",
        type=float,
        default=MAX_WINDOW_S,
        help="cut longer clips into windows of at most this many seconds; 0 sends them whole (default: %(default)s)",
    )
    t.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line, as `canary-qwen transcribe --json` prints: audio, text, token_ids, duration_s "
        "(with --stream: once the file's stream has ended)",
    )
    t.add_argument("--via-embeddings", action="store_true", help="send embeddings to the LLM model (needs --artifacts)")
    t.add_argument(
        "--artifacts", default=None, help="with --via-embeddings: the export the server's repository was made from"
    )
    t.add_argument(
        "--local-encoder", action="store_true", help="with --via-embeddings: run the encoder here (ONNX Runtime)"
    )
    t.add_argument(
        "--llm-model",
        default=None,
        help="with --via-embeddings: LLM model name (default: tensorrt_llm or llm, whichever the server has)",
    )
    t.set_defaults(run=run_client_transcribe)
    add_client_ask(actions, URL_HELP)
    add_client_live(actions)
    load = actions.add_parser(
        "loadtest",
        help="load test running servers: concurrent clients, latency percentiles, errors",
        description=LOADTEST_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("files", nargs="+", help="audio files to send (any format the transcribe action reads)")
    target = load.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help=URL_HELP)
    target.add_argument(
        "--openai",
        metavar="URL",
        help="the OpenAI-compatible server instead (canary-qwen serve-openai), http://HOST:PORT[/v1], through the "
        "official openai client; run both on the same clips to see what the OpenAI layer adds per request",
    )
    load.add_argument("--model", default=None, help="with --openai: the served model (default: the one it lists)")
    load.add_argument("--protocol", choices=("http", "grpc"), default="grpc", help="default: grpc")
    load.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default: 16)")
    load.add_argument("--duration", type=float, default=30.0, help="seconds to keep sending (default: 30)")
    load.add_argument("--stream-share", type=float, default=0.5, help="share of requests streamed, 0..1 (default: 0.5)")
    load.add_argument(
        "--max-new-tokens", type=int, default=None, help="decoding budget per request (default: the server's)"
    )
    load.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a response (default: 120)")
    load.add_argument(
        "--reference",
        metavar="FILE.jsonl",
        help="what `canary-qwen transcribe --json` printed for the same files (and --max-new-tokens): every answer's "
        "text and token ids are checked against it, and the report counts those that differ, per mode",
    )
    load.add_argument("--json", action="store_true", help="print the report as one JSON object")
    load.set_defaults(run=run_client_loadtest)


def _emit(args, result, out) -> None:
    """A transcribed file (a ``FileResult``) on stdout: its JSON line, or ``PATH<TAB>TEXT``."""
    line = result.json() if args.json else f"{result.path}\t{result.transcription.text}"
    print(line, file=out, flush=True)


def run_client_transcribe(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.concurrency < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.timeout <= 0:
        print("error: --concurrency and --max-new-tokens must be at least 1, --timeout > 0", file=err)
        return 2
    if args.via_embeddings:
        return _run_via_embeddings(args, out, err)
    if args.stream:
        return _run_streaming(args, out, err)
    from ..client.backend import TritonBackend
    from ..client.errors import TritonClientError
    from ..pipeline.batching import transcribe_files

    try:
        backend = TritonBackend(
            args.url, args.protocol, args.model, concurrency=args.concurrency, timeout_s=args.timeout
        )
    except TritonClientError as e:
        print(f"error: {e}", file=err)
        return 1
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=err)
        return 2
    failed, audio_s, start = 0, 0.0, time.perf_counter()
    try:
        # Each batch's windows go out as concurrent requests (the server's dynamic batcher groups them).
        for result in transcribe_files(
            backend,
            args.files,
            batch_size=8 * args.concurrency,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            max_window_s=args.max_window_s or None,
        ):
            if result.transcription is None:
                failed += 1
                print(f"error: {result.error}", file=err, flush=True)
                continue
            audio_s += result.duration_s
            _emit(args, result, out)
    finally:
        backend.close()
    return _summary(args, audio_s, time.perf_counter() - start, failed, err)


def _run_streaming(args, out, err) -> int:
    from ..backends.base import Transcription
    from ..client.errors import InferenceError, TritonClientError
    from ..client.triton import TritonClient
    from ..errors import AudioError
    from ..pipeline.audio import load_audio
    from ..pipeline.batching import FileResult
    from ..pipeline.windowing import plan_windows

    try:
        client = TritonClient(
            args.url, args.protocol, args.model, stream_model=args.stream_model, timeout_s=args.timeout
        )
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=err)
        return 2
    failed = 0
    audio_s = 0.0
    start = time.perf_counter()
    try:
        try:
            client.check(args.stream_model)
        except TritonClientError as e:
            print(f"error: {e}", file=err)
            return 1
        loaded = []
        for path in args.files:
            try:
                loaded.append((path, load_audio(path)))
            except AudioError as e:
                failed += 1
                print(f"error: {e}", file=err, flush=True)
        for n, (path, audio) in enumerate(loaded):
            plan = plan_windows([audio], args.max_window_s or None)
            if not args.json:
                print(f"{path}\t", end="", file=out, flush=True)
            try:
                windows: list[Transcription] = []
                for w in plan.windows:
                    window = Transcription(text="", token_ids=[])
                    for piece, ids in client.stream_with_ids(w, args.prompt, max_new_tokens=args.max_new_tokens):
                        if piece and not args.json:  # printed as it comes; windows' texts joined with one space
                            gap = " " if not window.text and any(t.text for t in windows) else ""
                            print(gap + piece, end="", file=out, flush=True)
                        window.text += piece
                        window.token_ids += ids
                    windows.append(window)
                if args.json:
                    _emit(args, FileResult(path, len(audio) / SAMPLE_RATE, _joined(plan, windows)), out)
                else:
                    print(file=out, flush=True)
                audio_s += len(audio) / SAMPLE_RATE
            except TritonClientError as e:
                if not args.json:
                    print(file=out, flush=True)
                failed += 1
                print(f"error: {path}: {e}", file=err, flush=True)
                if not isinstance(e, InferenceError):
                    failed += len(loaded) - n - 1
                    break  # the server is gone: the rest would fail the same way
    finally:
        client.close()
    return _summary(args, audio_s, time.perf_counter() - start, failed, err)


def run_client_loadtest(args, out=None) -> int:
    import os

    from ..client.loadtest import OpenAITarget, Target, format_report, read_reference, run_load
    from ..client.triton import TritonClient
    from ..errors import UsageError
    from ..pipeline.audio import load_audio
    from ..pipeline.windowing import plan_windows

    out = out or sys.stdout
    plan = plan_windows([load_audio(path) for path in args.files])
    expected = None
    if args.reference:
        reference = read_reference(args.reference)
        missing = [p for p in args.files if os.path.realpath(p) not in reference]
        if missing or len(plan.windows) != len(args.files):
            raise UsageError(
                f"--reference must hold every file, each at most one window long (missing: {', '.join(missing)})"
                if missing
                else "--reference compares whole files: give files no longer than one window (40 s)"
            )
        expected = [reference[os.path.realpath(p)] for p in args.files]
    target: Target
    if args.openai:
        target = OpenAITarget(args.openai, args.model, timeout_s=args.timeout)
    else:
        target = TritonClient(args.url, args.protocol, timeout_s=args.timeout)
        target.check()
        if args.stream_share > 0:
            target.check(target.stream_model)
    try:
        report = run_load(
            target,
            plan.windows,
            concurrency=args.concurrency,
            duration_s=args.duration,
            stream_share=args.stream_share,
            max_new_tokens=args.max_new_tokens,
            expected=expected,
        )
    finally:
        target.close()
    print(json.dumps(report.as_dict()) if args.json else format_report(report), file=out, flush=True)
    return 1 if report.errors or report.mismatches else 0


def _joined(plan, windows):
    """One file's windows (Transcriptions, none failed) joined as ``transcribe`` joins them."""
    (joined,) = plan.join(windows, 1)
    return joined


def _summary(args, audio_s: float, wall: float, failed: int, err) -> int:
    """The closing lines on stderr (RTFx of what was transcribed, how many files failed) and the exit code."""
    if audio_s:
        print(f"{audio_s:.1f} s of audio in {wall:.2f} s (RTFx {audio_s / wall:.1f})", file=err)
    if failed:
        print(f"{failed} of {len(args.files)} files failed", file=err)
    return 1 if failed else 0


def _run_via_embeddings(args, out, err) -> int:
    from ..client.embeddings import EmbeddingsClient
    from ..client.errors import TritonClientError
    from ..errors import ArtifactError, AudioError
    from ..pipeline.audio import load_audio
    from ..pipeline.batching import FileResult
    from ..pipeline.windowing import plan_windows

    if args.artifacts is None or args.stream:
        print("error: --via-embeddings needs --artifacts EXPORT_DIR and does not stream", file=err)
        return 2
    try:
        client = EmbeddingsClient(
            args.url,
            args.protocol,
            export_dir=args.artifacts,
            local_encoder=args.local_encoder,
            llm_model=args.llm_model,
            timeout_s=args.timeout,
        )
    except (TritonClientError, ArtifactError, ValueError, ImportError) as e:
        print(f"error: {e}", file=err)
        return 1
    failed = 0
    audio_s = 0.0
    start = time.perf_counter()
    budget = args.max_new_tokens or MAX_NEW_TOKENS
    with client:
        for path in args.files:
            try:
                audio = load_audio(path)
                plan = plan_windows([audio], args.max_window_s or None)
                joined = _joined(plan, [client.transcribe(w, args.prompt, max_new_tokens=budget) for w in plan.windows])
            except (AudioError, TritonClientError) as e:
                failed += 1
                print(
                    f"error: {path}: {e}" if isinstance(e, TritonClientError) else f"error: {e}", file=err, flush=True
                )
                continue
            audio_s += len(audio) / SAMPLE_RATE
            _emit(args, FileResult(path, len(audio) / SAMPLE_RATE, joined), out)
    return _summary(args, audio_s, time.perf_counter() - start, failed, err)
