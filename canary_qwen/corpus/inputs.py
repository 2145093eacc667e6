"""What to transcribe: a directory (its audio files, recursively), a glob, or a JSON-lines manifest."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from ..errors import UsageError
from ..pipeline.audio import READABLE_EXTENSIONS

MANIFEST_KEYS = ("audio_filepath", "audio", "path")  # NeMo's manifest key first


def _from_manifest(manifest: Path) -> list[str]:
    """Paths of a JSON-lines manifest; relative ones are relative to the manifest's folder, as NeMo reads them."""
    paths = []
    with open(manifest, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{manifest}:{number}: not a JSON line ({e.msg})") from None
            key = next((k for k in MANIFEST_KEYS if isinstance(entry, dict) and k in entry), None)
            if key is None:
                raise UsageError(f"{manifest}:{number}: no audio path (expected one of {', '.join(MANIFEST_KEYS)})")
            paths.append(os.path.join(manifest.parent, str(entry[key])))
    return paths


def _from_directory(folder: Path) -> list[str]:
    """Files under ``folder`` whose extension is an audio format (other files, such as notes, are not input)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in READABLE_EXTENSIONS]


def list_audio(spec: str) -> list[str]:
    """Absolute audio paths, sorted, each once. A glob keeps every match: a non-audio file gets its error row."""
    path = Path(spec)
    if path.is_dir():
        found, kind = _from_directory(path), f"directory {spec} has no audio files (wav, flac, ogg, ...)"
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        found, kind = _from_manifest(path), f"manifest {spec} lists no files"
    elif path.is_file():
        raise UsageError(f"--input {spec} is a file but not a .jsonl manifest; give a directory, glob or manifest")
    elif glob.has_magic(spec):
        found = [p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p)]
        kind = f"glob {spec!r} matches no files"
    else:
        raise UsageError(f"--input {spec}: no such file or directory")
    if not found:
        raise UsageError(kind)
    return sorted({os.path.abspath(p) for p in found})
