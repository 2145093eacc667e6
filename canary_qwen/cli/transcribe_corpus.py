"""``canary-qwen transcribe-corpus``: a directory, glob or manifest of audio through a Ray cluster, resumably."""

from __future__ import annotations

import argparse
import sys

from ..client.wire import DEFAULT_MODEL
from ..errors import UsageError
from ..registry import BACKENDS, DEFAULT_BACKEND, SERVER
from .transcribe import add_decoding_options

SHOWN_ERRORS = 10  # failed files named in the summary; all of them are in the output


def add_transcribe_corpus(sub) -> None:
    p = sub.add_parser(
        "transcribe-corpus",
        help="transcribe a whole corpus on a Ray cluster (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Transcribe every audio file of a directory (recursively), glob or JSON-lines manifest ("audio_filepath"
per line, as NeMo's) on a Ray cluster: a pool of Ray Data actors, each holding one backend and its model,
takes --files-per-task files at a time, loads and resamples them, windows clips longer than --max-window-s
and transcribes them in batches of --batch-size, exactly as `canary-qwen transcribe` does.

OUT/transcripts.jsonl (and transcripts.parquet) get one row per file: audio, duration_s, text, token_ids,
backend, model, fingerprint (of the model's files and the options that change text), error. Unreadable
files are rows with their error; they never stop the run. Each finished batch is committed to disk at
once: a rerun skips files already done with the same fingerprint, and a worker that dies is restarted by
Ray and its batch redone, with no file written twice. Progress (files, hours, RTFx) goes to stderr.
Exit code 1 when some file failed (rerun with --retry-failed to try those again), 2 on bad options.

On a multi-node cluster start Ray on every node (`ray start --head` on one, `ray start --address
HEAD:6379` on the others), install this package on each, put the audio where every node reads it at the
same path, and run this on the head with --ray-address auto.""",
    )
    p.add_argument("--input", required=True, help="a directory, a glob (quote it) or a .jsonl manifest")
    p.add_argument("--output", required=True, help="output directory (created; reruns resume in it)")
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=DEFAULT_BACKEND,
        help="; ".join(f"{n}: {s.help} (takes a {s.source})" for n, s in BACKENDS.items())
        + f" (default: {DEFAULT_BACKEND}, the fastest path with the reference's tokens)",
    )
    p.add_argument(
        "--model",
        help="checkpoint directory or Hugging Face id (torch, torch-fast, nemo) / export directory (onnx, trt); "
        f"with --backend triton a label of what the servers serve, part of the fingerprint (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--url", help="--backend triton: HOST:PORT[,HOST:PORT...] of the servers; workers are dealt them in turn"
    )
    p.add_argument(
        "--ray-address",
        help="'local' (a new cluster on this machine, stopped at the end), 'auto' (the cluster `ray start` made "
        "here) or HOST:PORT / ray://HOST:PORT (default: $RAY_ADDRESS, else a cluster on this machine, else local)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="actors, each with its own backend (default: one per --url, else as many as the cluster's GPUs, or "
        "CPUs, hold with the per-worker resources below)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per worker; >0 runs on cuda, 0.5 puts two workers on a GPU (default: 0)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker; its torch threads (default: 1)")
    p.add_argument(
        "--files-per-task", type=int, default=64, help="files a worker takes and commits at a time (default: 64)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="clips per model batch within a task (default: 8)")
    add_decoding_options(p)
    p.add_argument("--retry-failed", action="store_true", help="also redo files whose earlier row has an error")
    p.set_defaults(run=run_transcribe_corpus)


def run_transcribe_corpus(args) -> int:
    from ..corpus.inputs import list_audio
    from ..corpus.job import ClusterOptions, DecodeOptions, transcribe_corpus

    server = BACKENDS[args.backend].source == SERVER
    if not server and not args.model:
        raise UsageError(f"--backend {args.backend} needs --model")
    urls = tuple(u.strip() for u in args.url.split(",") if u.strip()) if args.url else ()
    cluster = ClusterOptions(
        address=args.ray_address,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        files_per_task=args.files_per_task,
    )
    options = DecodeOptions(
        backend=args.backend,
        model=args.model or (DEFAULT_MODEL if server else ""),
        urls=urls,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        max_window_s=args.max_window_s or None,
    )
    summary = transcribe_corpus(list_audio(args.input), args.output, options, cluster, retry_failed=args.retry_failed)
    print(
        f"done: {summary.transcribed} files transcribed ({summary.audio_s / 3600:.3f} h of audio in "
        f"{summary.wall_s:.1f} s, RTFx {summary.rtfx:.1f}), {summary.skipped} already done; "
        f"{args.output}/transcripts.jsonl has all {summary.files}",
        file=sys.stderr,
    )
    if summary.failed:
        for error in summary.failed[:SHOWN_ERRORS]:
            print(f"error: {error}", file=sys.stderr)
        more = (
            f" ({len(summary.failed) - SHOWN_ERRORS} more in the output)" if len(summary.failed) > SHOWN_ERRORS else ""
        )
        print(
            f"{len(summary.failed)} of {summary.files} files failed{more}; --retry-failed tries them again",
            file=sys.stderr,
        )
    return 1 if summary.failed else 0
