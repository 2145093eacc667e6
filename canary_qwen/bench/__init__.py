"""Throughput benchmark (Open ASR leaderboard RTFx method) across NeMo and this package's backends.

Public API::

    from canary_qwen.bench import BenchConfig, run_benchmark, write_results, write_docs
    results = run_benchmark(BenchConfig(backends=["nemo", "torch"], batch_sizes=[8], model="ckpt",
                                        synthetic="mixed:2-20:64", tokens_per_second=3.5))
    write_results(results, "bench/")          # results.json, results.md, rtfx.png, hypotheses.jsonl
    write_docs(results, "docs/benchmarks.md")

The command line is ``canary-qwen bench`` (``canary_qwen.cli.bench``).
"""

from .backends import BackendOptions, BenchBackend, create_backend
from .data import BenchSet, Clip, ManifestError, load_set, parse_synthetic_spec, read_manifest, synthetic_set
from .environment import environment
from .report import load_results, markdown_table, plot_rtfx, results_markdown, write_docs, write_results
from .runner import RUN_FIELDS, BenchConfig, run_benchmark, word_error_rate

__all__ = [
    "RUN_FIELDS",
    "BackendOptions",
    "BenchBackend",
    "BenchConfig",
    "BenchSet",
    "Clip",
    "ManifestError",
    "create_backend",
    "environment",
    "load_results",
    "load_set",
    "markdown_table",
    "parse_synthetic_spec",
    "plot_rtfx",
    "read_manifest",
    "results_markdown",
    "synthetic_set",
    "word_error_rate",
    "write_docs",
    "write_results",
    "run_benchmark",
]
