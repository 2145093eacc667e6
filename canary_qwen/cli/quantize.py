"""``canary-qwen quantize``: the export's merged Qwen3 quantized with NVIDIA Model Optimizer."""

from __future__ import annotations

# The method names, without importing the module (and torch) to build the parser.
METHODS = ("int4_awq", "int8_sq", "fp8", "int8_wo")


def add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize the merged Qwen3 for TensorRT-LLM (INT4 AWQ, INT8 SmoothQuant, FP8, INT8 weight-only)",
        description="Calibrate and quantize an export's llm_merged with NVIDIA Model Optimizer (the [quant] extra) on "
        "prompts holding real encoder embeddings of the --calib audio (default: sentences spoken by espeak-ng). "
        "Writes EXPORT/llm_METHOD/trtllm_checkpoint (`canary-qwen build-engines --quantized METHOD` builds it, on a "
        "GPU with TensorRT-LLM) and EXPORT/llm_METHOD/hf (a quantized Hugging Face checkpoint), and records both in "
        "the manifest. Runs on a CPU (slowly at full size); --device cuda calibrates on a GPU.",
    )
    p.add_argument("--artifacts", required=True, help="export directory (`canary-qwen export`)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--calib", nargs="+", metavar="FILE", help="audio files to calibrate on (default: espeak-ng speech)")
    p.add_argument("--calib-count", type=int, default=8, help="clips to calibrate on (default: 8)")
    p.add_argument("--calib-batch", type=int, default=4, help="clips per calibration forward (default: 4)")
    p.add_argument(
        "--dtype", choices=("bf16", "fp16"), default="bf16", help="dtype of the unquantized layers (default: bf16)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(run=run_quantize)


def run_quantize(args) -> int:
    from ..quantize_llm import quantize_llm

    result = quantize_llm(
        args.artifacts,
        args.method,
        calib_files=args.calib,
        calib_count=args.calib_count,
        calib_batch=args.calib_batch,
        dtype=args.dtype,
        device=args.device,
    )
    print(f"wrote {result.trtllm_checkpoint} (TensorRT-LLM) and {result.hf_checkpoint} (Hugging Face)")
    return 0
