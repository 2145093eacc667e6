"""Typed view of a Canary-Qwen (NeMo SALM) checkpoint's ``config.json`` and its LLM config.

Only the fields that change the computation are read; NeMo's defaults apply where the
checkpoint leaves a field out, so a config written by NeMo and one written by hand agree.
"""

from __future__ import annotations

import json
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
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


@dataclass(frozen=True)
class SalmConfig:
    pretrained_llm: str
    audio_locator_tag: str
    prompt_format: str
    output_dim: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    lora: LoraConfig | None
    encoder_chunk_size_seconds: float | None
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
    pre = perception["preprocessor"]
    if pre.get("normalize", "per_feature") != "per_feature":
        raise CheckpointError(f"{source}: preprocessor normalize={pre['normalize']!r} is not supported")
    lora = None
    if cfg.get("lora"):
        lc = cfg["lora"]
        lora = LoraConfig(
            r=int(lc["r"]), lora_alpha=float(lc["lora_alpha"]), target_modules=tuple(lc["target_modules"])
        )
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
        encoder_chunk_size_seconds=cfg.get("encoder_chunk_size_seconds"),
        raw=cfg,
    )


def parse_llm_config(cfg: dict[str, Any], source: str = "llm config") -> LlmConfig:
    if cfg.get("model_type") not in (None, "qwen3"):
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not qwen3")
    llm = _pick(LlmConfig, cfg)
    if "head_dim" not in cfg:
        llm = _pick(LlmConfig, {**cfg, "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"]})
    object.__setattr__(llm, "raw", dict(cfg))
    return llm


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
