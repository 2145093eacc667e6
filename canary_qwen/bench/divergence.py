"""Where and why greedy tokens part in reduced precision.

In fp32 every path here is token-identical to NeMo. In bf16 they may not be: a different order of
operations (packed vs padded prefill, LoRA merged vs applied, other kernels) rounds differently, and
greedy decoding follows whichever of two near-tied tokens comes out on top. This module runs the
paths in one dtype, finds the first step where each differs from the reference (this package's
``torch`` backend, NeMo-exact in fp32, run in the same dtype) and, at that step, asks the fp32 reference (teacher
forced on the common prefix) how far apart the two candidate tokens really are, next to how far
the reduced-precision logits are from fp32 there. A divergence whose fp32 gap is below that error is
a rounding near-tie, not a bug.

An export's ONNX Runtime graphs (``--export DIR``: a quantized decoder when the export has one) are
one more path; their error at the parting step is that of their own teacher-forced logits.

``--mode llm`` does the same for LLM mode: text-only questions answered with the LoRA off (torch, torch-fast and
vLLM; NeMo and ONNX Runtime do not answer them here).

    python -m canary_qwen.bench.divergence --model CKPT --dtype bf16 --device cuda [--nemo]
    python -m canary_qwen.bench.divergence --model CKPT --dtype fp32 --export EXPORT_DIR
    python -m canary_qwen.bench.divergence --model CKPT --dtype int8   # the fast path's int8 vs fp32
    python -m canary_qwen.bench.divergence --model CKPT --dtype int8 --mode llm
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch

from ..backends.base import Answerer
from ..backends.fast_torch import FastTorchBackend
from ..backends.onnx_runtime import OnnxBackend
from ..backends.torch_ref import TorchBackend
from ..decoding import splice_and_pad
from ..errors import CanaryQwenError, UsageError
from ..model.generate import splice_audio
from ..model.prompt import Turn, dialogue_ids, prompt_ids
from ..model.qwen3 import adapter_off
from ..modes import ASR, LLM
from ..precision import Precision
from ..registry import create_backend
from .data import synthetic_set

# LLM mode's questions (random weights answer anything alike; what matters is prompts of several lengths).
QUESTIONS = (
    "Summarise this call in one sentence.",
    "What was decided about the budget for next year, and who will follow it up?",
    "List the three action items.",
    "Was the customer satisfied?",
)


@dataclass
class Divergence:
    clip: int  # the index of the clip (ASR mode) or the dialogue (LLM mode)
    path: str  # the path compared with the reference
    step: int | None  # first differing token, None when identical
    reference_token: int | None = None  # None: that side stopped (eos) here
    path_token: int | None = None
    fp32_gap: float | None = None  # fp32 logit of the reference's token minus the path's
    logit_error: float | None = None  # max |reduced-precision logits - fp32 logits| at that step
    fp32_choice: str | None = None  # "reference", "path" or "other": whose token fp32 greedy picks


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's tokens a path reproduces before each clip's first parting."""
    kept = 0
    for path, ref in zip(tokens, reference):
        step = first_difference(ref, path)
        kept += len(ref) if step is None else step
    return kept / max(1, sum(len(r) for r in reference))


def mode_of(source) -> str:
    """ASR for a clip (samples), LLM for a dialogue (turns)."""
    return ASR if isinstance(source, np.ndarray) else LLM


@torch.inference_mode()
def forced_logits(backend: TorchBackend, source, prefix: list[int]) -> torch.Tensor:
    """fp32 logits [V] of the next token after the prompt and ``prefix`` (one full forward): the prompt is a clip's
    (ASR mode, through the LoRA) or a dialogue's (LLM mode, the LoRA off)."""
    model, tok = backend.model, backend.tokenizer
    if mode_of(source) == ASR:
        rows, _ = splice_audio(model, [prompt_ids(tok, None)], backend.encode([source]), tok.placeholder_id)
    else:
        rows = model.embed_tokens(torch.tensor([dialogue_ids(tok, source)], device=model.device))
    if prefix:
        rows = torch.cat((rows, model.embed_tokens(torch.tensor([prefix], device=model.device))), dim=1)
    length = rows.shape[1]
    with adapter_off(model) if mode_of(source) == LLM else nullcontext():
        hidden = model.llm(
            rows,
            torch.arange(length, device=model.device)[None],
            torch.ones(1, length, dtype=torch.bool, device=model.device),
        )
    return model.logits(hidden[0, -1]).float()


def onnx_forced_logits(backend: OnnxBackend, audio: np.ndarray, prefix: list[int]) -> torch.Tensor:
    """What :func:`forced_logits` computes, through the export's ONNX Runtime graphs (one decoder call)."""
    tok = backend.tokenizer
    rows, valid = splice_and_pad(
        [prompt_ids(tok, None)], backend.encoder([audio]), backend.embed_table.__getitem__, tok.placeholder_id
    )
    rows = np.concatenate((rows, backend.embed_table[np.asarray(prefix, dtype=np.int64)][None]), axis=1)
    length = rows.shape[1]
    positions = np.arange(length, dtype=np.int64)[None]
    logits, _ = backend.decoder(rows, np.ones((1, length), dtype=np.int64), positions, backend.decoder.empty_caches(1))
    return torch.from_numpy(logits[0])


def reference_dtype(dtype: str) -> str:
    """The reference's precision: ``dtype`` itself, fp32 for the fast path's int8 (which has no reference)."""
    return "fp32" if dtype == Precision.INT8 else dtype


def run_paths(
    model: str,
    sources,
    budget: int,
    dtype: str,
    device: str,
    nemo: bool,
    export: str | None = None,
    vllm_export: str | None = None,
) -> dict[str, list[list[int]]]:
    """Tokens of each path in ``dtype`` for ``sources`` (clips, or dialogues: LLM mode), one path loaded at a time so
    a full-size model fits; with ``export``, also that export's ONNX Runtime graphs as path "onnx" (whatever
    precision they were written in); with ``vllm_export`` (an export of ``model`` whose llm_merged is in ``dtype``)
    the vllm path."""
    llm = mode_of(sources[0]) == LLM
    if llm and (nemo or export is not None):
        raise UsageError(
            "LLM mode's divergences are measured for torch, torch-fast and vllm: leave out nemo and export"
        )
    paths = {"reference": ("torch", model), "torch-fast": ("torch-fast", model)}
    if nemo:
        paths["nemo"] = ("nemo", model)
    if export is not None:
        paths["onnx"] = ("onnx", export)
    if vllm_export is not None:
        paths["vllm"] = ("vllm", vllm_export)
    tokens = {}
    for name, (backend, source) in paths.items():
        path_dtype = dtype if name == "torch-fast" else reference_dtype(dtype)
        engine = create_backend(backend, source, device=device, dtype=path_dtype)
        if llm:
            out = cast(Answerer, engine).answer(list(sources), max_new_tokens=budget)
        elif name == "nemo":  # one clip per call: NeMo's batch budget is then the clip's own
            out = [engine.transcribe([c], max_new_tokens=budget)[0] for c in sources]
        else:
            out = engine.transcribe(list(sources), max_new_tokens=budget)
        tokens[name] = [t.token_ids for t in out]
        close = getattr(engine, "close", None)
        if callable(close):  # vLLM's in-process engine state is global: released before anything else runs
            close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return tokens


def explain(
    model: str, sources, tokens: dict[str, list[list[int]]], dtype: str, device: str, export: str | None = None
) -> list[Divergence]:
    """One record per (clip or dialogue, path other than the reference). The rounding error of a torch path is that
    of the reference in ``dtype``; that of path "onnx" is that of ``export``'s graphs."""
    reference = tokens["reference"]
    found = [
        Divergence(clip=i, path=name, step=first_difference(reference[i], path[i]))
        for name, path in tokens.items()
        if name != "reference"
        for i in range(len(sources))
    ]
    if not any(d.step is not None for d in found):
        return found
    # int8 exists only in the fast path: its error is that of its own logits (the reference is fp32 then).
    # Made first: its loading peak (fp32 weights before quantizing) then stays below the fp32 reference's.
    fast = FastTorchBackend(model, device=device, dtype=dtype) if dtype == Precision.INT8 else None
    fp32 = TorchBackend(model, device=device, dtype="fp32")
    reduced = None if fast else TorchBackend(model, device=device, dtype=dtype)
    graphs = None if export is None else OnnxBackend(export, device=device)
    eos = fp32.tokenizer.eos_id
    for d in found:
        if d.step is None:
            continue
        ref, other = reference[d.clip], tokens[d.path][d.clip]
        d.reference_token = ref[d.step] if d.step < len(ref) else None
        d.path_token = other[d.step] if d.step < len(other) else None
        source = sources[d.clip]
        exact = forced_logits(fp32, source, ref[: d.step])
        if d.path == "onnx" and graphs is not None:
            rounded = onnx_forced_logits(graphs, source, ref[: d.step])
        elif fast is not None and d.path == "torch-fast":
            rounded = fast.next_token_logits(source, ref[: d.step])
        else:
            rounded = forced_logits(reduced or fp32, source, ref[: d.step])
        a = eos if d.reference_token is None else d.reference_token
        b = eos if d.path_token is None else d.path_token
        d.fp32_gap = float(exact[a] - exact[b])
        d.logit_error = float((rounded - exact).abs().max())
        best = int(exact.argmax())
        d.fp32_choice = "reference" if best == a else "path" if best == b else "other"
    return found


def tie_ratio(d: Divergence) -> float:
    """fp32 gap over rounding error: at most 1 means rounding alone can swap the two tokens."""
    gap, error = d.fp32_gap or 0.0, d.logit_error or 0.0
    if error > 0:
        return abs(gap) / error
    return 0.0 if gap == 0 else math.inf


def summary(found: list[Divergence], tokens: dict[str, list[list[int]]] | None = None, unit: str = "clips") -> str:
    """One line per path; ``unit``: what was decoded (clips, or dialogues in LLM mode)."""
    lines = []
    for name in dict.fromkeys(d.path for d in found):
        rows = [d for d in found if d.path == name]
        parted = [d for d in rows if d.step is not None]
        line = f"{name}: {len(rows) - len(parted)} of {len(rows)} {unit} token-identical to the reference"
        if tokens is not None:
            line += f", {agreement(tokens[name], tokens['reference']):.2f} of its tokens kept before the partings"
        if parted:
            ratio = [tie_ratio(d) for d in parted]
            line += (
                f"; {len(parted)} part at steps {sorted(d.step for d in parted if d.step is not None)}, "
                f"{sum(r <= 1 for r in ratio)} of them where the fp32 logits of the two tokens differ by no more "
                f"than the rounding error of the logits there (gap / error at most {max(ratio):.2f})"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m canary_qwen.bench.divergence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=Precision.choices(),
        help="precision of every path (default: bf16); int8: torch-fast in int8 against the fp32 reference",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--synthetic",
        default="mixed:1-10:8",
        metavar="SPEC",
        help="test set, as for `canary-qwen bench` (default: mixed:1-10:8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per clip (default: 24)")
    p.add_argument("--nemo", action="store_true", help="also run NeMo's SALM.generate (needs nemo-toolkit)")
    p.add_argument(
        "--export",
        metavar="DIR",
        help="also run this export's ONNX Runtime graphs (e.g. `export --quantize int8`; compare with --dtype fp32)",
    )
    p.add_argument(
        "--vllm-export",
        metavar="DIR",
        help="also run vLLM on this export of --model (exported with --precision matching --dtype; needs vllm)",
    )
    p.add_argument(
        "--mode",
        choices=(ASR, LLM),
        default=ASR,
        help="asr: transcribe --synthetic's clips; llm: answer built-in questions with the LoRA off (default: asr)",
    )
    p.add_argument("--out", metavar="PATH", help="write the records as JSON here")
    args = p.parse_args(argv)
    if args.mode == LLM:
        sources: list = [[Turn("user", q)] for q in QUESTIONS]
    else:
        sources = list(synthetic_set(args.synthetic).audio or [])
    try:
        tokens = run_paths(
            args.model, sources, args.max_new_tokens, args.dtype, args.device, args.nemo, args.export, args.vllm_export
        )
    except CanaryQwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    found = explain(args.model, sources, tokens, args.dtype, args.device, args.export)
    print(summary(found, tokens, "dialogues" if args.mode == LLM else "clips"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "records": [asdict(d) for d in found]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
