"""Export the encoder and decoder graphs to ONNX (opset 17, dynamic batch and length)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx import external_data_helper

from ..model.salm import CanaryQwen
from .decoder_graph import DecoderGraph, cache_names
from .encoder_graph import EncoderGraph

OPSET = 17
ENCODER_INPUTS = ["audio", "audio_lengths"]
ENCODER_OUTPUTS = ["embeddings", "embedding_lengths"]
DECODER_INPUTS = ["inputs_embeds", "attention_mask", "position_ids"]


def _consolidate_external_data(scratch: Path, path: Path) -> list[Path]:
    """Move a graph exported into ``scratch`` to ``path``; weights past the 2 GB protobuf limit, which
    the exporter scatters over one file per tensor, are streamed into one ``<name>.data`` file."""
    model = onnx.load(str(scratch / path.name), load_external_data=False)
    external = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    written = [path]
    if external:
        data_path = path.with_name(path.name + ".data")
        with open(data_path, "wb") as out:
            for tensor in external:
                info = external_data_helper.ExternalDataInfo(tensor)
                with open(scratch / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    blob = src.read(info.length) if info.length else src.read()
                out.seek(-out.tell() % 4096, 1)  # page-aligned, so runtimes can mmap each tensor
                offset = out.tell()
                out.write(blob)
                del tensor.external_data[:]
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(blob)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        written.append(data_path)
    onnx.save_model(model, str(path))
    return written


def _export(module, args, path: Path, input_names, output_names, dynamic_axes) -> list[Path]:
    """Export, check, and return the files written (the graph, and its ``.data`` file when large)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about python ints in shape arithmetic
            torch.onnx.export(
                module,
                args,
                str(Path(scratch) / path.name),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        written = _consolidate_external_data(Path(scratch), path)
    onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit
    return written


def export_encoder(model: CanaryQwen, path: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """``audio`` [B, S] float32 + ``audio_lengths`` [B] int64 -> ``embeddings`` [B, T, H] + ``embedding_lengths`` [B]."""
    graph = EncoderGraph(model, dtype).eval()
    # Two clips of different lengths so every mask is traced as data-dependent, not constant.
    sample_rate = model.cfg.preprocessor.sample_rate
    audio = torch.randn(2, 3 * sample_rate) * 0.1
    lengths = torch.tensor([3 * sample_rate, 2 * sample_rate + 123])
    axes = {
        "audio": {0: "batch", 1: "samples"},
        "audio_lengths": {0: "batch"},
        "embeddings": {0: "batch", 1: "frames"},
        "embedding_lengths": {0: "batch"},
    }
    return _export(graph, (audio, lengths), path, ENCODER_INPUTS, ENCODER_OUTPUTS, axes)


def export_decoder(model: CanaryQwen, path: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    """One step of the merged-LoRA Qwen3 with a KV cache (see ``decoder_graph``); merges ``model``'s LoRA in place."""
    graph = DecoderGraph(model, dtype).eval()
    past, present = cache_names(len(graph.llm.layers))
    axes = {
        "inputs_embeds": {0: "batch", 1: "steps"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "steps"},
        "logits": {0: "batch"},
        **{name: {0: "batch", 2: "past"} for name in past},
        **{name: {0: "batch", 2: "total"} for name in present},
    }
    return _export(graph, graph.example_inputs(), path, DECODER_INPUTS + past, ["logits"] + present, axes)


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
