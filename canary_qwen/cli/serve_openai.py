"""``canary-qwen serve-openai``: an OpenAI-compatible server (speech to text, and chat in LLM mode) in front of Triton
or a local engine."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from ..defaults import (
    MAX_ANSWER_TOKENS,
    MAX_ANSWER_TOKENS_LIMIT,
    MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_PROMPT_TOKENS,
    MAX_QUEUE,
    MAX_WINDOW_S,
)
from ..errors import UsageError
from ..openai_api.realtime_protocol import LiveSettings
from ..registry import BACKENDS, DTYPE_CHOICES

LIVE = LiveSettings()  # the live-session limits' defaults

LOCAL_BACKENDS = ("torch-fast", "onnx", "vllm")
ANSWERING = tuple(name for name in LOCAL_BACKENDS if BACKENDS[name].answers)
DESCRIPTION = """\
Serve OpenAI's speech-to-text and chat APIs (what `client.audio.transcriptions.create` and
`client.chat.completions.create` of the official `openai` client, and `vllm serve`, speak) for Canary-Qwen:

  POST /v1/audio/transcriptions   multipart: file, model, response_format (json|text|verbose_json|srt|vtt),
                                  prompt, language, temperature, stream; max_new_tokens (extra_body)
  POST /v1/chat/completions       LLM mode (the speech LoRA off): system/user/assistant messages, text and
                                  input_audio parts (each audio part transcribed, its transcript in its place),
                                  max_completion_tokens, stream; a torch-fast or vllm engine (here or in Triton)
  GET  /v1/realtime               live transcription (WebSocket, OpenAI's Realtime transcription sessions):
                                  16-bit PCM at 24 or 16 kHz in; server VAD or client commits; partial text from
                                  re-decodes (words two in a row agree on), each turn's exact text when it ends
  GET  /v1/models                 the one served model (--served-model-name)
  GET  /health                    200 when the engine, or a Triton server behind it, can answer; else 503
  GET  /metrics                   Prometheus: requests by status, audio seconds, latency, requests in flight

Two ways to answer (one of them):
  --triton URL[,URL...]           forward to running Triton servers (`canary-qwen serve`, or the NGC container; any
                                  flavour) with the Triton client: round robin, failover, --timeout-s per request
  --model DIR --backend NAME      run an engine in this process (torch-fast: checkpoint; onnx, vllm: export);
                                  requests in flight are batched together

What the OpenAI fields mean here: `model` must be the served model's name (others: 404); `language` must be English
or absent (the model transcribes English); decoding is greedy, so `temperature` must be 0 or absent; `prompt` replaces
the model's instruction ("Transcribe the following:"), it is not Whisper's previous-text context. Audio in any format
libsndfile reads (wav, flac, ogg, mp3, ...) at any rate; over --max-window-s it is cut into windows at quiet points
and their texts joined, as `canary-qwen transcribe` does (verbose_json/srt/vtt: one segment per window).
Errors come in OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input, 404 unknown model,
413 upload over --max-upload-mb (refused while it streams in), 429 over --max-in-flight (Retry-After), 503 when the
backend cannot answer (Retry-After), 504 past --timeout-s.
"""


def add_serve_openai(sub) -> None:
    p = sub.add_parser(
        "serve-openai",
        help="OpenAI-compatible /v1/audio/transcriptions server (forwards to Triton, or a local engine)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for others)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    mode = p.add_argument_group("answering (give --triton, or --model with --backend)")
    mode.add_argument(
        "--triton",
        metavar="URL[,URL...]",
        default=None,
        help="Triton servers: host:port of their gRPC endpoint (HTTP with --protocol http), or grpc://host:port, "
        "http://host:port",
    )
    mode.add_argument(
        "--protocol", choices=("grpc", "http"), default=None, help="Triton protocol for bare host:port (default: grpc)"
    )
    mode.add_argument("--triton-model", default="canary_qwen", help="Triton model (default: canary_qwen)")
    mode.add_argument(
        "--triton-stream-model",
        default="canary_qwen_stream",
        help="Triton model for stream=true (default: canary_qwen_stream)",
    )
    mode.add_argument("--model", default=None, help="checkpoint (torch-fast) or export (onnx, vllm) directory")
    mode.add_argument("--backend", choices=LOCAL_BACKENDS, default=None, help="local engine for --model")
    mode.add_argument("--device", default="cpu", help="local engine: cpu or cuda (default: cpu)")
    mode.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="local engine: torch-fast's or vllm's precision (default: bf16 on cuda, fp32 on cpu; onnx runs in its "
        "export's)",
    )
    mode.add_argument(
        "--max-batch", type=int, default=16, help="local engine: windows decoded together at most (default: 16)"
    )
    limits = p.add_argument_group("limits")
    limits.add_argument(
        "--served-model-name",
        default="canary-qwen-2.5b",
        help="the name clients pass as `model` (default: %(default)s)",
    )
    limits.add_argument(
        "--max-upload-mb", type=float, default=25.0, help="largest request body, MiB (default: 25, as vLLM)"
    )
    limits.add_argument(
        "--max-audio-s", type=float, default=1800.0, help="longest upload in seconds of audio (default: %(default)s)"
    )
    limits.add_argument(
        "--max-window-s",
        type=float,
        default=MAX_WINDOW_S,
        help="cut longer audio into windows of at most this many seconds; 0: whole (default: %(default)s)",
    )
    limits.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help="decoding budget per window when a request names none (default: %(default)s)",
    )
    limits.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=MAX_NEW_TOKENS_LIMIT,
        help="the most a request may ask for with max_new_tokens (default: %(default)s)",
    )
    limits.add_argument(
        "--max-answer-tokens",
        type=int,
        default=MAX_ANSWER_TOKENS,
        help="chat completions (LLM mode): an answer's budget when a request names none (default: %(default)s)",
    )
    limits.add_argument(
        "--max-answer-tokens-limit",
        type=int,
        default=MAX_ANSWER_TOKENS_LIMIT,
        help="the most a chat request may ask for with max_completion_tokens (default: %(default)s)",
    )
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help="the longest dialogue a chat request may send, in tokens, transcripts of its audio included "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--max-in-flight",
        type=int,
        default=MAX_QUEUE,
        help="requests (transcriptions and chat) handled at once; one more is refused with 429 (default: %(default)s)",
    )
    limits.add_argument(
        "--timeout-s",
        type=float,
        default=300.0,
        help="longest wait for the backend: each Triton request or streamed piece, each wait for the local "
        "engine's next tokens; past it the request gets 504; 0: none (default: %(default)s)",
    )
    live = p.add_argument_group("live transcription (GET /v1/realtime)")
    live.add_argument(
        "--max-sessions", type=int, default=LIVE.max_sessions, help="live sessions at once (default: %(default)s)"
    )
    live.add_argument(
        "--partial-interval-s",
        type=float,
        default=LIVE.partial_interval_s,
        help="how often a turn so far is re-decoded for partial text (default: %(default)s)",
    )
    live.add_argument(
        "--max-buffer-s",
        type=float,
        default=LIVE.max_buffer_s,
        help="uncommitted audio a session may hold, seconds; more is refused (default: %(default)s)",
    )
    live.add_argument(
        "--session-idle-s",
        type=float,
        default=LIVE.idle_timeout_s,
        help="a session with no event for this long is closed (default: %(default)s)",
    )
    live.add_argument(
        "--max-message-kb",
        type=int,
        default=LIVE.max_message_bytes // 1024,
        help="largest event a session takes, KiB (default: %(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=run_serve_openai)


def _settings(args):
    from ..bounds import RequestBounds
    from ..openai_api.service import ServerSettings

    if args.max_upload_mb <= 0 or args.max_in_flight < 1 or args.timeout_s < 0 or args.max_window_s < 0:
        raise UsageError("--max-upload-mb and --max-in-flight must be > 0, --timeout-s and --max-window-s >= 0")
    bounds = RequestBounds(
        max_audio_s=args.max_audio_s,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        max_queue=args.max_in_flight,
        queue_timeout_s=args.timeout_s,
        max_answer_tokens=args.max_answer_tokens,
        max_answer_tokens_limit=args.max_answer_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    if args.max_sessions < 1 or min(args.partial_interval_s, args.max_buffer_s, args.session_idle_s) <= 0:
        raise UsageError("--max-sessions must be >= 1; --partial-interval-s, --max-buffer-s, --session-idle-s > 0")
    if args.max_message_kb < 1:
        raise UsageError("--max-message-kb must be >= 1")
    live = LiveSettings(
        max_sessions=args.max_sessions,
        max_buffer_s=args.max_buffer_s,
        idle_timeout_s=args.session_idle_s,
        max_message_bytes=args.max_message_kb * 1024,
        partial_interval_s=args.partial_interval_s,
    )
    return ServerSettings(
        served_model=args.served_model_name,
        bounds=bounds,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_window_s=args.max_window_s or None,
        live=live,
    )


def _triton_target(url: str, protocol: str | None) -> tuple[str, str]:
    """(host:port list, protocol) from --triton and --protocol; a scheme on the URLs names the protocol."""
    schemes = {u.strip().split("://", 1)[0].lower() for u in url.split(",") if "://" in u}
    if len(schemes) > 1 or schemes - {"grpc", "http"}:
        raise UsageError(f"--triton URLs must all be grpc://, all http://, or bare host:port, got {url!r}")
    if schemes:
        scheme = schemes.pop()
        if protocol is not None and protocol != scheme:
            raise UsageError(f"--protocol {protocol} contradicts the {scheme}:// URLs of --triton")
        protocol = scheme
    return url, protocol or "grpc"


def make_backend(args, settings):
    """The backend the arguments ask for (not started)."""
    from ..openai_api.forwarding import TritonForwarding
    from ..openai_api.local import LocalEngine

    if (args.triton is None) == (args.model is None):
        raise UsageError("give --triton URL[,URL...], or --model DIR with --backend NAME (one of the two)")
    if args.triton is not None:
        if args.backend is not None:
            raise UsageError("--backend runs a local engine; it does not go with --triton")
        url, protocol = _triton_target(args.triton, args.protocol)
        return TritonForwarding(
            url,
            protocol,
            timeout_s=args.timeout_s or 3600.0,
            threads=settings.bounds.max_queue + 8,
            model=args.triton_model,
            stream_model=args.triton_stream_model,
        )
    if args.backend is None:
        raise UsageError(f"--model needs --backend ({', '.join(LOCAL_BACKENDS)})")
    if args.max_batch < 1:
        raise UsageError("--max-batch must be >= 1")
    window = settings.max_window_s or settings.bounds.max_audio_s

    def open_engine():
        from ..backends.engines import open_engine

        return open_engine(
            args.backend,
            args.model,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            bounds=replace(settings.bounds, max_audio_s=window),  # the engine sees one window at a time
        )

    return LocalEngine(
        open_engine,
        f"{args.backend} on {args.model} ({args.device})",
        max_pending=settings.bounds.max_queue * settings.windows_per_upload,
        timeout_s=args.timeout_s,
        answers=args.backend in ANSWERING,
        bounds=settings.bounds,
    )


def run_serve_openai(args) -> int:
    try:
        import uvicorn

        from ..openai_api.app import OpenAIServer
    except ImportError as e:
        raise UsageError(f"serve-openai needs its extra: pip install 'canary-qwen[openai]' ({e})") from None
    settings = _settings(args)
    backend = make_backend(args, settings)
    server = OpenAIServer(backend, settings)
    print(
        f"serving {settings.served_model} at http://{args.host}:{args.port}/v1 ({backend.description}); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        server.app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        access_log=args.log_level == "debug",
    )
    logging.getLogger("canary_qwen").setLevel(args.log_level.upper())
    uvicorn.Server(config).run()
    return 0
