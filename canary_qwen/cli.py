"""``canary-qwen``: one command line for every step, from checkpoint to served model."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .bench import add_bench_parser
from .demo import add_demo_parser
from .engines.build import add_build_engines_parser
from .engines.errors import MissingDependencyError
from .export.manifest import ArtifactError
from .model.errors import CheckpointError
from .runtime.client_cli import add_client_parser
from .triton_repo.repo_cli import add_triton_repo_parser

BACKENDS = ("torch", "torch-fast", "onnx", "trt")


def _add_transcribe(sub) -> None:
    p = sub.add_parser(
        "transcribe",
        help="transcribe audio files with a local backend",
        description="Transcribe wav/flac/ogg files (any sample rate, mono or multi-channel) exactly as NeMo's "
        "SALM.generate does (greedy). Clips over 40 s are cut into windows at quiet points and their texts "
        "joined. Unreadable files are reported one by one; the rest are still transcribed (exit code 1).",
    )
    p.add_argument("files", nargs="+", help="audio files")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id (torch, torch-fast) / export directory (onnx, trt)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: the reference; torch-fast: static KV cache, continuous batching, CUDA-graph decode on "
                   "a GPU; onnx: ONNX Runtime on an export; trt: TensorRT + TensorRT-LLM engines (default: torch)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="clips per batch (default: 8); torch-fast schedules a batch continuously over up to 256 "
                   "cache slots, so on a GPU give it hundreds")
    p.add_argument("--max-new-tokens", type=int, default=128, help="decoding budget per clip (default: 128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="torch / torch-fast precision (default: fp32)")
    p.add_argument("--prompt", default=None, help="user prompt (default 'Transcribe the following:'; the audio placeholder is appended if missing)")
    p.add_argument("--max-window-s", type=float, default=40.0, help="cut longer clips into windows of at most this many seconds; 0 disables (default: 40)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: audio, text, token_ids, duration_s")
    p.set_defaults(run=_run_transcribe)


def make_backend(name: str, model: str, *, device: str = "cpu", dtype: str = "fp32"):
    """torch / torch-fast take a checkpoint; onnx and trt an export directory (trt: after build-engines, on a GPU)."""
    if name == "torch":
        from .engines.torch_backend import TorchBackend

        return TorchBackend(model, device=device, dtype=dtype)
    if name == "torch-fast":
        from .engines.fast_torch import FastTorchBackend

        return FastTorchBackend(model, device=device, dtype=dtype)
    if name == "trt":
        from .engines.trtllm import TrtLlmBackend

        return TrtLlmBackend(model, device=device)
    from .engines.onnx_backend import OnnxBackend

    return OnnxBackend(model, device=device)


def _run_transcribe(args) -> int:
    from .batching import transcribe_files

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("error: --batch-size and --max-new-tokens must be at least 1")
    backend = make_backend(args.backend, args.model, device=args.device, dtype=args.dtype)
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
        if result.error:
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
            continue
        audio_s += result.duration_s
        t = result.transcription
        if args.json:
            print(json.dumps({"audio": result.path, "text": t.text, "token_ids": t.token_ids, "duration_s": round(result.duration_s, 3)}, ensure_ascii=False))
        else:
            print(f"{result.path}\t{t.text}")
    wall = time.perf_counter() - start
    if audio_s:
        print(f"{audio_s:.1f} s of audio in {wall:.2f} s (RTFx {audio_s / wall:.1f})", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(args.files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _add_make_checkpoint(sub) -> None:
    p = sub.add_parser(
        "make-checkpoint",
        help="write a random-weight checkpoint in the real layout",
        description="Write config.json + model.safetensors (+ tokenizer files and llm_backbone/config.json for "
        "offline loading) with random weights: 'tiny' for tests, 'full' for the real 2.5B architecture.",
    )
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_make_checkpoint)


def _run_make_checkpoint(args) -> int:
    from .model.synthetic import make_checkpoint

    out = make_checkpoint(args.out, args.size, args.seed)
    print(f"wrote {args.size} checkpoint to {out}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write ONNX graphs, the merged Qwen3 checkpoint and a manifest",
        description="Export a checkpoint for deployment: encoder.onnx (waveform -> LLM embeddings, one graph, no "
        "STFT op), decoder.onnx (merged-LoRA Qwen3 step with KV cache), embed_tokens.npy, tokenizer/, llm_merged/ "
        "(Hugging Face Qwen3 with explicit lm_head for TensorRT-LLM) and manifest.json (versions, shapes, hashes). "
        "With --precision bf16 a bf16 encoder graph for TensorRT is added and llm_merged is bf16.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="TensorRT/TensorRT-LLM precision (default: fp32)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines are built for (default: 8)")
    p.add_argument("--max-audio-s", type=float, default=40.0, help="longest clip the engines are built for (default: 40)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .export.artifacts import export_all

    manifest = export_all(args.model, args.out, precision=args.precision, max_batch=args.max_batch, max_audio_s=args.max_audio_s)
    print(f"wrote {', '.join(manifest.data['artifacts'])} and manifest.json to {manifest.root}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository with the Triton server bundled in nvidia-pytriton",
        description="Start the tritonserver binary from the nvidia-pytriton wheel (python backend) on a model "
        "repository, print its HTTP/gRPC/metrics endpoints, and stop it cleanly on Ctrl-C or SIGTERM. "
        "Ports are picked free unless given. For the trt flavour use the NGC Triton + TensorRT-LLM container instead.",
    )
    p.add_argument("--repo", required=True, help="model repository (from `canary-qwen triton-repo`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for other machines)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from .triton_repo.server import serve_forever

    return serve_forever(
        args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, log_verbose=args.log_verbose,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canary-qwen",
        description="Deploy Canary-Qwen-2.5B: NeMo-exact transcription, ONNX/TensorRT export, Triton serving, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_transcribe, _add_make_checkpoint, _add_export, add_build_engines_parser, add_triton_repo_parser,
                _add_serve, add_client_parser, add_bench_parser, add_demo_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ArtifactError, MissingDependencyError, RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
