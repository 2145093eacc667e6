"""The whole Canary-Qwen model in plain PyTorch: mel -> FastConformer -> projection -> Qwen3 (+LoRA)."""

from __future__ import annotations

import re

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import CheckpointError
from .checkpoint import CheckpointFiles, checkpoint_key, resolve_checkpoint
from .config import LlmConfig, SalmConfig
from .conformer import ConformerEncoder
from .mel import MelFrontend
from .qwen3 import Qwen3
from .tokenizer import QwenTokenizer

IGNORED_SUFFIXES = ("num_batches_tracked",)


class CanaryQwen(nn.Module):
    def __init__(self, cfg: SalmConfig, llm_cfg: LlmConfig, tie_embeddings: bool = True):
        super().__init__()
        self.cfg, self.llm_cfg = cfg, llm_cfg
        self.mel = MelFrontend(cfg.preprocessor)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.proj = nn.Linear(cfg.encoder.d_model, cfg.output_dim)
        self.embed_tokens = nn.Embedding(llm_cfg.vocab_size, llm_cfg.hidden_size)
        self.llm = Qwen3(llm_cfg, cfg.lora)
        self.lm_head = None if tie_embeddings else nn.Linear(llm_cfg.hidden_size, llm_cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype  # the embeddings stay dense when the fast path packs linears

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def frames_per_second(self) -> float:
        pre = self.cfg.preprocessor
        return pre.sample_rate / (pre.hop_length * self.cfg.encoder.subsampling_factor)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveform [B, S] float32 + lengths [B] -> LLM embeddings [B, T, H] (model dtype) + lengths [B].

        The mel frontend always runs in fp32 (NeMo does the same), the rest in the model dtype.
        """
        mel, mel_lens = self.mel(audio, lengths)
        enc, enc_lens = self.encoder(mel.to(self.dtype), mel_lens)
        return self.proj(enc), enc_lens

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.output_weight()).float()

    def merge_lora(self) -> None:
        self.llm.merge_lora()


def _open_weights(path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


SHARED_BIAS = re.compile(r"^(perception\.encoder\.layers\.)\d+(\.self_attn\.pos_bias_[uv])$")


def _source_key(key: str, present: dict, shared_biases: bool) -> str:
    """The checkpoint tensor that fills ``key``. With ``untie_biases: false`` NeMo's encoder gives every
    layer one shared pos_bias_u / pos_bias_v, which ``save_pretrained`` stores once, under layer 0's name;
    each of our layers reads that copy."""
    if shared_biases and key not in present:
        return SHARED_BIAS.sub(r"\g<1>0\g<2>", key)
    return key


def load_state(model: CanaryQwen, weights, source: str, skip: tuple[str, ...] = ()) -> None:
    """Copy tensors from an open safetensors file into ``model``, one at a time (the 2.5B model is
    never held twice). Every key must be known and every shape must match, or nothing is loaded."""
    targets = model.cfg.lora.target_modules if model.cfg.lora else ()
    own = model.state_dict()
    shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys() if k not in skip}
    shared_biases = not model.cfg.encoder.untie_biases
    sources = [(_source_key(checkpoint_key(name, targets), shapes, shared_biases), name) for name in own]
    used = {ckpt_name for ckpt_name, _ in sources}
    problems = []
    missing = sorted(k for k in used if k not in shapes)
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {', '.join(missing[:4])}")
    unexpected = sorted(k for k in shapes if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:4])}")
    for ckpt_name, name in sources:
        if ckpt_name in shapes and shapes[ckpt_name] != tuple(own[name].shape):
            problems.append(f"{ckpt_name}: shape {shapes[ckpt_name]} but the config implies {tuple(own[name].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for ckpt_name, name in sources:
            try:
                own[name].copy_(weights.get_tensor(ckpt_name))
            except (SafetensorError, RuntimeError) as e:
                raise CheckpointError(
                    f"{source}: tensor {ckpt_name} could not be read (truncated file?): {e}"
                ) from None


STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(weights) -> torch.dtype:
    """The checkpoint's own floating dtype: bf16 or fp16 where every floating tensor has it, else fp32."""
    kinds = {weights.get_slice(k).get_dtype() for k in weights.keys()}
    floats = {kind for kind in kinds if kind.startswith(("F", "BF"))}  # F16, BF16, F32, F64, F8_*
    return STORED_DTYPES[floats.pop()] if len(floats) == 1 and floats <= STORED_DTYPES.keys() else torch.float32


def load_model(
    source,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    merge_lora: bool = False,
) -> tuple[CanaryQwen, QwenTokenizer, CheckpointFiles]:
    """Load a checkpoint directory or hub id in ``dtype`` (None: as the checkpoint stores it). The mel
    buffers stay fp32 whatever ``dtype`` is."""
    files = resolve_checkpoint(source)
    weights = _open_weights(files.weights)
    lora_targets = files.config.lora.target_modules if files.config.lora else ()
    lm_head = checkpoint_key("lm_head.weight", lora_targets)
    untied = lm_head in weights.keys() and not files.llm_config.tie_word_embeddings
    if dtype is None:
        dtype = stored_dtype(weights)
    with torch.device("meta"):
        model = CanaryQwen(files.config, files.llm_config, tie_embeddings=not untied)
        # Tensors are read straight into the dtype asked for: a bf16 load never holds an fp32 model.
        for name, module in model.named_children():
            if name != "mel":
                module.to(dtype=dtype)
    model = model.to_empty(device="cpu")
    # A tied lm_head saved next to embed_tokens is the same tensor: read embed_tokens only.
    load_state(model, weights, str(files.weights), skip=() if untied else (lm_head,))
    del weights
    if merge_lora:
        model.merge_lora()
    model.eval().requires_grad_(False)
    model.to(device=device)
    tokenizer = QwenTokenizer(files.tokenizer_dir, files.config.audio_locator_tag)
    if len(tokenizer) > files.llm_config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the LLM vocab is {files.llm_config.vocab_size}"
        )
    return model, tokenizer, files
