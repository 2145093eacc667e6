"""``canary-qwen export``: ONNX graphs, the merged Qwen3 checkpoint and a manifest."""

from __future__ import annotations

from ..defaults import MAX_WINDOW_S
from ..export.quantize_onnx import METHODS, TARGETS
from ..precision import Precision


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write ONNX graphs, the merged Qwen3 checkpoint and a manifest",
        description="Export a checkpoint for deployment: encoder.onnx (waveform -> LLM embeddings, one graph, no "
        "STFT op), decoder.onnx (merged-LoRA Qwen3 step with KV cache), embed_tokens.npy, tokenizer/, llm_merged/ "
        "(Hugging Face Qwen3 with explicit lm_head for TensorRT-LLM) and manifest.json (versions, shapes, hashes). "
        "With --precision bf16|fp16 a reduced-precision encoder graph for TensorRT is added and llm_merged is in that "
        "precision. --quantize int8|int4 adds decoder_int8|int4.onnx (weight-only MatMulNBits, what ONNX Runtime then "
        "runs); --target jetson is fp16 + int4 with the fp16 encoder graph run by ONNX Runtime (docs/deployment.md).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--precision",
        choices=Precision.choices(*Precision.floats()),
        default="fp32",
        help="TensorRT/TensorRT-LLM precision (default: fp32)",
    )
    p.add_argument(
        "--quantize",
        choices=tuple(METHODS),
        help="also write a decoder graph with weight-only quantized MatMuls for ONNX Runtime (default: none)",
    )
    p.add_argument(
        "--target",
        choices=tuple(TARGETS),
        help="device profile; jetson: fp16 encoder + int4 decoder graphs (sets --precision and --quantize)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines are built for (default: 8)")
    p.add_argument(
        "--max-audio-s",
        type=float,
        default=MAX_WINDOW_S,
        help="longest clip the engines are built for (default: %(default)s)",
    )
    p.add_argument(
        "--lora-adapter",
        action="store_true",
        help="also write llm_base/ (Qwen3 without the LoRA) and lora/ (the LoRA as a PEFT adapter): vLLM then "
        "transcribes through the adapter and answers text prompts without it (`canary-qwen ask`)",
    )
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from ..export.artifacts import export_all

    if args.target and (args.quantize or args.precision != "fp32"):
        print(f"note: --target {args.target} sets the precision and quantization itself")

    manifest = export_all(
        args.model,
        args.out,
        precision=args.precision,
        quantize=args.quantize,
        target=args.target,
        max_batch=args.max_batch,
        max_audio_s=args.max_audio_s,
        lora_adapter=args.lora_adapter,
    )
    print(f"wrote {', '.join(manifest.data['artifacts'])} and manifest.json to {manifest.root}")
    return 0
