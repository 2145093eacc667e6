"""Fold the LoRA into Qwen3 and write a plain Hugging Face ``Qwen3ForCausalLM`` checkpoint directory
(the input of TensorRT-LLM's qwen ``convert_checkpoint.py``; also loads in ``transformers``).

The merge is ``W + (lora_alpha / r) * B @ A`` in fp32, cast to the output dtype afterwards. Tensors
are read one at a time from the memory-mapped source and streamed into the safetensors file(s), so
memory holds one tensor (in fp32) at a time, never a second copy of the model.

TensorRT-LLM's qwen converter needs an explicit ``lm_head.weight`` for a tied qwen3 checkpoint and globs
every ``*.safetensors`` in the directory, so the head is written out and stale shards are removed first
(docs/tensorrt-llm.md, "Merged checkpoint", gives the sources).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError, UsageError
from ..model.checkpoint import checkpoint_key, resolve_checkpoint
from ..model.qwen3 import Qwen3
from ..model.tokenizer import QwenTokenizer
from ..precision import Precision

SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
MAX_SHARD_BYTES = 4 * 1024**3
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def _plan(files, lora_targets) -> list[tuple[str, str, list[str]]]:
    """(HF name, checkpoint base key, [lora_A key, lora_B key] or []) for every output tensor."""
    with torch.device("meta"):
        names = list(Qwen3(files.llm_config, files.config.lora).state_dict())
    plan: list[tuple[str, str, list[str]]] = [("model.embed_tokens.weight", "embed_tokens.weight", [])]
    for name in names:
        if name.endswith((".lora_A", ".lora_B")):
            continue
        key = checkpoint_key(f"llm.{name}", lora_targets)
        stem = name.rsplit(".", 1)[0]
        lora = []
        if f"{stem}.lora_A" in names:
            lora = [checkpoint_key(f"llm.{stem}.lora_{x}", lora_targets) for x in "AB"]
        plan.append((f"model.{name}", key, lora))
    return plan


def _tensor_bytes(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _write_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], produce) -> None:
    """Write a safetensors file whose tensors come one at a time from ``produce(name)``."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
            f.write(_tensor_bytes(t))


def _copy_tokenizer(src: Path, out: Path, placeholder: str) -> None:
    """Copy the tokenizer files; the audio placeholder is dropped if a saved tokenizer carries it."""
    for name in TOKENIZER_COPY:
        if not (src / name).is_file():
            continue
        if name == "tokenizer.json":
            data = json.loads((src / name).read_text())
            data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != placeholder]
            (out / name).write_text(json.dumps(data, ensure_ascii=False))
        elif name == "tokenizer_config.json":
            data = json.loads((src / name).read_text())
            decoder = data.get("added_tokens_decoder", {})
            data["added_tokens_decoder"] = {k: v for k, v in decoder.items() if v.get("content") != placeholder}
            for key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(data.get(key), list):
                    data[key] = [
                        t for t in data[key] if (t.get("content") if isinstance(t, dict) else t) != placeholder
                    ]
            (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            shutil.copyfile(src / name, out / name)


def merge_lora_checkpoint(
    source, out_dir, *, dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES, merge: bool = True
) -> Path:
    """Write ``out_dir`` as a Hugging Face Qwen3 checkpoint with the LoRA merged; returns ``out_dir``.

    ``merge=False`` writes the base Qwen3 instead (the LoRA left out; :func:`write_lora_adapter` writes it).

    ``dtype``: "bfloat16", "float32" or "float16" (the merge itself is always fp32). Weights larger
    than ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors`` plus an index.
    """
    precision = Precision.parse_float(dtype)
    out_dtype = precision.torch_dtype
    files = resolve_checkpoint(source)
    tokenizer = QwenTokenizer(files.tokenizer_dir, files.config.audio_locator_tag)
    lora = files.config.lora
    targets = lora.target_modules if lora else ()
    llm = files.llm_config
    try:
        src = safe_open(str(files.weights), framework="pt")
    except Exception as e:  # SafetensorError, OSError: truncated or not safetensors
        raise CheckpointError(f"{files.weights} is not a readable safetensors file: {e}") from None
    keys = set(src.keys())
    plan = _plan(files, targets)
    head_key = checkpoint_key("lm_head.weight", targets)
    untied = head_key in keys and not llm.tie_word_embeddings
    plan.append(("lm_head.weight", head_key if untied else "embed_tokens.weight", []))
    missing = sorted({k for _, base, ab in plan for k in [base, *ab] if k not in keys})
    if missing:
        raise CheckpointError(f"{files.weights} lacks {len(missing)} LLM tensors, e.g. {', '.join(missing[:4])}")
    sources = {name: (base, ab) for name, base, ab in plan}

    scaling = lora.scaling if lora else 0.0

    def produce(name: str) -> torch.Tensor:
        base, ab = sources[name]
        w = src.get_tensor(base)  # noqa: F821 - deleted only after the last call
        if ab and merge:
            a, b = (src.get_tensor(k).float() for k in ab)  # noqa: F821
            w = w.float() + (b @ a) * scaling
        return w.to(out_dtype)

    item = torch.empty((), dtype=out_dtype).element_size()
    entries = [(name, out_dtype, tuple(src.get_slice(base).get_shape())) for name, base, _ in plan]
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        n = torch.Size(entry[2]).numel() * item
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n

    out = Path(out_dir)
    if out.resolve() == files.root.resolve():
        raise UsageError(f"out_dir {out} is the checkpoint directory itself; pick another")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / INDEX_NAME]:  # TRT-LLM's loader globs *.safetensors
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _write_safetensors(out / WEIGHTS_NAME, shards[0], produce)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / fname, shard, produce)
            weight_map.update({name: fname for name, _, _ in shard})
        total = sum(torch.Size(s).numel() * item for _, _, s in entries)
        (out / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    del src

    config = {k: v for k, v in llm.raw.items() if k != "_name_or_path"}
    config.update(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        torch_dtype=precision.long_name,
        dtype=precision.long_name,
        head_dim=llm.head_dim,
        rope_theta=llm.rope_theta,
        tie_word_embeddings=not untied,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "do_sample": False,
        "num_beams": 1,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    if llm.raw.get("bos_token_id") is not None:
        generation["bos_token_id"] = llm.raw["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _copy_tokenizer(files.tokenizer_dir, out, files.config.audio_locator_tag)
    return out


def write_lora_adapter(source, out_dir) -> Path:
    """Write the checkpoint's LoRA as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``, PEFT's key names) for engines that apply it per request (vLLM)."""
    from safetensors.torch import save_file

    files = resolve_checkpoint(source)
    lora = files.config.lora
    if lora is None:
        raise CheckpointError(f"{files.root} has no LoRA to write as an adapter")
    adapter = {}
    with safe_open(str(files.weights), framework="pt") as src:
        for _, _, ab in _plan(files, lora.target_modules):
            for key in ab:  # llm.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight
                adapter[key.removeprefix("llm.").replace(".default.", ".")] = src.get_tensor(key).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": list(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
