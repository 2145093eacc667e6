"""Random SALMs built by NeMo 3.0 itself (``SALM(cfg)`` + ``save_pretrained``), not by this package.

Their Qwen3 ``config.json`` is written by transformers (``Qwen3Config.save_pretrained``): transformers 5 puts
the RoPE base only inside ``rope_parameters``. ``legacy_rope`` writes the older top-level ``rope_theta``
instead (the released checkpoint's layout). Weights are redrawn with a trained model's scales so greedy
decoding is not degenerate (NeMo's own initialisation makes every clip decode to the same token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from conftest import make_clip

from canary_qwen.model.synthetic import _random_tensor, salm_config
from canary_qwen.model.synthetic_tokenizer import QWEN_ADDED_TOKENS, build_tokenizer


@dataclass(frozen=True)
class Shape:
    """One SALM architecture: encoder, LoRA and Qwen3 settings (everything else as in ``salm_config``)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    conv_kernel_size: int = 9
    xscaling: bool = False
    untie_biases: bool = True
    lora_targets: tuple[str, ...] | None = ("q_proj", "v_proj")
    lora_r: int = 8
    use_rslora: bool = False
    llm: dict = field(default_factory=dict)  # Qwen3Config overrides (layers, heads, kv heads, head_dim, rope)
    legacy_rope: bool = False


# name -> (shape, prompt); the released architecture first, with a transformers-5 written Qwen3 config.
CASES = {
    "released-shape": (Shape(), None),
    "tied-biases-xscaling": (
        Shape(
            n_layers=3,
            n_heads=2,
            conv_kernel_size=5,
            xscaling=True,
            untie_biases=False,
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
            lora_r=4,
            legacy_rope=True,
            llm={"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        ),
        "Écris ce que tu entends :",
    ),
    "wide-heads-no-lora": (
        Shape(
            n_layers=1,
            d_model=32,
            n_heads=8,
            conv_kernel_size=3,
            xscaling=True,
            lora_targets=None,
            llm={
                "num_key_value_heads": 1,
                "head_dim": 32,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
            },
        ),
        "以下の音声を書き起こしてください：",
    ),
    "mlp-rslora-tied": (
        Shape(
            conv_kernel_size=15,
            untie_biases=False,
            lora_targets=("q_proj", "gate_proj", "up_proj", "down_proj"),
            lora_r=2,
            use_rslora=True,
            llm={"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8},
        ),
        "Repeat after me:",
    ),
}


def _qwen_dir(out: Path, shape: Shape) -> tuple[Path, int]:
    """Tokenizer files + a transformers-written Qwen3 config.json; returns the directory and hidden size."""
    from transformers import Qwen3Config

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(out)
    first_added = n_tokens - len(QWEN_ADDED_TOKENS)  # <|endoftext|>, <|im_start|>, <|im_end|>, ...
    args = {
        "vocab_size": (n_tokens + 1 + 63) // 64 * 64,  # room for the audio placeholder NeMo adds
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "bos_token_id": first_added,
        "eos_token_id": first_added + 2,
        **shape.llm,
    }
    Qwen3Config(**args).save_pretrained(out)
    if shape.legacy_rope:  # transformers 4 layout: top-level rope_theta, no rope_parameters
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        path.write_text(json.dumps(cfg, indent=2))
    return out, args["hidden_size"]


def build_nemo_salm(out: Path, shape: Shape, seed: int):
    """Build, redraw and ``save_pretrained`` a SALM with NeMo into ``out``; returns the NeMo model (eval)."""
    from nemo.collections.speechlm2.models import SALM

    qwen, hidden = _qwen_dir(out.parent / f"{out.name}-qwen", shape)
    cfg = salm_config("tiny", shape.xscaling, shape.lora_targets)
    cfg.update(pretrained_llm=str(qwen), pretrained_weights=False)
    cfg["perception"]["output_dim"] = hidden
    cfg["perception"]["modality_adapter"]["d_model"] = shape.d_model
    cfg["perception"]["encoder"].update(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        conv_kernel_size=shape.conv_kernel_size,
        untie_biases=shape.untie_biases,
    )
    if shape.lora_targets:
        cfg["lora"].update(r=shape.lora_r, lora_alpha=2 * shape.lora_r, use_rslora=shape.use_rslora)
    torch.manual_seed(seed)
    model = SALM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    saved = model.state_dict()
    with torch.no_grad():
        # named_parameters() lists a shared tensor once (tied embeddings, untied=False biases): redrawn once.
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in saved and "preprocessor" not in name and tensor.is_floating_point():
                tensor.copy_(_random_tensor(name, tuple(tensor.shape), gen))
    model.save_pretrained(out)
    return model


@dataclass(frozen=True)
class Mismatch:
    backend: str
    batch: str  # "alone" or "mixed"
    seconds: float
    nemo: list[int]
    ours: list[int]


def sweep_clip(seconds: float, seed: int):
    """The test clip of one length for one seed: the same wherever it appears, so a failure replays."""
    return make_clip(seconds, seed * 100_000 + round(seconds * 1000))


def compare_with_nemo(nemo, backends, clips, seconds, prompt, max_new_tokens) -> tuple[list[list[int]], list[Mismatch]]:
    """Greedy tokens of every backend against NeMo's ``generate``: each clip alone, then all in one
    mixed-length batch. Returns NeMo's tokens for the clips alone and every disagreement."""
    from nemo_ref import nemo_generate

    prompt_text = "Transcribe the following:" if prompt is None else prompt
    alone = [nemo_generate(nemo, [c], max_new_tokens, prompt=prompt_text)[0] for c in clips]
    mixed = nemo_generate(nemo, clips, max_new_tokens, prompt=prompt_text)
    found = []
    for backend in backends:
        for clip, secs, want in zip(clips, seconds, alone):
            got = backend.transcribe([clip], prompt=prompt, max_new_tokens=max_new_tokens)[0].token_ids
            if got != want:
                found.append(Mismatch(backend.name, "alone", secs, want, got))
        got_mixed = [t.token_ids for t in backend.transcribe(clips, prompt=prompt, max_new_tokens=max_new_tokens)]
        for secs, want, got in zip(seconds, mixed, got_mixed):
            if got != want:
                found.append(Mismatch(backend.name, "mixed", secs, want, got))
    return alone, found
