"""Weight-only quantization of the decoder graph for ONNX Runtime (``export --quantize int8|int4``).

Every MatMul with a constant weight (the Qwen3 projections, MLPs and the output layer) becomes a
``com.microsoft.MatMulNBits`` node with 8- or 4-bit weights in blocks along the input dimension, one
fp32 scale per block (symmetric). Attention's activation-by-activation MatMuls stay fp32, and so do
norms, RoPE and the KV cache: the graph keeps decoder.onnx's inputs and outputs, so the runtime code
that drives decoder.onnx drives this one unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError, import_optional

QUANTIZED_OP = "MatMulNBits"


@dataclass(frozen=True)
class WeightQuantization:
    """What the manifest records about a quantized graph."""

    bits: int
    block_size: int = 32  # inputs per scale; 32 is onnxruntime-genai's default for int4 on CPU
    symmetric: bool = True
    # 4: activations are quantized to int8 inside the op and the dot products run in int8 (VNNI/AMX on a
    # CPU); other providers ignore it. The agreement in docs/accuracy.md was measured with it.
    accuracy_level: int = 4
    tool: str = "onnxruntime.quantization.MatMulNBitsQuantizer"

    @property
    def method(self) -> str:
        return f"int{self.bits}"

    def record(self) -> dict:
        return {"method": self.method, **asdict(self)}


METHODS = {"int8": WeightQuantization(bits=8), "int4": WeightQuantization(bits=4)}
# Device profiles (``export --target``): the TensorRT precision and the decoder quantization each sets.
TARGETS = {"jetson": {"precision": "fp16", "quantize": "int4"}}


def parse_method(name: str) -> WeightQuantization:
    if name not in METHODS:
        raise UsageError(f"unknown quantization {name!r} (one of {', '.join(METHODS)})")
    return METHODS[name]


def quantize_decoder(source: Path, path: Path, spec: WeightQuantization) -> list[Path]:
    """Write ``source`` (decoder.onnx) with MatMulNBits weights to ``path`` and ``path``.data; returns both."""
    import onnx

    # onnxruntime's quantizer imports onnx_ir, which onnxruntime itself does not require.
    import_optional("onnx_ir", "onnx-ir for `export --quantize` (pip install 'canary-qwen[export]')")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)),
        bits=spec.bits,
        block_size=spec.block_size,
        is_symmetric=spec.symmetric,
        accuracy_level=spec.accuracy_level,
    )
    quantizer.process()
    # Always external data: an int8 full-size decoder is over protobuf's 2 GB limit.
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    onnx.checker.check_model(str(path))
    return [path, path.with_name(path.name + ".data")]
