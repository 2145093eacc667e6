"""Benchmark output: results.json, results.md (table), rtfx.png (bar chart), hypotheses.jsonl, docs page."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..defaults import MAX_NEW_TOKENS
from ..errors import UsageError
from .overhead import overhead_section

METHOD = (
    "Open ASR leaderboard method (open_asr_leaderboard nemo_asr/run_eval_salm.py): clips sorted longest "
    "first and batched; one untimed warm-up pass on the first batch; then one timed pass over the whole set "
    "that includes reading the audio (manifests), generate, and moving the tokens to the CPU and decoding "
    "them. RTFx = total audio seconds / wall seconds of the timed pass. Greedy decoding; the token budget is "
    "ceil(tokens_per_second x duration) when --tokens-per-second is set (NeMo: per batch, from the longest "
    "clip, as SALM.generate takes one max_new_tokens; other backends: per clip), otherwise a fixed "
    "max_new_tokens (128, the model card's and leaderboard's). WER: whisper's English normaliser + jiwer, "
    "only when the manifest has reference texts."
)

TABLE_HEADER = (
    "backend",
    "batch",
    "dtype",
    "device",
    "clips",
    "audio (s)",
    "wall (s)",
    "RTFx",
    "vs best NeMo",
    "WER",
    "tokens",
    "TFLOP/s",
    "of limit",
    "peak RSS (GB)",
    "note",
)


def _num(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _stages(run: dict) -> str:
    stages = run.get("stages") or {}
    return ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())


def _served(run: dict) -> str:
    """A served entry's request latency, server memory and agreement with its local entry."""
    if run.get("latency_p50_s") is None:
        return ""
    text = f"latency p50 {run['latency_p50_s']:.2f} s, p99 {run['latency_p99_s']:.2f} s"
    if run.get("server_peak_rss_gb") is not None:
        text += f", server peak {run['server_peak_rss_gb']:.1f} GB"
    if run.get("matches_local") is not None:
        text += f", tokens equal to local for {100 * run['matches_local']:.0f} % of clips"
    return text + "; "


def table_rows(results: dict, failed: bool = True) -> list[list[str]]:
    """One row per run; ``failed=False`` leaves out the runs that were skipped or failed."""
    rows = []
    for r in results["runs"]:
        if r["skipped"] and not failed:
            continue
        if r["skipped"]:
            note = f"skipped: {r['reason']}"
        else:
            note = _served(r) + _stages(r)
        rows.append(
            [
                r["backend"],
                "—" if r["batch_size"] is None else str(r["batch_size"]),
                r["dtype"] or "—",
                r["device"] or "—",
                _num(r["n_clips"]),
                _num(r["audio_s"], 1),
                _num(r["wall_s"]),
                _num(r["rtfx"]),
                "—" if r["rtfx_vs_nemo"] is None else f"{r['rtfx_vs_nemo']:.2f}x",
                "—" if r["wer"] is None else f"{100 * r['wer']:.2f} %",
                _num(r["tokens_generated"]),
                _num(r.get("model_tflops"), 3),
                "—" if r.get("of_limit") is None else f"{100 * r['of_limit']:.1f} %",
                _num(r.get("peak_rss_gb"), 1),
                note,
            ]
        )
    return rows


def markdown_table(results: dict, failed: bool = True) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(" --- " for _ in TABLE_HEADER) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table_rows(results, failed)]
    return "\n".join(lines)


def portable_command(command: str) -> str:
    """``command`` with its absolute paths made relative to the folder they share (the run's: where its checkpoints,
    exports and output were), so it names no path of the machine it ran on. ``--model /work/b13/full ...
    onnx=/work/b13/full_int8`` -> ``--model full ... onnx=full_int8``; relative paths stay as they are."""
    words = shlex.split(command)

    def path_of(word: str) -> tuple[str, str] | None:  # (prefix, absolute path): PATH, NAME=PATH or --flag=PATH
        prefix, _, value = word.rpartition("=") if "=" in word and not word.startswith("/") else ("", "", word)
        return (prefix + "=" if prefix else "", value) if os.path.isabs(value) else None

    found = [p for p in map(path_of, words) if p]
    if not found:
        return command
    base = os.path.commonpath([os.path.dirname(os.path.normpath(v)) for _, v in found])
    out = []
    for word in words:
        p = path_of(word)
        out.append(word if p is None else p[0] + os.path.relpath(p[1], base))
    return shlex.join(out)


def _dataset_line(results: dict) -> str:
    d = results["dataset"]
    cfg = results["config"]
    budget = (
        f"{cfg['tokens_per_second']} tokens per audio second"
        if cfg.get("tokens_per_second") is not None
        else f"max_new_tokens {cfg.get('max_new_tokens', MAX_NEW_TOKENS)}"
    )
    refs = f", {d['references']} with reference text" if d.get("references") else ", no reference text (WER n/a)"
    return (
        f"{d['kind']} set `{d['name']}`: {d['n_clips']} clips, {d['audio_s']:.1f} s of audio "
        f"({d['min_s']:.2f}-{d['max_s']:.2f} s){refs}; budget: {budget}."
    )


def _work_line(results: dict) -> str | None:
    """Work per audio second and the RTFx it allows at the GPU's peak, from the first run that has them."""
    run = next((r for r in results["runs"] if r.get("gflop_per_audio_s")), None)
    if run is None:
        return None
    g = run["gflop_per_audio_s"]
    line = (
        f"Work (matmul/conv FLOPs from the checkpoint's configs, canary_qwen/bench/flops.py): "
        f"{g['total']:.3g} GFLOP per audio second = encoder {g['encoder']:.3g} + prefill {g['prefill']:.3g} "
        f"+ decode {g['decode']:.3g}. TFLOP/s = that work over the wall time."
    )
    limited = next((r for r in results["runs"] if r.get("rtfx_limit")), None)
    if limited:
        line += (
            f" At the GPU's datasheet peak ({limited['peak_tflops']:g} dense {limited['dtype']} TFLOP/s) the work "
            f"caps RTFx at {limited['rtfx_limit']:,.0f}; 'of limit' = RTFx over that cap."
        )
    return line


def results_markdown(results: dict) -> str:
    env = results["environment"]
    return "\n".join(
        [
            "# canary-qwen bench results",
            "",
            f"`{env.get('command') or ' '.join(env.get('argv', []))}`",
            "",
            _dataset_line(results),
            f"Hardware: {_hardware(env)}. Run at {env['timestamp']}.",
            *filter(None, [_work_line(results)]),
            "",
            markdown_table(results),
            "",
            "RTFx = audio seconds / wall seconds of one timed pass (after one untimed warm-up); "
            "'vs best NeMo' = the run's RTFx over the best NeMo RTFx of this benchmark.",
            "",
            *overhead_section(results, "##"),
        ]
    )


def _hardware(env: dict) -> str:
    cpu = f"{env['cpu']} ({env['cpu_cores_usable']} of {env['cpu_cores']} cores usable)"
    if env.get("load_average") is not None:
        cpu += f", load average {env['load_average']} at the start"
    return f"{env['gpu']} (CUDA {env['cuda']}) + {cpu}" if env.get("gpu") else f"CPU only: {cpu}"


def _bar_label(run: dict) -> str:
    """Backend and precision: one run may hold the same backend in several (nemo fp32 and bf16)."""
    return f"{run['backend']} {run['dtype']}" if run.get("dtype") else run["backend"]


def plot_rtfx(results: dict, path) -> Path:
    """Grouped bar chart, RTFx by batch size (groups) and backend (bars). Uses Agg without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in results["runs"] if not r["skipped"] and r["rtfx"] is not None]
    backends = list(dict.fromkeys(_bar_label(r) for r in runs))
    sizes = sorted({r["batch_size"] for r in runs})
    fig = Figure(figsize=(max(6.0, 1.2 + 1.1 * len(sizes) * max(1, len(backends)) * 0.6), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if not runs:
        ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        width = 0.8 / len(backends)
        for j, name in enumerate(backends):
            by_size = {r["batch_size"]: r["rtfx"] for r in runs if _bar_label(r) == name}
            xs = [i + (j - (len(backends) - 1) / 2) * width for i, s in enumerate(sizes) if s in by_size]
            ys = [by_size[s] for s in sizes if s in by_size]
            bars = ax.bar(xs, ys, width=width * 0.95, label=name)
            ax.bar_label(bars, labels=[_num(y, 1) for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel("RTFx (audio s / wall s)")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    env = results["environment"]
    ax.set_title(f"{results['dataset']['name']} on {env.get('gpu') or 'CPU'}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_results(results: dict, out_dir) -> dict[str, Path]:
    """results.json, results.md, rtfx.png and hypotheses.jsonl (texts of each timed pass) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "md": out / "results.md",
        "png": out / "rtfx.png",
        "hypotheses": out / "hypotheses.jsonl",
    }
    record = {k: v for k, v in results.items() if k not in ("hypotheses", "clip_ids")}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    paths["md"].write_text(results_markdown(results))
    plot_rtfx(results, paths["png"])
    with open(paths["hypotheses"], "w", encoding="utf-8") as f:
        for run, texts in results.get("hypotheses", {}).items():
            for clip_id, text in zip(results.get("clip_ids", []), texts):
                f.write(json.dumps({"run": run, "id": clip_id, "text": text}, ensure_ascii=False) + "\n")
    return paths


def load_results(path) -> dict:
    """A results.json (or the folder holding it) back as the dict ``write_docs`` takes; ``record`` says where it was
    read from (the path as given), and the docs page names it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    return {**json.loads(file.read_text()), "record": str(file.parent)}


HAND_WRITTEN = "<!-- Written by hand below this line (each section gives its command); write_docs keeps it. -->"


def write_docs(
    results: dict | Iterable[dict], path, *, portable: bool = False, generated_by: str | None = None
) -> Path:
    """Render docs/benchmarks.md from one or more benchmark results (one section per benchmark), keeping
    what follows the ``HAND_WRITTEN`` line (measurements of other tools, such as transcribe-corpus).

    Only the runs that produced numbers get a row; the others are named in one line under the table (their
    errors stay in the records). ``portable``: commands with their paths relative to the run's folder
    (:func:`portable_command`). ``generated_by``: the command that regenerates the page, for its header."""
    all_results = [results] if isinstance(results, dict) else list(results)
    if not all_results:
        raise UsageError("write_docs needs at least one benchmark result")
    lines = [
        "# Benchmarks",
        "",
        f"<!-- Generated by `{generated_by or 'canary-qwen bench ... --docs'}` (canary_qwen/bench/report.py: "
        "write_docs); re-run the commands below instead of editing the numbers by hand. -->",
        "",
        "## Method",
        "",
        METHOD,
        "",
        "Published reference: canary-qwen-2.5b reaches RTFx 418 on one A100 on the Open ASR leaderboard "
        "(bf16, batch 192, real weights, max_new_tokens 128).",
        "",
        "Random-weight checkpoints (no real weights are used here) are written by "
        "`canary-qwen make-checkpoint --size tiny|full --seed 0 --out DIR` (full: the real 2.5B architecture "
        "and layout) and exported by `canary-qwen export --model DIR --out DIR_export`; a section's title names "
        "the checkpoint folder. Random weights never stop early, hence the fixed token budgets.",
        "",
    ]
    if portable:
        lines += [
            "Paths in the commands are relative to the folder the run's checkpoints, exports and output were in "
            "(run them there, or from the repository root with the checkpoints made there); each section names "
            "the record (`results.json`, `results.md`, `hypotheses.jsonl`) its numbers come from.",
            "",
        ]
    for res in all_results:
        env = res["environment"]
        model = res["config"].get("model")
        title = res["dataset"]["name"] + (f", model `{Path(model).name}`" if model else "")
        lines += [f"## {title}", ""]
        command = env.get("command") or shlex.join(env.get("argv", []))
        shown = portable_command(command) if portable else command
        as_shown = dict(zip(shlex.split(command), shlex.split(shown)))  # each word of the command as printed
        lines += ["Command:", "", "```bash", shown, "```", ""]
        if res.get("record"):
            lines += [f"Record: `{res['record']}`.", ""]
        lines += [_dataset_line(res), ""]
        if work := _work_line(res):
            lines += [work, ""]
        lines += [
            "| | |",
            "| --- | --- |",
            f"| hardware | {_cell(_hardware(env))} |",
            f"| platform | {_cell(env.get('platform'))}, Python {env.get('python')} |",
        ]
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
        lines += [f"| versions | {_cell(versions)} |", f"| date | {env['timestamp']} |", ""]
        lines += [markdown_table(res, failed=False), ""]
        lines += overhead_section(res)
        skipped = [r for r in res["runs"] if r["skipped"]]
        if skipped:
            names = []
            for r in skipped:
                spec = r.get("spec") or r["backend"]
                name = f"`{as_shown.get(spec, spec)}`"
                names.append(name + (f" (batch {r['batch_size']})" if r["batch_size"] else ""))
            lines += [
                f"Not shown: {', '.join(names)}, which did not run or failed"
                + (" (the record has the reason)." if res.get("record") else "."),
                "",
            ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    kept = "\n" + old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else ""
    path.write_text("\n".join(lines).rstrip() + "\n" + kept)
    return path


def regenerate_docs(path, records: Sequence[str | os.PathLike]) -> Path:
    """docs/benchmarks.md again from benchmark records (``--out`` folders), in the order given, with portable
    commands; the hand-written part below ``HAND_WRITTEN`` stays."""
    if not records:
        raise UsageError("regenerate_docs needs at least one record folder")
    command = shlex.join(["python", "-m", "canary_qwen.bench.report", "--docs", str(path), *map(str, records)])
    return write_docs([load_results(r) for r in records], path, portable=True, generated_by=command)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m canary_qwen.bench.report",
        description="Regenerate a benchmarks page from benchmark records (the --out folders of canary-qwen bench), "
        "one section per record in the order given, commands with paths relative to each run.",
    )
    p.add_argument("--docs", required=True, help="the page to write (e.g. docs/benchmarks.md)")
    p.add_argument("records", nargs="+", help="record folders holding results.json")
    args = p.parse_args(argv)
    print(f"wrote {regenerate_docs(args.docs, args.records)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
