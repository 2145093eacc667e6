"""Random-weight checkpoints in exactly the real ``nvidia/canary-qwen-2.5b`` layout.

``tiny`` is small enough for CI parity tests against NeMo (``small``: the same with a 128-wide LLM for the
quantization tests); ``full`` has the real 2.5B architecture
and vocabulary (for speed work). Both add NeMo's offline extras (tokenizer files at the root and
``llm_backbone/config.json``) so NeMo's ``SALM.from_pretrained`` and this package load them offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import UsageError
from .checkpoint import LLM_BACKBONE_DIR, WEIGHTS_FILE, checkpoint_key
from .config import parse_llm_config, parse_salm_config
from .salm import CanaryQwen
from .synthetic_tokenizer import QWEN_ADDED_TOKENS, QWEN_BASE_VOCAB, build_tokenizer

SIZES: dict[str, dict] = {
    "tiny": dict(
        encoder=dict(n_layers=2, d_model=64, n_heads=4, subsampling_conv_channels=16),
        llm=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        lora=dict(r=8, lora_alpha=16),
        base_vocab=None,
    ),
    # tiny with an LLM whose every linear input is a multiple of 128, as INT4 AWQ and TensorRT-LLM's
    # quantized kernels require (``canary-qwen quantize``)
    "small": dict(
        encoder=dict(n_layers=2, d_model=64, n_heads=4, subsampling_conv_channels=16),
        llm=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        ),
        lora=dict(r=8, lora_alpha=16),
        base_vocab=None,
    ),
    "full": dict(
        encoder=dict(n_layers=32, d_model=1024, n_heads=8, subsampling_conv_channels=256),
        llm=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
        lora=dict(r=128, lora_alpha=256),
        base_vocab=QWEN_BASE_VOCAB,
    ),
}
QWEN3_VOCAB = 151936


def slaney_mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney') without librosa."""
    fmax = sr / 2 if fmax is None else fmax

    def hz_to_mel(f):
        f = np.asanyarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        log_start = 1000.0 / (200.0 / 3)
        return np.where(f >= 1000.0, log_start + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)

    def mel_to_hz(m):
        m = np.asanyarray(m, dtype=np.float64)
        log_start = 1000.0 / (200.0 / 3)
        return np.where(m >= log_start, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - log_start)), m * (200.0 / 3))

    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def salm_config(
    size: str,
    xscaling: bool = False,
    lora_targets: tuple[str, ...] | None = ("q_proj", "v_proj"),
    lora_rank: int | None = None,
) -> dict:
    spec = SIZES[size]
    enc = spec["encoder"]
    rank = {} if lora_rank is None else {"r": lora_rank, "lora_alpha": 2 * lora_rank}  # the released alpha / r
    lora = {
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.01,
        "target_modules": list(lora_targets or ()),
        **spec["lora"],
        **rank,
    }
    return {
        "pretrained_llm": "Qwen/Qwen3-1.7B",
        "pretrained_asr": "nvidia/canary-1b-flash",
        "pretrained_weights": True,
        "prompt_format": "qwen",
        "audio_locator_tag": "<|audioplaceholder|>",
        "freeze_params": ["^perception\\.preprocessor\\..+$", "^llm\\..+$"],
        "prevent_freeze_params": [],
        **({"lora": lora} if lora_targets else {}),
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "output_dim": spec["llm"]["hidden_size"],
            "modality_adapter": {
                "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                "d_model": enc["d_model"],
            },
            "preprocessor": {
                "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                "dither": 1e-05,
                "features": 128,
                "frame_splicing": 1,
                "log": True,
                "n_fft": 512,
                "normalize": "per_feature",
                "pad_to": 0,
                "pad_value": 0.0,
                "sample_rate": 16000,
                "window": "hann",
                "window_size": 0.025,
                "window_stride": 0.01,
            },
            "encoder": {
                "_target_": "nemo.collections.asr.modules.ConformerEncoder",
                "att_context_size": [-1, -1],
                "causal_downsampling": False,
                "conv_context_size": None,
                "conv_kernel_size": 9,
                "conv_norm_type": "batch_norm",
                "d_model": enc["d_model"],
                "dropout": 0.1,
                "dropout_att": 0.1,
                "dropout_emb": 0.0,
                "dropout_pre_encoder": 0.1,
                "feat_in": 128,
                "feat_out": -1,
                "ff_expansion_factor": 4,
                "n_heads": enc["n_heads"],
                "n_layers": enc["n_layers"],
                "pos_emb_max_len": 5000,
                "self_attention_model": "rel_pos",
                "subsampling": "dw_striding",
                "subsampling_conv_channels": enc["subsampling_conv_channels"],
                "subsampling_factor": 8,
                "untie_biases": True,
                "xscaling": xscaling,
            },
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4},
    }


def qwen3_config(size: str, vocab_size: int, bos_id: int, eos_id: int, head_dim: int | None = None) -> dict:
    llm = dict(SIZES[size]["llm"])
    if head_dim is not None:
        llm["head_dim"] = head_dim
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": llm["num_hidden_layers"],
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        **llm,
    }


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values with the scale a trained model has, so activations stay O(1) through every layer."""

    def normal(std):
        return torch.randn(shape, generator=gen) * std

    leaf = name.rsplit(".", 1)[-1]
    if "running_var" in name:
        return torch.rand(shape, generator=gen) + 0.5
    if "running_mean" in name:
        return normal(0.1)
    if "norm" in name and leaf == "weight" and len(shape) == 1:  # LayerNorm, RMSNorm, BatchNorm scales
        return 1.0 + normal(0.05)
    if leaf == "bias" or "pos_bias" in name:
        return normal(0.02)
    if "lora_B" in name:
        return normal(0.05)
    if name == "embed_tokens.weight":
        return normal(0.02)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return normal(1.0 / math.sqrt(fan_in))


def make_checkpoint(
    out: Path,
    size: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    *,
    xscaling: bool = False,
    lora_targets: tuple[str, ...] | None = ("q_proj", "v_proj"),
    lora_rank: int | None = None,
    head_dim: int | None = None,
) -> Path:
    """Write a random checkpoint; ``dtype`` defaults to bf16 (as released) for full, fp32 for the others.

    ``xscaling``, ``lora_targets`` and ``lora_rank`` (a checkpoint fine-tuned with another rank) vary the
    architecture so tests cover more than one config; ``head_dim`` replaces the LLM's (vLLM's CPU attention runs
    only 32, 64, 80, ... 256: tiny's 16 is not among them).
    """
    if size not in SIZES:
        raise UsageError(f"size must be one of {', '.join(SIZES)}")
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(out, base_vocab=SIZES[size]["base_vocab"])
    vocab = QWEN3_VOCAB if size == "full" else (n_tokens + 1 + 63) // 64 * 64  # room for the placeholder
    first_added = n_tokens - len(QWEN_ADDED_TOKENS)  # <|endoftext|>, <|im_start|>, <|im_end|>, ...
    cfg, llm_cfg = (
        salm_config(size, xscaling, lora_targets, lora_rank),
        qwen3_config(size, vocab, bos_id=first_added, eos_id=first_added + 2, head_dim=head_dim),
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / LLM_BACKBONE_DIR).mkdir(exist_ok=True)
    (out / LLM_BACKBONE_DIR / "config.json").write_text(json.dumps(llm_cfg, indent=2))

    salm, llm = parse_salm_config(cfg), parse_llm_config(llm_cfg)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CanaryQwen(salm, llm).state_dict().items()}
    targets = salm.lora.target_modules if salm.lora else ()
    gen = torch.Generator().manual_seed(seed)
    pre = salm.preprocessor
    window = torch.hann_window(pre.win_length, periodic=False).to(torch.bfloat16).float()
    fb = torch.from_numpy(slaney_mel_filterbank(pre.sample_rate, pre.n_fft, pre.features))[None]
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            tensors[checkpoint_key(name, targets)] = torch.zeros((), dtype=torch.int64)
            continue
        if name == "mel.window":
            value = window
        elif name == "mel.fb":
            value = fb
        else:
            value = _random_tensor(name, shape, gen)
        tensors[checkpoint_key(name, targets)] = value.to(dtype).contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
