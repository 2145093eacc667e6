"""How much arithmetic a transcription needs, and how close a run came to the GPU's limit.

The model's useful work is counted from the checkpoint's configs as matrix-multiply and convolution
FLOPs (2 per multiply-add; norms, activations, softmax and the mel frontend are left out, they are
memory-bound and small): per clip, the encoder on its own frames (no padding), the LLM prefill over
its prompt (text + audio frames, logits for the last position only) and one decode step per further
token. Padding, idle batch rows and tokens decoded past a clip's own budget are waste, not work, so
every backend is charged the same work for the same transcripts.

``RTFx limit = peak FLOP/s / work per audio second``: the speed at which the device would finish if
it did nothing but this arithmetic at its datasheet peak (dense tensor-core throughput).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.checkpoint import resolve_checkpoint
from ..model.config import EncoderConfig, LlmConfig, PreprocessorConfig
from ..model.prompt import prompt_ids
from ..model.tokenizer import QwenTokenizer

# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's datasheets, by dtype; more specific names first.
PEAK_TFLOPS = (
    ("GH200", {"bf16": 989.0}),
    ("H200", {"bf16": 989.0}),
    ("H100 NVL", {"bf16": 835.0}),
    ("H100 PCIe", {"bf16": 756.0}),
    ("H100", {"bf16": 989.0}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0}),
    ("L40S", {"bf16": 362.0}),
)


def peak_tflops(gpu_name: str | None, dtype: str | None) -> float | None:
    """Datasheet peak for this GPU and dtype, or None when unknown (CPUs, other GPUs, fp32)."""
    if not gpu_name or not dtype:
        return None
    for name, by_dtype in PEAK_TFLOPS:
        if name in gpu_name:
            return by_dtype.get(dtype)
    return None


@dataclass(frozen=True)
class Work:
    """FLOPs by stage."""

    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encoder + self.prefill + self.decode

    def __add__(self, other: Work) -> Work:
        return Work(self.encoder + other.encoder, self.prefill + other.prefill, self.decode + other.decode)

    def scaled(self, factor: float) -> Work:
        return Work(self.encoder * factor, self.prefill * factor, self.decode * factor)


def _conv_out(n: int) -> int:
    """Length after one stride-2, kernel-3, padding-1 convolution."""
    return (n + 2 - 3) // 2 + 1


def encoder_frames(samples: int, pre: PreprocessorConfig, enc: EncoderConfig) -> tuple[int, int]:
    """(mel frames, encoder frames) of a clip of ``samples`` samples."""
    mel = samples // pre.hop_length
    frames = mel
    for _ in range(enc.n_subsampling_convs):
        frames = _conv_out(frames)
    return mel, frames


def encoder_macs(samples: int, pre: PreprocessorConfig, enc: EncoderConfig, output_dim: int) -> int:
    """Multiply-adds of the subsampling, the conformer layers and the projection to the LLM width."""
    mel, _ = encoder_frames(samples, pre, enc)
    c, t, f = enc.subsampling_conv_channels, mel, enc.feat_in
    t, f = _conv_out(t), _conv_out(f)
    macs = t * f * c * 9  # first conv: 1 -> c channels, 3x3
    for _ in range(enc.n_subsampling_convs - 1):
        t, f = _conv_out(t), _conv_out(f)
        macs += t * f * c * (9 + c)  # depthwise 3x3 + pointwise c -> c
    d, positions = enc.d_model, 2 * t - 1
    macs += t * c * f * d  # flatten (channels x freq) -> d_model
    per_layer = (
        2 * 2 * t * d * enc.d_ff  # two half-step feed-forward modules, two linears each
        + 4 * t * d * d  # q, k, v, out
        + positions * d * d  # relative position projection
        + t * t * d
        + t * positions * d
        + t * t * d  # content scores, position scores, weighted values
        + t * d * 2 * d
        + t * d * enc.conv_kernel_size
        + t * d * d  # conv module: pointwise, depthwise, pointwise
    )
    return macs + enc.n_layers * per_layer + t * d * output_dim


def llm_token_macs(llm: LlmConfig) -> int:
    """Multiply-adds of one token through every layer's projections and MLP."""
    h, q, kv = llm.hidden_size, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    return llm.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * llm.intermediate_size)


def llm_pair_macs(llm: LlmConfig) -> int:
    """Multiply-adds of one (query, key) pair in every layer: its score and its share of the weighted values."""
    return llm.num_hidden_layers * 2 * llm.num_attention_heads * llm.head_dim


def llm_macs(llm: LlmConfig, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(prefill, decode) multiply-adds for one sequence under causal attention.

    Prefill runs the whole prompt and the output layer at its last position (the first new token);
    every further token is one decode step over the cache (the last token is never fed back).
    """
    token, pair, output = llm_token_macs(llm), llm_pair_macs(llm), llm.hidden_size * llm.vocab_size
    prefill = prompt_len * token + pair * prompt_len * (prompt_len + 1) // 2 + output
    steps = max(0, new_tokens - 1)
    # Step j feeds position prompt_len + j, which attends over prompt_len + j + 1 keys.
    keys = steps * (prompt_len + 1) + steps * (steps - 1) // 2
    return prefill, steps * (token + output) + pair * keys


class WorkModel:
    """Work of transcribing one clip with a given checkpoint and the default prompt."""

    def __init__(self, pre: PreprocessorConfig, enc: EncoderConfig, output_dim: int, llm: LlmConfig, text_tokens: int):
        self.pre, self.enc, self.output_dim, self.llm, self.text_tokens = pre, enc, output_dim, llm, text_tokens

    @classmethod
    def from_checkpoint(cls, source: str) -> WorkModel:
        """Configs and tokenizer only (no weights are read)."""
        files = resolve_checkpoint(source)
        cfg = files.config
        tokenizer = QwenTokenizer(files.tokenizer_dir, cfg.audio_locator_tag)
        text_tokens = len(prompt_ids(tokenizer, None)) - 1  # the placeholder becomes the audio frames
        return cls(cfg.preprocessor, cfg.encoder, cfg.output_dim, files.llm_config, text_tokens)

    def clip(self, samples: int, new_tokens: int) -> Work:
        _, frames = encoder_frames(samples, self.pre, self.enc)
        prefill, decode = llm_macs(self.llm, self.text_tokens + frames, new_tokens)
        return Work(2.0 * encoder_macs(samples, self.pre, self.enc, self.output_dim), 2.0 * prefill, 2.0 * decode)


def roofline_fields(work: Work, audio_s: float, wall_s: float, rtfx: float, peak: float | None) -> dict:
    """The run record's work fields: GFLOP per audio second by stage, achieved TFLOP/s, RTFx limit."""
    per_audio_s = work.scaled(1e-9 / audio_s)
    limit = peak * 1e3 / per_audio_s.total if peak else None  # TFLOP/s over GFLOP per audio second
    return {
        "gflop_per_audio_s": {
            "encoder": per_audio_s.encoder,
            "prefill": per_audio_s.prefill,
            "decode": per_audio_s.decode,
            "total": per_audio_s.total,
        },
        "model_tflops": work.total * 1e-12 / wall_s,
        "peak_tflops": peak,
        "rtfx_limit": limit,
        "of_limit": rtfx / limit if limit else None,
    }
