"""The output of a corpus run: one row per audio file, committed batch by batch so that nothing is lost or doubled.

``OUT/transcripts.jsonl`` (and the same rows in ``OUT/transcripts.parquet``) hold one row per file. While a run
goes, each finished batch is written to ``OUT/parts/`` as its own file, atomically (temporary name, fsync,
rename), so a killed driver leaves only whole batches. Folding merges the parts into ``transcripts.jsonl`` keyed
by audio path, the later row winning: a batch that Ray ran twice (its worker died after finishing it), or a file
redone by a later run, still leaves one row. Folding again after a crash half-way repeats the same merge.

A row's ``fingerprint`` names the model (its files' contents, not where they lie) and the options that change
text, so a rerun skips exactly the files already done the same way; ``OUT/fingerprints.json`` says what each
fingerprint stands for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UsageError

TRANSCRIPTS, PARQUET, PARTS, FINGERPRINTS = "transcripts.jsonl", "transcripts.parquet", "parts", "fingerprints.json"
LOCK = ".lock"
COLUMNS = ("audio", "duration_s", "text", "token_ids", "backend", "model", "fingerprint", "error")
_SAMPLES, _SAMPLE_BYTES, _WHOLE_BYTES = 16, 1 << 16, 1 << 20


def _hash_file(h, path: Path) -> None:
    """Whole small files; 16 evenly spaced 64 KiB samples of large ones (weights differ everywhere, and
    reading gigabytes on every run would cost more than the check is worth)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _WHOLE_BYTES:
            h.update(f.read())
            return
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))


def model_identity(model: str) -> str:
    """A digest of a local model directory's files (names, sizes, sampled contents); anything else (a hub id,
    a label for what Triton servers serve) stands for itself."""
    root = Path(model)
    if not root.is_dir():
        return model
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        _hash_file(h, path)
    return "sha256:" + h.hexdigest()


def fingerprint(options: dict[str, Any]) -> str:
    """16 hex digits of the JSON of ``options`` (backend, model identity, and what changes the text)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomically(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ResultStore:
    """``OUT``: the merged transcripts and the batches committed since the last fold."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = self.out / PARTS
        self.transcripts = self.out / TRANSCRIPTS

    def __enter__(self) -> ResultStore:
        """Create ``OUT``, take its lock (one run writes to it at a time), and fold what an interrupted run left."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"another transcribe-corpus run is writing to {self.out}") from None
        if any(p.suffix == ".jsonl" for p in self.parts.iterdir()):
            self.fold()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()  # closing releases the lock

    def record(self, fingerprint: str, options: dict[str, Any]) -> None:
        """Note in fingerprints.json what ``fingerprint`` stands for."""
        path = self.out / FINGERPRINTS
        known = json.loads(path.read_text()) if path.exists() else {}
        if known.get(fingerprint) != options:
            known[fingerprint] = options
            _write_atomically(path, [json.dumps(known, indent=1, sort_keys=True)])

    def rows(self) -> dict[str, dict]:
        """The merged rows by audio path."""
        return {r["audio"]: r for r in _read_rows(self.transcripts)} if self.transcripts.exists() else {}

    def done(self, fingerprint: str, retry_failed: bool = False) -> set[str]:
        """Paths already transcribed with ``fingerprint`` (failed ones too, unless ``retry_failed``)."""
        return {
            path
            for path, row in self.rows().items()
            if row["fingerprint"] == fingerprint and not (retry_failed and row["error"])
        }

    def commit(self, rows: list[dict]) -> None:
        """One finished batch, whole or not at all; names sort by time so a later part wins the fold."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        _write_atomically(self.parts / name, (json.dumps(r, ensure_ascii=False) for r in rows))

    def fold(self) -> dict[str, dict]:
        """Merge the committed parts into transcripts.jsonl and .parquet (one row per path), then drop them."""
        merged = self.rows()
        parts = sorted(p for p in self.parts.iterdir() if p.suffix == ".jsonl" and not p.name.startswith("."))
        for part in parts:
            merged.update((r["audio"], r) for r in _read_rows(part))
        ordered = [merged[k] for k in sorted(merged)]
        _write_atomically(self.transcripts, (json.dumps(r, ensure_ascii=False) for r in ordered))
        self._write_parquet(ordered)
        for path in parts + [p for p in self.parts.iterdir() if p.suffix == ".tmp"]:  # .tmp: a killed driver's
            path.unlink()
        return merged

    def _write_parquet(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("audio", pa.string()),
                ("duration_s", pa.float64()),
                ("text", pa.string()),
                ("token_ids", pa.list_(pa.int64())),
                ("backend", pa.string()),
                ("model", pa.string()),
                ("fingerprint", pa.string()),
                ("error", pa.string()),
            ]
        )
        path = self.out / PARQUET
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, path)
