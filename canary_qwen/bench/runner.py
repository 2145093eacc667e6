"""The measurement: the Open ASR leaderboard's RTFx method, for every backend and batch size.

Per (backend, batch size): clips sorted longest first and cut into batches; one untimed warm-up on
the first batch(es); then ONE timed pass over the whole set that includes reading the audio (for
manifests), ``generate`` and bringing the tokens back to the CPU and decoding them to text.
``RTFx = total audio seconds / wall seconds`` of that pass. WER (whisper's English normaliser +
jiwer) is computed from the timed pass's texts when the set has references.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm import tqdm

from ..defaults import MAX_NEW_TOKENS, SAMPLE_RATE
from ..errors import BackendUnavailable, MissingDependencyError, UsageError
from .backends import PER_BATCH, BackendOptions, BenchBackend, RunSpec, create_backend, release_memory
from .data import BenchSet
from .environment import environment, peak_rss_gb, reset_peak_rss
from .flops import Work, WorkModel, peak_tflops, roofline_fields

logger = logging.getLogger(__name__)

RUN_FIELDS = (
    "backend",
    "spec",  # the --backends entry (NAME[:DTYPE][=SOURCE])
    "batch_size",
    "dtype",
    "device",
    "n_clips",
    "audio_s",
    "wall_s",
    "rtfx",
    "rtfx_vs_nemo",
    "wer",
    "n_references",
    "tokens_generated",
    "tokens_per_s",
    "budget",
    "tokens_per_second",
    "max_new_tokens",
    "n_batches",
    "warmup_batches",
    "warmup_s",
    "stages",
    "peak_rss_gb",
    "latency_p50_s",  # served entries: per request
    "latency_p99_s",
    "server_peak_rss_gb",  # served entries: the server's whole process tree
    "engine_busy_s",  # served engine flavours: seconds the engine admitted and stepped during the timed pass
    "matches_local",  # served entries: share of clips whose tokens equal the local entry's of the same run
    "gflop_per_audio_s",
    "model_tflops",
    "peak_tflops",
    "rtfx_limit",
    "of_limit",
    "skipped",
    "reason",
)


@dataclass
class BenchConfig:
    backends: list[str]
    batch_sizes: list[int]
    model: str | None = None
    export_dir: str | None = None
    manifest: str | None = None
    synthetic: str | None = None
    tokens_per_second: float | None = None  # None: a fixed max_new_tokens budget
    max_new_tokens: int = MAX_NEW_TOKENS
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None: cuda if available, else cpu
    url: str | None = None
    seed: int = 0
    warmup_batches: int = 1
    command: str | None = None  # the command line, for the record

    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        return self.dtype or ("bf16" if self.resolved_device().startswith("cuda") else "fp32")


# -- budgets and WER -------------------------------------------------------------------------------


def clip_budget(seconds: float, tokens_per_second: float | None, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    if tokens_per_second is None:
        return max_new_tokens
    return max(1, math.ceil(tokens_per_second * seconds))


def batch_budgets(
    durations: Sequence[float],
    policy: str,
    tokens_per_second: float | None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[int]:
    """One budget per clip; with the per-batch policy all clips get the longest clip's budget."""
    budgets = [clip_budget(d, tokens_per_second, max_new_tokens) for d in durations]
    return [max(budgets)] * len(budgets) if policy == PER_BATCH and budgets else budgets


_normalizer = None


def normalize(text: str) -> str:
    """Whisper's English text normaliser (the leaderboard's)."""
    global _normalizer
    if _normalizer is None:
        try:
            from whisper_normalizer.english import EnglishTextNormalizer
        except ImportError:
            raise MissingDependencyError("whisper_normalizer", "pip install 'canary-qwen[bench]' (WER)") from None
        _normalizer = EnglishTextNormalizer()
    return _normalizer(text)


def word_error_rate(references: Sequence[str | None], hypotheses: Sequence[str]) -> tuple[float | None, int]:
    """Corpus WER (fraction, not percent) over normalised pairs with a non-empty reference; (None, 0) if none."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True) if r is not None]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return None, 0
    try:
        import jiwer
    except ImportError:
        raise MissingDependencyError("jiwer", "pip install 'canary-qwen[bench]' (WER)") from None
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])), len(pairs)


# -- environment -----------------------------------------------------------------------------------


# -- one run ---------------------------------------------------------------------------------------


def empty_run(backend: str, batch_size: int | None, **fields) -> dict:
    run: dict = dict.fromkeys(RUN_FIELDS)
    run.update(backend=backend, batch_size=batch_size, skipped=False, reason=None)
    run.update(fields)
    return run


def skipped_run(backend: str, batch_size: int | None, reason: str, **fields) -> dict:
    return empty_run(backend, batch_size, skipped=True, reason=reason, **fields)


def timed_run(
    backend: BenchBackend, data: BenchSet, batch_size: int, config: BenchConfig, *, progress: bool = True
) -> dict:
    """Warm-up, then one timed pass over ``data``; returns the run record (texts under ``_hypotheses``)."""
    n = len(data)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if backend.in_flight:  # a server: every clip sent at once, ``batch_size`` requests in flight
        backend.set_in_flight(batch_size)
        batches = [list(range(n))]
    tps, cap = config.tokens_per_second, config.max_new_tokens

    def one_batch(indices):
        audios = data.load(indices)
        budgets = batch_budgets([len(a) / SAMPLE_RATE for a in audios], backend.budget, tps, cap)
        return audios, backend.transcribe(audios, budgets)

    warmup = batches[: max(0, config.warmup_batches)]
    start = time.perf_counter()
    for indices in warmup:
        one_batch(indices)
    warmup_s = time.perf_counter() - start
    backend.reset_stage_timings()

    hypotheses: list[str] = [""] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    usage: list[tuple[int, int]] = []  # (samples, tokens within the clip's own budget) per clip
    tokens = 0
    audio_samples = 0
    load_s = transcribe_s = 0.0
    bar = tqdm(
        batches,
        desc=f"{backend.label} bs={batch_size}",
        unit="batch",
        disable=not progress,
        file=sys.stderr,
        leave=True,
    )
    start = time.perf_counter()
    for indices in bar:
        t0 = time.perf_counter()
        audios = data.load(indices)
        t1 = time.perf_counter()
        budgets = batch_budgets([len(a) / SAMPLE_RATE for a in audios], backend.budget, tps, cap)
        results = backend.transcribe(audios, budgets)
        t2 = time.perf_counter()
        load_s += t1 - t0
        transcribe_s += t2 - t1
        for i, a, r in zip(indices, audios, results, strict=True):
            hypotheses[i] = r.text
            token_ids[i] = r.token_ids
            tokens += len(r.token_ids)
            audio_samples += len(a)
            usage.append((len(a), min(len(r.token_ids), clip_budget(len(a) / SAMPLE_RATE, tps, cap))))
    wall = time.perf_counter() - start
    bar.close()

    audio_s = audio_samples / SAMPLE_RATE
    stages = {"load_audio": load_s, "transcribe": transcribe_s}
    stages.update(backend.stage_timings() or {})
    wer, n_refs = word_error_rate([c.text for c in data.clips], hypotheses)
    run = empty_run(
        backend.name,
        batch_size,
        spec=backend.label,
        dtype=backend.dtype,
        device=backend.device,
        n_clips=n,
        audio_s=audio_s,
        wall_s=wall,
        rtfx=audio_s / wall,
        wer=wer,
        n_references=n_refs,
        tokens_generated=tokens,
        tokens_per_s=tokens / wall,
        budget=backend.budget,
        tokens_per_second=tps,
        max_new_tokens=None if tps is not None else cap,
        n_batches=len(batches),
        warmup_batches=len(warmup),
        warmup_s=warmup_s,
        stages=stages,
        peak_rss_gb=peak_rss_gb(),
        **backend.served_fields(),
    )
    run["_hypotheses"] = hypotheses
    run["_tokens"] = token_ids
    run["_usage"] = usage
    return run


# -- memory ----------------------------------------------------------------------------------------

# -- the whole benchmark ---------------------------------------------------------------------------


def add_nemo_ratios(runs: list[dict]) -> None:
    """``rtfx_vs_nemo``: each run's RTFx over the best NeMo RTFx of the same benchmark (None without one)."""
    nemo = [r["rtfx"] for r in runs if r["backend"] == "nemo" and not r["skipped"] and r["rtfx"]]
    best = max(nemo) if nemo else None
    for r in runs:
        r["rtfx_vs_nemo"] = r["rtfx"] / best if best and r["rtfx"] is not None else None


def add_local_matches(runs: list[dict], specs: dict[str, RunSpec]) -> None:
    """``matches_local`` of each served run: the share of clips whose tokens equal those of its local entry
    (``triton:torch-fast:int8`` against ``torch-fast:int8``) at that entry's first batch size in the run."""
    local: dict[str, list[list[int]]] = {}
    for r in runs:
        if "_tokens" in r:
            local.setdefault(r["spec"], r["_tokens"])
    for r in runs:
        spec = specs.get(r["spec"])
        want = local.get(spec.local) if spec is not None and spec.local else None
        if want is not None and "_tokens" in r:
            r["matches_local"] = sum(a == b for a, b in zip(r["_tokens"], want)) / len(want)


def work_model(config: BenchConfig, log) -> WorkModel | None:
    """The checkpoint's work model (configs and tokenizer only), or None without a readable --model."""
    if not config.model:
        return None
    try:
        return WorkModel.from_checkpoint(config.model)
    except Exception as e:  # noqa: BLE001 - the FLOP figures are extras; the benchmark goes on without them
        log(f"no FLOP figures: cannot read the model's configs ({type(e).__name__}: {e})")
        return None


def add_work(run: dict, usage: list[tuple[int, int]], model: WorkModel, gpu: str | None) -> None:
    """Fill the run's work fields from its clips (see ``flops``); the peak applies to GPU runs only."""
    work = sum((model.clip(samples, tokens) for samples, tokens in usage), Work())
    on_gpu = str(run["device"] or "").startswith("cuda")
    peak = peak_tflops(gpu, run["dtype"]) if on_gpu else None
    run.update(roofline_fields(work, run["audio_s"], run["wall_s"], run["rtfx"], peak))


def run_benchmark(config: BenchConfig, data: BenchSet | None = None, *, progress: bool = True, log=None) -> dict:
    """Run every backend at every batch size; never raises for a backend that cannot run (it is skipped).

    Returns ``{"environment", "config", "dataset", "runs"}``; each run has every field of ``RUN_FIELDS``.
    """
    from .data import load_set

    log = log or logger.info
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise UsageError("batch sizes must be at least 1")
    if config.tokens_per_second is not None and config.tokens_per_second <= 0:
        raise UsageError("--tokens-per-second must be positive")
    if data is None:
        data = load_set(manifest=config.manifest, synthetic=config.synthetic, seed=config.seed)
    if data.has_references:
        normalize("")  # fail before loading any model if the WER dependencies are missing
    device, dtype = config.resolved_device(), config.resolved_dtype()
    options = BackendOptions(
        model=config.model, export_dir=config.export_dir, device=device, dtype=dtype, url=config.url
    )

    work = work_model(config, log)
    env = environment(config.command)
    runs: list[dict] = []
    specs = {text: RunSpec.parse(text) for text in config.backends}  # a bad entry fails before any model loads
    for spec in specs.values():
        label = spec.text
        reset_peak_rss()
        try:
            backend = create_backend(spec, options)
        except Exception as e:  # noqa: BLE001 - any construction failure is a skip, not a crash
            reason = str(e) if isinstance(e, BackendUnavailable) else f"{type(e).__name__}: {e}"
            log(f"skipping {label}: {reason}")
            runs.append(skipped_run(spec.name, None, reason, spec=label, device=device, n_clips=len(data)))
            release_memory()
            continue
        try:
            for batch_size in config.batch_sizes:
                try:
                    runs.append(timed_run(backend, data, batch_size, config, progress=progress))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: record, go on
                    log(
                        f"{label} at batch size {batch_size} failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                    )
                    runs.append(
                        skipped_run(
                            spec.name,
                            batch_size,
                            f"failed: {type(e).__name__}: {e}",
                            spec=label,
                            dtype=backend.dtype,
                            device=backend.device,
                            n_clips=len(data),
                        )
                    )
                    release_memory()
        finally:
            backend.close()
    add_nemo_ratios(runs)
    add_local_matches(runs, specs)
    for run in runs:
        run.pop("_tokens", None)
        usage = run.pop("_usage", None)
        if usage and work is not None:
            add_work(run, usage, work, env["gpu"])
    hypotheses = {f"{r['spec']}@{r['batch_size']}": r.pop("_hypotheses") for r in runs if "_hypotheses" in r}
    return {
        "environment": env,
        "config": {**asdict(config), "device": device, "dtype": dtype},
        "dataset": {
            "name": data.name,
            "kind": "synthetic" if data.audio is not None else "manifest",
            "n_clips": len(data),
            "audio_s": sum(c.duration for c in data.clips),
            "min_s": min(c.duration for c in data.clips),
            "max_s": max(c.duration for c in data.clips),
            "references": sum(c.text is not None for c in data.clips),
        },
        "runs": runs,
        "hypotheses": hypotheses,
        "clip_ids": [c.id for c in data.clips],
    }
