"""``canary-qwen client live``: audio files played into live transcription sessions of ``serve-openai``."""

from __future__ import annotations

import json
import sys


def add_client_live(actions) -> None:
    live = actions.add_parser(
        "live",
        help="play audio files into a live transcription session (serve-openai's /v1/realtime)",
        description="Play audio files at real-time pace (--speed for faster) into live transcription sessions of "
        "`canary-qwen serve-openai` (GET /v1/realtime, OpenAI's Realtime transcription protocol, through the "
        "official openai client): one session per file, 16 kHz PCM in 100 ms appends, the server's VAD finding the "
        "turns. The partial text updates in place on a terminal; each turn's final text prints as PATH<TAB>TEXT. "
        "--json prints every server event as one JSON line instead. Exits 1 if any turn failed.",
    )
    live.add_argument("files", nargs="+", help="audio files (any format and rate the transcribe action reads)")
    live.add_argument("--openai", required=True, metavar="URL", help="the server, http://HOST:PORT[/v1]")
    live.add_argument("--speed", type=float, default=1.0, help="times real time (default: 1)")
    live.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the last text (default: 120)")
    live.add_argument("--json", action="store_true", help="print every server event as one JSON line")
    live.set_defaults(run=run_client_live)


class _LiveDisplay:
    """One file's session on stdout: every event as JSON, or the partial text updating in place on a terminal and
    each turn's final text as PATH<TAB>TEXT."""

    def __init__(self, path: str, as_json: bool):
        self.path, self.as_json = path, as_json
        self.tty = sys.stdout.isatty() and not as_json
        self.partial: dict[str, str] = {}

    def __call__(self, event: dict) -> None:
        if self.as_json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
            return
        kind, item = event.get("type", ""), event.get("item_id", "")
        if self.tty and kind.endswith("input_audio_transcription.delta"):
            self.partial[item] = self.partial.get(item, "") + (event.get("delta") or "")
            print(f"\r\x1b[K{self.path}\t{self.partial[item]}", end="", flush=True)
        elif kind.endswith("input_audio_transcription.completed"):
            print(("\r\x1b[K" if self.tty else "") + f"{self.path}\t{event.get('transcript', '')}", flush=True)


def run_client_live(args) -> int:
    from ..client.live import play
    from ..pipeline.audio import load_audio

    base = args.openai.rstrip("/")
    base = base if base.endswith("/v1") else f"{base}/v1"
    failed = False
    for path in args.files:
        played = play(base, load_audio(path), speed=args.speed, on_event=_LiveDisplay(path, args.json),
                      timeout_s=args.timeout)  # fmt: skip
        for error in played.errors:
            print(f"error: {path}: {error}", file=sys.stderr)
        failed = failed or bool(played.errors)
    return 1 if failed else 0
