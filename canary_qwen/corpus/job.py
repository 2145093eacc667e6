"""Run a corpus through Ray Data: actors that each hold one backend transcribe large batches of files.

The driver lists the files still to do, Ray Data feeds them to a fixed pool of actors (one backend each, made
once through the backend registry), and every finished batch comes back to the driver, which commits it
(``results.ResultStore``) before counting it. Ray Data starts its actors with ``max_restarts=-1`` and
``max_task_retries=-1`` (``ActorPoolMapOperator._apply_default_remote_args``): a worker that dies is started
again and its unfinished batch is run once more; a batch only reaches the driver when it has finished, so
nothing is lost, and the fold keeps one row per file should a batch ever arrive twice. (A batch that kills
its worker every time, say by running out of memory, is retried without end: lower --files-per-task.)
Audio paths must be readable from every node (shared storage); results travel back through Ray, so ``OUT``
only needs to be on the driver's machine.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..defaults import MAX_NEW_TOKENS, MAX_WINDOW_S
from ..errors import ExternalToolError, UsageError, import_optional
from ..pipeline.batching import FileResult, transcribe_files
from ..precision import resolve_precision
from ..registry import SERVER, backend_spec, create_backend
from .results import COLUMNS, ResultStore, fingerprint, model_identity

RAY_REQUIREMENT = "ray[data] 2.60 (pip install 'canary-qwen[ray]')"


@dataclass(frozen=True)
class DecodeOptions:
    """What each worker runs: the backend, its model, and the decoding options (as ``transcribe`` takes them)."""

    backend: str
    model: str  # checkpoint / export for local backends; for triton a label of what the servers serve
    urls: tuple[str, ...] = ()  # triton servers, one client per worker, dealt round-robin
    dtype: str | None = None  # the backend's precision; None: its default on the workers' device
    batch_size: int = 8
    max_new_tokens: int = MAX_NEW_TOKENS
    prompt: str | None = None
    max_window_s: float | None = MAX_WINDOW_S

    def __post_init__(self) -> None:
        server = backend_spec(self.backend).source == SERVER
        if server != bool(self.urls):
            raise UsageError(
                "--backend triton needs --url HOST:PORT[,...]" if server else "--url needs --backend triton"
            )
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError("--batch-size and --max-new-tokens must be at least 1")

    def identity(self) -> dict[str, Any]:
        """What decides the text: a rerun with the same identity skips the files it already did."""
        fields = asdict(self)
        del fields["urls"], fields["batch_size"]  # which server, or how clips are grouped, does not change text
        if not self.urls:  # a Triton label is only a name, even where a folder of that name exists
            fields["model"] = model_identity(self.model)
        return fields


@dataclass(frozen=True)
class ClusterOptions:
    address: str | None = None  # None: Ray's rule ($RAY_ADDRESS, a cluster on this machine, or a new local one)
    workers: int | None = None  # None: one per triton URL, else as many as the cluster's GPUs (or CPUs) hold
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    files_per_task: int = 64  # files a worker takes at a time; a dead worker redoes at most these

    def __post_init__(self) -> None:
        if (self.workers is not None and self.workers < 1) or self.files_per_task < 1:
            raise UsageError("--workers and --files-per-task must be at least 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise UsageError("--cpus-per-worker must be positive and --gpus-per-worker not negative")

    @property
    def device(self) -> str:
        """Where each worker runs its backend."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


@dataclass
class Summary:
    files: int  # in the input
    skipped: int  # already done with the same fingerprint
    transcribed: int = 0  # this run, including failed ones
    failed: list[str] = field(default_factory=list)  # error messages of input files, from all runs
    audio_s: float = 0.0  # this run
    wall_s: float = 0.0  # this run, from starting the workers to the last batch
    fingerprint: str = ""

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0


class UrlDealer:
    """Hands each worker the next Triton URL in turn (a Ray actor, so restarted workers take part too)."""

    def __init__(self, urls: tuple[str, ...]):
        self.urls, self.dealt = urls, 0

    def next(self) -> str:
        url = self.urls[self.dealt % len(self.urls)]
        self.dealt += 1
        return url


class TranscribeWorker:
    """A Ray Data actor: one backend, made once; each call transcribes a batch of paths into result rows."""

    def __init__(self, options: DecodeOptions, fingerprint: str, device: str, dealer=None):
        import ray

        source = ray.get(dealer.next.remote()) if dealer is not None else options.model
        self.options, self.fingerprint = options, fingerprint
        self.backend = create_backend(options.backend, source, device=device, dtype=options.dtype)

    def _row(self, result: FileResult) -> dict[str, Any]:
        t = result.transcription
        return {
            "audio": result.path,
            "duration_s": result.duration_s,
            "text": None if t is None else t.text,
            "token_ids": [] if t is None else list(t.token_ids),
            "backend": self.options.backend,
            "model": self.options.model,
            "fingerprint": self.fingerprint,
            "error": result.error,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        paths = [str(p) for p in batch["audio"]]
        o = self.options
        try:
            results = list(
                transcribe_files(
                    self.backend,
                    paths,
                    batch_size=o.batch_size,
                    prompt=o.prompt,
                    max_new_tokens=o.max_new_tokens,
                    max_window_s=o.max_window_s,
                )
            )
        except Exception as e:
            # A batch the backend crashes on (a bug, GPU out of memory) is recorded against its files, for
            # --retry-failed, instead of ending a run of thousands of hours.
            results = [FileResult(p, 0.0, error=f"{p}: batch failed: {type(e).__name__}: {e}") for p in paths]
        rows = [self._row(r) for r in results]
        return {c: [r[c] for r in rows] for c in COLUMNS}


class Progress:
    """Files, failures, hours of audio and RTFx so far, on stderr at most every ``every_s`` seconds."""

    def __init__(self, total: int, log: Callable[[str], None], every_s: float = 10.0):
        self.total, self.log, self.every_s = total, log, every_s
        self.done = self.failed = 0
        self.audio_s = 0.0
        self.start = self.last = time.perf_counter()

    def add(self, rows: list[dict]) -> None:
        self.done += len(rows)
        self.failed += sum(1 for r in rows if r["error"])
        self.audio_s += sum(r["duration_s"] for r in rows)
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self.log(
                f"{self.done}/{self.total} files ({self.failed} failed), {self.audio_s / 3600:.3f} h of audio, "
                f"RTFx {self.audio_s / (now - self.start):.1f}, {now - self.start:.0f} s"
            )

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.start


@contextmanager
def _ray_connected(ray, address: str | None) -> Iterator[None]:
    """Use the Ray session this process already has; else connect (or start one) and shut it down after."""
    if ray.is_initialized():
        yield
        return
    local = {"include_dashboard": False} if address == "local" else {}
    ray.init(address=address, logging_level=logging.WARNING, **local)
    try:
        yield
    finally:
        ray.shutdown()


def _worker_count(ray, cluster: ClusterOptions, urls: tuple[str, ...]) -> int:
    """--workers, or what the cluster holds; more than it holds is refused (Ray would wait for them forever)."""
    resources = ray.cluster_resources()
    need = (("GPU", cluster.gpus_per_worker), ("CPU", cluster.cpus_per_worker))
    fit = min(int(resources.get(kind, 0) // per) for kind, per in need if per > 0)
    workers = cluster.workers or (len(urls) if urls else fit)
    if workers > fit or fit < 1:
        have = ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind, per in need if per > 0)
        raise UsageError(
            f"{workers} workers with {cluster.cpus_per_worker:g} CPU and {cluster.gpus_per_worker:g} GPU each do not "
            f"fit the Ray cluster ({have}); lower --workers, --cpus-per-worker or --gpus-per-worker"
        )
    return workers


def transcribe_corpus(
    paths: list[str],
    out: str,
    options: DecodeOptions,
    cluster: ClusterOptions,
    *,
    retry_failed: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> Summary:
    """Transcribe ``paths`` not yet in ``out`` with these options; returns the closing summary's numbers."""
    ray = import_optional("ray", RAY_REQUIREMENT)
    dtype = resolve_precision(options.backend, options.dtype, cluster.device)  # the default is part of the identity
    options = replace(options, dtype=None if dtype is None else dtype.value)
    identity = options.identity()
    fp = fingerprint(identity)
    with ResultStore(out) as store:
        store.record(fp, identity)
        done = store.done(fp, retry_failed)
        todo = [p for p in paths if p not in done]
        log(f"{len(paths)} files: {len(paths) - len(todo)} already done (fingerprint {fp}), {len(todo)} to transcribe")
        progress = None
        if todo:
            with _ray_connected(ray, cluster.address):
                pipeline = _results(ray, todo, options, cluster, fp)
                progress = Progress(len(todo), log)  # RTFx counts from here: starting workers and models counts
                try:
                    for table in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):
                        rows = table.to_pylist()
                        store.commit(rows)
                        progress.add(rows)
                except ray.exceptions.RayError as e:
                    raise ExternalToolError(
                        f"the Ray job failed after {progress.done} of {len(todo)} files, which are kept; "
                        f"rerun to resume ({type(e).__name__}: {str(e).splitlines()[0]})"
                    ) from e
        merged = store.fold()
    summary = Summary(len(paths), len(paths) - len(todo), fingerprint=fp)
    summary.failed = [merged[p]["error"] for p in paths if merged[p]["error"]]
    if progress is not None:
        summary.transcribed, summary.audio_s, summary.wall_s = progress.done, progress.audio_s, progress.wall_s
    return summary


def _results(ray, todo: list[str], options: DecodeOptions, cluster: ClusterOptions, fp: str):
    """The Ray Data pipeline: paths -> actor pool -> result rows (lazy; runs as the driver iterates)."""
    import_optional("ray.data", RAY_REQUIREMENT)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints its own progress lines
    dealer = ray.remote(num_cpus=0)(UrlDealer).remote(options.urls) if options.urls else None
    # Blocks of at most files_per_task files, each one worker call (batch_size=None) and one committed part.
    blocks = -(-len(todo) // cluster.files_per_task)
    return ray.data.from_items([{"audio": p} for p in todo], override_num_blocks=blocks).map_batches(
        TranscribeWorker,
        fn_constructor_kwargs={
            "options": options,
            "fingerprint": fp,
            "device": cluster.device,
            "dealer": dealer,
        },
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=_worker_count(ray, cluster, options.urls)),
        num_cpus=cluster.cpus_per_worker,
        num_gpus=cluster.gpus_per_worker,
    )
