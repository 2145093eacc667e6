"""Soak one `canary-qwen serve` under mixed load and sample its memory: does it stay flat for hours?

    python scripts/soak.py --minutes 30 --concurrency 64 --out soak30      # tiny onnx repository built in OUT
    python scripts/soak.py --repo REPO --minutes 120 --concurrency 32 --out soak
    python scripts/soak.py --minutes 4 --concurrency 16 --faults 5 --fault-every-s 30 --restart-window-s 20 --out f5
    python scripts/soak.py --plot soak30                                    # redraw OUT/memory.png from the CSVs

Half of the clients talk gRPC and half HTTP, and half of each one's requests are streams (canary_qwen_stream),
the rest go to the canary_qwen ensemble (`canary_qwen.client.loadtest`, in segments of --segment-s). Every
--sample-s seconds it records, per process of the server tree (serve, tritonserver, each python model process):
RSS split into anonymous (heap), file and shared-memory pages, and PSS (shared pages divided among the processes
that map them, so the tree's PSS counts /dev/shm once); and the server's /dev/shm regions (bytes in use and
apparent size). Writes OUT/processes.csv (one row per process and sample), OUT/samples.csv (one row per sample),
OUT/summary.json (load per segment, memory after warm-up and at the end, growth per hour by process, fault
recovery times, what was left after serve stopped) and OUT/memory.png.

--faults N kills a model process (in turn: --fault-targets) every --fault-every-s seconds after the warm-up and
measures how long until serve has restarted Triton (its status file says ready, on the same port) and until a
fresh client's request is answered. Not a CI test: it runs for as long as it is told. On a shared machine mind the
load it makes (the server and the clients share the CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canary_qwen.bench.data import synthetic_set  # noqa: E402
from canary_qwen.client.loadtest import run_load  # noqa: E402
from canary_qwen.client.triton import TritonClient  # noqa: E402
from canary_qwen.serving.processes import python_stubs  # noqa: E402
from canary_qwen.serving.supervisor import STATUS_FILE  # noqa: E402

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PROCESS_FIELDS = ["t_s", "segment", "pid", "role", "rss_kb", "anon_kb", "file_kb", "shmem_kb", "pss_kb"]
SAMPLE_FIELDS = [
    "t_s",
    "segment",
    "tree_rss_mb",  # tritonserver + its python processes (what the issue measured)
    "tree_pss_mb",
    "tree_anon_mb",
    "tree_shmem_mb",
    "serve_rss_mb",
    "shm_used_mb",  # the server's /dev/shm regions: pages in use ...
    "shm_apparent_mb",  # ... and their size
    "shm_regions",
    "processes",
]


# -- the server -----------------------------------------------------------------------------------------------
def tiny_repo(out: Path) -> Path:
    """A tiny random checkpoint, exported, as an onnx-flavour repository with the default limits (made once)."""
    repo = out / "repo"
    if (repo / "canary_qwen_repo.json").exists():
        return repo
    from canary_qwen.export.artifacts import export_all
    from canary_qwen.model.synthetic import make_checkpoint
    from canary_qwen.serving.onnx_flavor import generate_onnx_repo

    checkpoint = make_checkpoint(out / "checkpoint", "tiny", seed=0)
    export = export_all(checkpoint, out / "export", progress=False).root
    return generate_onnx_repo(export, repo)


class Serve:
    """`canary-qwen serve` in its own process, its output copied to OUT/serve.out and OUT/serve.err."""

    def __init__(self, repo: Path, out: Path, extra: list[str]):
        self.work_dir = out / "serve"
        code = "import sys; from canary_qwen.cli import main; sys.exit(main(sys.argv[1:]))"
        argv = [sys.executable, "-c", code, "serve", "--repo", str(repo), "--work-dir", str(self.work_dir), *extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        for stream, name in ((self.proc.stdout, "serve.out"), (self.proc.stderr, "serve.err")):
            threading.Thread(target=self._copy, args=(stream, out / name), daemon=True).start()
        deadline = time.monotonic() + 180
        while not any(line.startswith("Ctrl-C") for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start (see {out / 'serve.err'})")
            time.sleep(0.1)
        self.http = next(line.split()[1] for line in self.lines if line.strip().startswith("HTTP"))
        self.grpc = next(line.split()[1] for line in self.lines if line.strip().startswith("gRPC"))
        self.shm_prefix = f"canary_qwen_{self.proc.pid}_"
        self.seen: set[int] = set()

    def _copy(self, stream, path: Path) -> None:
        with open(path, "w") as f:
            for line in iter(stream.readline, ""):
                self.lines.append(line)
                f.write(line)
                f.flush()

    def status(self) -> dict:
        try:
            return json.loads((self.work_dir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def tree(self) -> dict[int, str]:
        """pid -> role of serve, its tritonserver and that server's python model processes (by instance name)."""
        roles = {self.proc.pid: "serve"}
        for pid in _children(self.proc.pid):
            roles[pid] = "tritonserver"
            roles.update({s.pid: s.instance for s in python_stubs(pid)})
        self.seen.update(roles)
        return roles

    def stop(self) -> dict:
        """SIGTERM, then what is left: exit code, processes still alive, /dev/shm regions still there."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        time.sleep(1)
        alive = [pid for pid in self.seen if _alive(pid)]
        regions = [p.name for p in Path("/dev/shm").glob(self.shm_prefix + "*")]
        return {"exit_code": code, "processes_left": alive, "shm_regions_left": regions}


def _stat(pid) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _stat(p.name)[1:2] == [str(pid)] and _alive(p.name)]


def _alive(pid) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"], ["X"])


# -- memory ---------------------------------------------------------------------------------------------------
def process_memory(pid: int) -> dict[str, int] | None:
    """kB: RSS and its anonymous / file / shared-memory parts (/proc/PID/status), PSS (smaps_rollup)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = {}
    for line in (status + rollup).splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0])
    return {
        "rss_kb": fields.get("VmRSS", 0),
        "anon_kb": fields.get("RssAnon", 0),
        "file_kb": fields.get("RssFile", 0),
        "shmem_kb": fields.get("RssShmem", 0),
        "pss_kb": fields.get("Pss", 0),
    }


def shm_usage(prefix: str) -> tuple[float, float, int]:
    """The server's /dev/shm regions: MB of pages in use, MB of apparent size, count."""
    used = apparent = 0
    regions = list(Path("/dev/shm").glob(prefix + "*"))
    for p in regions:
        try:
            st = p.stat()
        except OSError:
            continue
        used += st.st_blocks * 512
        apparent += st.st_size
    return used / 2**20, apparent / 2**20, len(regions)


class Sampler:
    """Samples the tree every ``every_s`` seconds into OUT/processes.csv and OUT/samples.csv."""

    def __init__(self, serve: Serve, out: Path, every_s: float):
        self.serve, self.every_s = serve, every_s
        self.start = time.monotonic()
        self.segment = 0
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._procs = open(out / "processes.csv", "w", newline="")
        self._samples = open(out / "samples.csv", "w", newline="")
        self._pw = csv.DictWriter(self._procs, PROCESS_FIELDS)
        self._sw = csv.DictWriter(self._samples, SAMPLE_FIELDS)
        self._pw.writeheader()
        self._sw.writeheader()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def sample(self) -> dict:
        with self._lock:
            return self._sample()

    def _sample(self) -> dict:
        t = round(time.monotonic() - self.start, 1)
        totals: Counter = Counter()
        serve_rss = 0
        roles = self.serve.tree()
        for pid, role in sorted(roles.items()):
            mem = process_memory(pid)
            if mem is None:
                continue
            self._pw.writerow({"t_s": t, "segment": self.segment, "pid": pid, "role": role, **mem})
            if role == "serve":
                serve_rss = mem["rss_kb"]
            else:
                totals.update(mem)
        used, apparent, count = shm_usage(self.serve.shm_prefix)
        row = {
            "t_s": t,
            "segment": self.segment,
            "tree_rss_mb": round(totals["rss_kb"] / 1024, 1),
            "tree_pss_mb": round(totals["pss_kb"] / 1024, 1),
            "tree_anon_mb": round(totals["anon_kb"] / 1024, 1),
            "tree_shmem_mb": round(totals["shmem_kb"] / 1024, 1),
            "serve_rss_mb": round(serve_rss / 1024, 1),
            "shm_used_mb": round(used, 1),
            "shm_apparent_mb": round(apparent, 1),
            "shm_regions": count,
            "processes": len(roles),
        }
        self._sw.writerow(row)
        self._procs.flush()
        self._samples.flush()
        self.rows.append(row)
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._procs.close()
        self._samples.close()


# -- load and faults ------------------------------------------------------------------------------------------
def mixed_load(serve: Serve, clips, concurrency: int, seconds: float, stream_share: float) -> dict:
    """gRPC and HTTP clients side by side for ``seconds``: one load report each (a refused request's worker waits
    before its next one, as ``client loadtest`` does)."""
    shares = {"grpc": (concurrency + 1) // 2, "http": concurrency // 2}
    clients = {p: TritonClient(serve.grpc if p == "grpc" else serve.http, p, timeout_s=120) for p in shares}
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {
                p: pool.submit(
                    run_load, clients[p], clips, concurrency=n, duration_s=seconds, stream_share=stream_share
                )
                for p, n in shares.items()
                if n
            }
            reports = {p: f.result() for p, f in futures.items()}
    finally:
        for client in clients.values():
            client.close()
    return {p: {**r.as_dict(), "error_examples": r.error_examples} for p, r in reports.items()}


def force_faults(serve: Serve, n: int, every_s: float, targets: list[str], probe_clip, stop: threading.Event) -> list:
    """Kill a model process (or tritonserver) every ``every_s`` seconds, ``n`` times; time the recovery of each."""
    results = []
    for i in range(n):
        if stop.wait(every_s):
            break
        target = targets[i % len(targets)]
        restarts = serve.status().get("restarts", 0)
        roles = serve.tree()
        victims = [pid for pid, role in roles.items() if role == target or role.startswith(target + "_")]
        if not victims:
            results.append({"target": target, "error": "no such process"})
            continue
        killed = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        ready = answered = None
        deadline = killed + 120
        while time.monotonic() < deadline and serve.proc.poll() is None:
            status = serve.status()
            if ready is None and status.get("restarts", 0) > restarts and status.get("state") == "ready":
                ready = time.monotonic() - killed
            if ready is not None:
                try:
                    with TritonClient(serve.grpc, "grpc", timeout_s=30) as client:
                        client.transcribe(probe_clip, max_new_tokens=8)
                    answered = time.monotonic() - killed
                    break
                except Exception:
                    pass
            time.sleep(0.1)
        status = serve.status()
        results.append(
            {
                "target": target,
                "pid": victims[0],
                "ready_s": None if ready is None else round(ready, 2),
                "answered_s": None if answered is None else round(answered, 2),
                "cause": status.get("last_cause"),
                **{  # serve's own account: detection to ready, and where the time went
                    f"serve_{k}": v
                    for k, v in (status.get("history") or [{}])[-1].items()
                    if k in ("down_s", "stop_s", "backoff_s", "start_s")
                },
            }
        )
        print(f"fault {i + 1}/{n}: {results[-1]}", flush=True)
    return results


# -- the report -----------------------------------------------------------------------------------------------
def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares growth of y per hour (t in seconds)."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return None if var == 0 else sum((t - mt) * (y - my) for t, y in points) / var * 3600


def memory_summary(out: Path, warmup_s: float) -> dict:
    """Tree and per-role memory: after the first start, after warm-up, at the end, the maximum, growth per hour."""
    samples = list(csv.DictReader(open(out / "samples.csv")))
    procs = list(csv.DictReader(open(out / "processes.csv")))
    after = [r for r in samples if float(r["t_s"]) >= warmup_s] or samples[-1:]

    def stat(rows, key):
        values = [(float(r["t_s"]), float(r[key])) for r in rows]
        slope = _slope_per_hour(values)
        return {
            "start": values[0][1] if values else None,
            "max": max(v for _, v in values) if values else None,
            "end": values[-1][1] if values else None,
            "per_hour_after_warmup": None if slope is None else round(slope, 1),
        }

    tree = {k: stat(samples, k) for k in SAMPLE_FIELDS[2:9]}
    for k in tree:
        tree[k]["after_warmup"] = float(after[0][k])
        tree[k]["per_hour_after_warmup"] = stat(after, k)["per_hour_after_warmup"]
    by_role: dict[str, dict] = {}
    for role in sorted({r["role"] for r in procs}):
        rows = [
            (float(r["t_s"]), int(r["rss_kb"]) / 1024, int(r["anon_kb"]) / 1024) for r in procs if r["role"] == role
        ]
        late = [x for x in rows if x[0] >= warmup_s]
        rss_slope = _slope_per_hour([(t, m) for t, m, _ in late])
        anon_slope = _slope_per_hour([(t, a) for t, _, a in late])
        by_role[role] = {
            "rss_mb_start": round(rows[0][1], 1),
            "rss_mb_after_warmup": round(late[0][1], 1) if late else None,
            "rss_mb_end": round(rows[-1][1], 1),
            "rss_mb_per_hour_after_warmup": None if rss_slope is None else round(rss_slope, 1),
            "anon_mb_per_hour_after_warmup": None if anon_slope is None else round(anon_slope, 1),
        }
    return {"warmup_s": warmup_s, "tree": tree, "by_role": by_role}


def plot(out: Path, warmup_s: float | None = None) -> Path:
    """OUT/memory.png: the tree's RSS, PSS, heap and /dev/shm over time (top), RSS per process (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samples = list(csv.DictReader(open(out / "samples.csv")))
    procs = list(csv.DictReader(open(out / "processes.csv")))
    fig = Figure(figsize=(9, 7), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    minutes = [float(r["t_s"]) / 60 for r in samples]
    for key, label in (
        ("tree_rss_mb", "RSS, tritonserver + python models"),
        ("tree_pss_mb", "PSS (shared pages counted once)"),
        ("tree_anon_mb", "anonymous (heap)"),
        ("shm_used_mb", "/dev/shm regions in use"),
    ):
        top.plot(minutes, [float(r[key]) for r in samples], label=label)
    top.set_ylabel("MB")
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    for role in sorted({r["role"] for r in procs}):
        rows = [r for r in procs if r["role"] == role]
        bottom.plot([float(r["t_s"]) / 60 for r in rows], [int(r["rss_kb"]) / 1024 for r in rows], label=role, lw=1)
    bottom.set_ylabel("RSS per process (MB)")
    bottom.set_xlabel("minutes")
    bottom.legend(fontsize=7, ncol=4, loc="upper left")
    bottom.grid(alpha=0.3)
    if warmup_s:
        for ax in (top, bottom):
            ax.axvline(warmup_s / 60, color="grey", ls=":", lw=1)
    summary = out / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        load = s.get("load_total", {})
        top.set_title(
            f"{s.get('concurrency')} clients (gRPC + HTTP, half streams), {load.get('requests')} requests, "
            f"{load.get('errors')} errors",
            fontsize=9,
        )
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, format="png")
    return path


# -- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the CSVs, summary.json, memory.png, serve/")
    p.add_argument("--repo", type=Path, default=None, help="model repository to serve (default: a tiny one in OUT)")
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default: 30)")
    p.add_argument("--concurrency", type=int, default=64, help="clients, half gRPC and half HTTP (default: 64)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of requests that stream (default: 0.5)")
    p.add_argument("--clips", default="mixed:1-19:16", help="synthetic clips (default: mixed:1-19:16)")
    p.add_argument("--segment-s", type=float, default=60.0, help="load report every this many seconds (60)")
    p.add_argument("--sample-s", type=float, default=5.0, help="memory sample every this many seconds (5)")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="growth is fitted after this (default: --prime-s + min(5 min, a third of --minutes))",
    )
    p.add_argument(
        "--prime-s",
        type=float,
        default=0.0,
        help="first send only the longest clip from every client for this long (not counted in --minutes)",
    )
    p.add_argument("--faults", type=int, default=0, help="kill a model process this many times under the load")
    p.add_argument("--fault-every-s", type=float, default=60.0, help="seconds between faults (60)")
    p.add_argument("--fault-targets", default="llm,canary_qwen_stream", help="processes killed in turn")
    p.add_argument("--restart-window-s", type=float, default=None, help="passed to serve (default: serve's)")
    p.add_argument("--plot", action="store_true", help="only redraw OUT/memory.png from OUT's CSVs")
    args = p.parse_args(argv)
    out: Path = args.out.resolve()
    if args.plot:
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        print(plot(out, summary.get("memory", {}).get("warmup_s")))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else args.prime_s + min(300.0, duration / 3)
    repo = args.repo or tiny_repo(out)
    clips = synthetic_set(args.clips).audio
    assert clips is not None
    extra = [] if args.restart_window_s is None else ["--restart-window-s", f"{args.restart_window_s:g}"]
    serve = Serve(repo, out, extra)
    stop_faults = threading.Event()
    segments: list[dict] = []
    faults: list = []
    try:
        with Sampler(serve, out, args.sample_s) as sampler:
            idle = sampler.rows[0]
            print(f"serve ready; tree RSS {idle['tree_rss_mb']} MB, /dev/shm {idle['shm_used_mb']} MB", flush=True)

            def fault_worker() -> None:
                # the first fault falls at warm-up's end
                if not stop_faults.wait(max(0.0, warmup - args.fault_every_s)):
                    targets = args.fault_targets.split(",")
                    faults.extend(force_faults(serve, args.faults, args.fault_every_s, targets, clips[-1], stop_faults))

            fault_thread = threading.Thread(target=fault_worker, daemon=True) if args.faults else None
            if fault_thread is not None:
                fault_thread.start()

            def segment(clip_set, seconds: float, **tags) -> None:
                sampler.segment = len(segments) + 1
                report = mixed_load(serve, clip_set, args.concurrency, seconds, args.stream_share)
                last = sampler.sample()
                segments.append({"segment": sampler.segment, "t_s": last["t_s"], **tags, **report})
                errors = sum(sum(r["errors"].values()) for r in report.values())
                print(
                    f"[{last['t_s'] / 60:5.1f} min] "
                    + ("(priming) " if tags.get("prime") else "")
                    + ", ".join(
                        f"{p} {r['requests']} requests p50 {r['latency_ms']['p50']} ms" for p, r in report.items()
                    )
                    + f", {errors} errors; tree RSS {last['tree_rss_mb']} MB (PSS {last['tree_pss_mb']}), "
                    f"/dev/shm {last['shm_used_mb']} MB",
                    flush=True,
                )

            if args.prime_s:  # the longest clip only, from every client: each process's peak comes first
                segment(clips[:1], args.prime_s, prime=True)
            end = time.monotonic() + duration
            faulting = lambda: fault_thread is not None and fault_thread.is_alive()  # noqa: E731
            while time.monotonic() < end - 1 or faulting():  # the load goes on until every fault is timed
                left = end - time.monotonic()
                segment(clips, min(args.segment_s, left) if left > 1 else args.segment_s)
            stop_faults.set()
            if fault_thread is not None:
                fault_thread.join(180)
    finally:
        stop_faults.set()
        left = serve.stop()
    requests = sum(r["requests"] for s in segments for p, r in s.items() if isinstance(r, dict))
    errors: Counter = Counter()
    for s in segments:
        for r in s.values():
            if isinstance(r, dict):
                errors.update(r["errors"])
    summary = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "repo": str(repo),
        "concurrency": args.concurrency,
        "minutes": args.minutes,
        "clips": args.clips,
        "stream_share": args.stream_share,
        "load_total": {"requests": requests, "errors": sum(errors.values()), "errors_by_kind": dict(errors)},
        "segments": segments,
        "memory": memory_summary(out, warmup),
        "faults": faults,
        "serve_status": serve.status(),
        "after_stop": left,
        "load_average_end": os.getloadavg(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {plot(out, warmup)} and {out / 'summary.json'}")
    tree = summary["memory"]["tree"]["tree_rss_mb"]
    print(
        f"{requests} requests, {sum(errors.values())} errors; tree RSS {tree['start']} MB at start, "
        f"{tree['after_warmup']} after warm-up, {tree['end']} at the end (max {tree['max']}; "
        f"{tree['per_hour_after_warmup']} MB/h after warm-up); left after stop: {left}"
    )
    return 0 if not left["processes_left"] and not left["shm_regions_left"] and left["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
