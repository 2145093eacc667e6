"""Typed view of a Canary-Qwen (NeMo SALM) checkpoint's ``config.json`` and its LLM config.

Only the fields that change the computation are read; where the checkpoint leaves one out, the default is
the one NeMo (encoder) or transformers (Qwen3) would use, so we compute what they compute. Settings that
would change the arithmetic in a way this package does not implement are refused, never ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

SALM_REQUIRED_KEYS = ("pretrained_llm", "audio_locator_tag", "prompt_format", "perception")


@dataclass(frozen=True)
class PreprocessorConfig:
    sample_rate: int = 16000
    features: int = 128
    window_size: float = 0.025
    window_stride: float = 0.01
    n_fft: int = 512
    preemph: float = 0.97
    mag_power: float = 2.0
    log_zero_guard_value: float = 2.0**-24
    normalize: str = "per_feature"

    @property
    def win_length(self) -> int:
        return int(self.window_size * self.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.window_stride * self.sample_rate)


@dataclass(frozen=True)
class EncoderConfig:
    feat_in: int = 128
    n_layers: int = 32
    d_model: int = 1024
    n_heads: int = 8
    ff_expansion_factor: int = 4
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    conv_kernel_size: int = 9
    xscaling: bool = True
    untie_biases: bool = True
    pos_emb_max_len: int = 5000

    @property
    def d_ff(self) -> int:
        return self.d_model * self.ff_expansion_factor

    @property
    def n_subsampling_convs(self) -> int:
        return self.subsampling_factor.bit_length() - 1


@dataclass(frozen=True)
class LlmConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10_000.0  # transformers' Qwen3Config default; the released model's config says 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # transformers' default; the released model's config says true
    max_position_embeddings: int = 40960
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        # PEFT's LoraLayer.update_layer: alpha / sqrt(r) with rank-stabilised LoRA, alpha / r otherwise.
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


QWEN3_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT LoraConfig fields that change the arithmetic but are not implemented here, with their no-op values.
LORA_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "layers_to_transform": None,
    "lora_bias": False,
}


@dataclass(frozen=True)
class SalmConfig:
    pretrained_llm: str
    audio_locator_tag: str
    prompt_format: str
    output_dim: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    lora: LoraConfig | None
    raw: dict = field(compare=False, repr=False)


def _pick(cls, cfg: dict[str, Any], renames: dict[str, str] | None = None):
    """Build a dataclass from the keys of ``cfg`` it knows, keeping defaults for the rest."""
    names = {f.name for f in cls.__dataclass_fields__.values()}
    renames = renames or {}
    kwargs = {}
    for key, value in cfg.items():
        key = renames.get(key, key)
        if key in names and key != "raw" and value is not None:
            kwargs[key] = value
    return cls(**kwargs)


def parse_salm_config(cfg: dict[str, Any], source: str = "config.json") -> SalmConfig:
    missing = [k for k in SALM_REQUIRED_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"{source} is not a NeMo SALM (Canary-Qwen) config: missing {', '.join(missing)}")
    if cfg["prompt_format"] != "qwen":
        raise CheckpointError(f"{source}: prompt_format {cfg['prompt_format']!r} is not supported (only 'qwen')")
    perception = cfg["perception"]
    for key in ("preprocessor", "encoder"):
        if key not in perception:
            raise CheckpointError(f"{source}: perception.{key} is missing")
    enc = perception["encoder"]
    for key, want in (
        ("self_attention_model", "rel_pos"),
        ("subsampling", "dw_striding"),
        ("conv_norm_type", "batch_norm"),
    ):
        if enc.get(key, want) != want:
            raise CheckpointError(f"{source}: encoder {key}={enc[key]!r} is not supported (expected {want!r})")
    if list(enc.get("att_context_size", [-1, -1])) != [-1, -1]:
        raise CheckpointError(f"{source}: only full-context encoders are supported (att_context_size [-1, -1])")
    for key, neutral in (("causal_downsampling", False), ("reduction", None), ("global_tokens", 0), ("use_bias", True)):
        if enc.get(key, neutral) != neutral:
            raise CheckpointError(f"{source}: encoder {key}={enc[key]!r} is not supported (expected {neutral!r})")
    if cfg.get("encoder_chunk_size_seconds") is not None:
        raise CheckpointError(
            f"{source}: encoder_chunk_size_seconds={cfg['encoder_chunk_size_seconds']!r} (NeMo's chunked encoding) "
            "is not supported; remove it to encode each clip whole"
        )
    pre = perception["preprocessor"]
    if pre.get("normalize", "per_feature") != "per_feature":
        raise CheckpointError(f"{source}: preprocessor normalize={pre['normalize']!r} is not supported")
    lora = _parse_lora(cfg["lora"], source) if cfg.get("lora") else None
    adapter = perception.get("modality_adapter", {})
    output_dim = perception.get("output_dim", adapter.get("d_model"))
    return SalmConfig(
        pretrained_llm=cfg["pretrained_llm"],
        audio_locator_tag=cfg["audio_locator_tag"],
        prompt_format=cfg["prompt_format"],
        output_dim=int(output_dim),
        preprocessor=_pick(PreprocessorConfig, pre, {"nfilt": "features", "n_window_size": "window_size"}),
        encoder=_pick(EncoderConfig, enc),
        lora=lora,
        raw=cfg,
    )


def _parse_lora(lc: dict[str, Any], source: str) -> LoraConfig:
    targets = lc.get("target_modules")
    if isinstance(targets, str) or not targets or any(t not in QWEN3_LINEARS for t in targets):
        raise CheckpointError(
            f"{source}: lora.target_modules={targets!r} is not supported (a list of {', '.join(QWEN3_LINEARS)})"
        )
    for key, neutral in LORA_UNSUPPORTED.items():
        if lc.get(key, neutral) not in (neutral, None):
            raise CheckpointError(f"{source}: lora.{key}={lc[key]!r} is not supported")
    return LoraConfig(
        r=int(lc["r"]),
        lora_alpha=float(lc["lora_alpha"]),
        target_modules=tuple(targets),
        use_rslora=bool(lc.get("use_rslora", False)),
    )


def _rope(cfg: dict[str, Any], source: str) -> float:
    """RoPE base as transformers 5 resolves it: ``rope_parameters`` (what transformers 5 writes; it has no
    top-level ``rope_theta``) over the legacy top-level ``rope_theta``, else Qwen3Config's 10000."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    if rope_type != "default":
        raise CheckpointError(f"{source}: RoPE type {rope_type!r} is not supported (only plain RoPE, 'default')")
    return float(params.get("rope_theta", cfg.get("rope_theta", LlmConfig.rope_theta)))


def parse_llm_config(cfg: dict[str, Any], source: str = "llm config") -> LlmConfig:
    if cfg.get("model_type") not in (None, "qwen3"):
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not qwen3")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("attention_bias", False):
        raise CheckpointError(f"{source}: attention_bias true is not supported (Qwen3 has none)")
    # Qwen3Config: a window exists only with use_sliding_window, and applies to the "sliding_attention"
    # layers (by default those from max_window_layers on).
    layer_types = cfg.get("layer_types") or []
    windowed = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
    if windowed and (
        "sliding_attention" in layer_types
        or (not layer_types and cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"])
    ):
        raise CheckpointError(f"{source}: sliding-window attention layers are not supported")
    llm = _pick(LlmConfig, {**cfg, "rope_theta": _rope(cfg, source)})
    object.__setattr__(llm, "raw", dict(cfg))
    return llm


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
