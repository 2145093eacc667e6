"""``canary-qwen triton-repo``: write a Triton model repository for an export (torch-fast: for a checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bounds import RequestBounds
from ..defaults import (
    ENGINE_DIR_IN_SERVER,
    KV_CACHE_FRACTION,
    MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_QUEUE,
    QUEUE_TIMEOUT_S,
)
from ..errors import UsageError
from ..registry import DTYPE_CHOICES

DESCRIPTION = """\
Write a Triton model repository for an export (`canary-qwen export`; torch-fast: for a checkpoint). The flavours serve the same
public interface: the `canary_qwen` ensemble takes AUDIO (float32 16 kHz samples) and optional PROMPT
and MAX_NEW_TOKENS and returns TEXT and OUTPUT_IDS; `canary_qwen_stream` (decoupled) streams TEXT pieces.

  onnx  python-backend models running ONNX Runtime: serves on a CPU with `canary-qwen serve`
        (the Triton binary bundled in nvidia-pytriton), or on a GPU with onnxruntime-gpu (--device cuda).
  trt   the TensorRT encoder plan and the TensorRT-LLM engine (`canary-qwen build-engines` first) for
        NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 container; audio frames reach the LLM as a
        prompt embedding table addressed by fake token ids. With streaming the ensemble is decoupled:
        Triton serves it over gRPC streaming and HTTP generate_stream (canary-qwen client does that).
  torch-fast  one python model `engine` holding the fast PyTorch path on a checkpoint (--model, no export
        needed; --dtype int8 on CPUs with VNNI/AMX, bf16 and CUDA graphs on GPUs): requests join the running
        batch between decode steps, tokens streamed, both ensembles decoupled. The fastest CPU flavour.
  vllm  the same `engine` model owning a vLLM engine on an export (its encoder in ONNX Runtime). Serve it from
        a Python with vLLM and numpy<2 (.venv-vllm from scripts/setup.sh): .venv-vllm/bin/canary-qwen serve.
"""


def add_triton_repo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "triton-repo",
        help="write a Triton model repository (onnx, trt, vllm or torch-fast flavour)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", help="export directory (from `canary-qwen export`): onnx, trt, vllm")
    p.add_argument("--model", help="torch-fast: checkpoint directory or hub id (config.json + model.safetensors)")
    p.add_argument("--flavor", choices=("onnx", "trt", "vllm", "torch-fast"), default="onnx", help="default: onnx")
    p.add_argument("--out", required=True, help="repository directory (its canary-qwen model folders are replaced)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="largest batch per model (default: 8 for onnx and vllm, 16 for torch-fast (requests decoding "
        "together), the LLM engine's for trt)",
    )
    p.add_argument("--instances", type=int, default=1, help="instances of the encoder and LLM models (default: 1)")
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="how long dynamic batchers wait to fill a batch (default: 2000 onnx, 1000 trt)",
    )
    p.add_argument("--no-streaming", action="store_true", help="leave out the decoupled streaming models")
    p.add_argument("--max-audio-s", type=float, default=None, help="longest clip accepted (default: the export's)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help="default decoding budget per request (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=MAX_NEW_TOKENS_LIMIT,
        help="most tokens one request may ask for; a long decode holds up its batch (default: %(default)s; trt: at "
        "most the new tokens its LLM engine was built for)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        help="onnx: requests each python model keeps queued before refusing more as busy; vllm, torch-fast: requests "
        "the engine holds beyond its --max-batch running ones (default: %(default)s)",
    )
    p.add_argument(
        "--queue-timeout-s",
        type=float,
        default=QUEUE_TIMEOUT_S,
        help="onnx: a request that waited this long in a queue is refused, its client has likely given up "
        "(default: %(default)s; 0: no limit); vllm, torch-fast hand requests to their engine at once, which bounds "
        "them by --max-queue only",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="onnx: cpu, or cuda with onnxruntime-gpu in the server's Python; torch-fast, vllm: cpu or cuda "
        "(default: cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="torch-fast: fp32, bf16, fp16 or int8 (CPUs with VNNI/AMX); vllm: fp32, bf16 or fp16 (default: bf16 on "
        "cuda, fp32 on cpu)",
    )
    p.add_argument(
        "--engines", default=None, help="trt: folder with encoder.plan and llm_engine/ (default: ARTIFACTS/trt)"
    )
    p.add_argument(
        "--engine-dir-in-server",
        default=ENGINE_DIR_IN_SERVER,
        help="trt: absolute path of OUT/tensorrt_llm/1 as the server will see it "
        f"(default: {ENGINE_DIR_IN_SERVER}, the repository mounted at /models)",
    )
    p.add_argument(
        "--kv-cache-free-gpu-mem-fraction",
        type=float,
        default=KV_CACHE_FRACTION,
        help="trt: share of the GPU memory free after the LLM engine loads that its KV cache takes; leave room "
        f"for the encoder plan (default: {KV_CACHE_FRACTION})",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=1.0,
        help="vllm on a CPU: memory vLLM reserves for its KV cache (default: 1; on a GPU vLLM sizes it)",
    )
    p.set_defaults(run=_run)


def _run(args) -> int:
    streaming = not args.no_streaming
    if (args.flavor == "torch-fast") != (args.model is not None) or (args.artifacts is None) == (args.model is None):
        raise UsageError("--flavor torch-fast takes --model CHECKPOINT; the other flavours take --artifacts EXPORT")
    if args.dtype is not None and args.flavor not in ("torch-fast", "vllm"):
        raise UsageError(
            f"--dtype is for the torch-fast and vllm flavours; {args.flavor} runs in its export's precision"
        )
    bounds = RequestBounds(
        max_audio_s=args.max_audio_s,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout_s,
    )
    if args.flavor == "onnx":
        from ..serving.onnx_flavor import generate_onnx_repo

        repo = generate_onnx_repo(
            args.artifacts,
            args.out,
            max_batch=args.max_batch or 8,
            instances=args.instances,
            queue_delay_us=2000 if args.queue_delay_us is None else args.queue_delay_us,
            decoupled_streaming=streaming,
            bounds=bounds,
            device=args.device,
        )
        serve = f"canary-qwen serve --repo {repo}"
    elif args.flavor in ("vllm", "torch-fast"):
        from ..serving.engine_flavor import generate_engine_repo

        if args.no_streaming or args.instances != 1:
            raise UsageError(
                f"the {args.flavor} flavour has one engine and always streams (no --no-streaming, --instances)"
            )
        repo = generate_engine_repo(
            args.flavor,
            args.model or args.artifacts,
            args.out,
            max_batch=args.max_batch or (8 if args.flavor == "vllm" else 16),
            bounds=bounds,
            device=args.device,
            dtype=args.dtype,
            kv_cache_gib=args.kv_cache_gib,
        )
        serve = f"canary-qwen serve --repo {repo}"
        if args.flavor == "vllm":
            serve = f".venv-vllm/bin/{serve}  (a Python with vLLM and numpy<2)"
    else:
        from ..serving.trt_flavor import generate_trt_repo

        repo = generate_trt_repo(
            args.artifacts,
            args.out,
            engines_dir=args.engines,
            max_batch=args.max_batch,
            encoder_instances=args.instances,
            llm_instances=args.instances,
            queue_delay_us=1000 if args.queue_delay_us is None else args.queue_delay_us,
            decoupled_streaming=streaming,
            bounds=bounds,
            kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
            engine_dir_in_server=args.engine_dir_in_server,
        )
        served_repo = str(Path(args.engine_dir_in_server).parent.parent)  # tensorrt_llm/1 sits at the repository root
        serve = (
            f"tritonserver --model-repository {served_repo} inside the Triton + TensorRT-LLM 1.2 container with "
            f"canary-qwen installed and {repo} at {served_repo} (docs/deployment.md)"
        )
    models = sorted(d.name for d in repo.iterdir() if (d / "config.pbtxt").is_file())
    print(f"wrote the {args.flavor} repository {repo}: {', '.join(models)}")
    print(f"serve it: {serve}")
    return 0
