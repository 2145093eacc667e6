"""``manifest.json``: what an export directory holds, so later steps (engines, Triton, clients) read
shapes, ids and file hashes instead of guessing them."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
ENGINE_BUILD = "tensorrt_build"  # what build-engines records: versions, GPU, encoder profile
# TensorRT plans and TensorRT-LLM engines load only under the TensorRT / TensorRT-LLM version and GPU
# architecture that built them (unless built version/hardware compatible, which build-engines does not do).
BUILD_KEYS = {"tensorrt": "TensorRT", "tensorrt_llm": "TensorRT-LLM", "compute_capability": "GPU compute capability"}


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("canary-qwen", "torch", "onnx", "onnxruntime", "safetensors", "tokenizers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe(paths: list[Path], root: Path) -> dict[str, Any]:
    """Relative path (of the first entry), sizes and hashes of the files (or every file under a folder)."""
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    entries = [{"path": str(f.relative_to(root)), "bytes": f.stat().st_size, "sha256": sha256(f)} for f in files]
    return {"path": str(paths[0].relative_to(root)), "files": entries}


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    def artifact(self, name: str) -> Path:
        if name not in self.data["artifacts"]:
            raise ArtifactError(f"{self.root} has no {name!r} artifact (have: {', '.join(self.data['artifacts'])})")
        path = self.root / self.data["artifacts"][name]["path"]
        if not path.exists():
            raise ArtifactError(f"{path} is listed in {MANIFEST} but missing: re-run `canary-qwen export`")
        return path

    def onnx_name(self, role: str) -> str:
        """The artifact ONNX Runtime runs as ``role`` ("encoder" or "decoder"): a quantized or fp16 graph where
        the export chose one, else the fp32 graph (also for exports written before the choice was recorded)."""
        return self.data.get("onnx", {}).get(role, role)

    def onnx_graph(self, role: str) -> Path:
        return self.artifact(self.onnx_name(role))

    def engine_build(self) -> dict[str, Any]:
        """What ``canary-qwen build-engines`` recorded about the engines it built for this export."""
        if ENGINE_BUILD not in self.data:
            raise ArtifactError(
                f"{self.root / MANIFEST} has no record of built engines: build them with `canary-qwen build-engines` "
                "(it records the TensorRT versions and GPU they need)"
            )
        return self.data[ENGINE_BUILD]


def installed_version(package: str) -> str | None:
    """A package's version from its metadata, without importing it (tensorrt_llm takes seconds to import)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_engine_build(recorded: dict[str, Any], found: dict[str, str | None]) -> None:
    """Raise :class:`ArtifactError` naming every ``BUILD_KEYS`` entry of ``found`` (``None``: not known here, not
    compared) that differs from what the engines were built with."""
    differ = [
        f"{label} {recorded.get(key)} (found {found[key]})"
        for key, label in BUILD_KEYS.items()
        if found.get(key) is not None and str(found[key]) != str(recorded.get(key))
    ]
    if differ:
        raise ArtifactError(
            f"the TensorRT engines were built for {', '.join(differ)}: rebuild them with "
            "`canary-qwen build-engines` in this environment (see docs/deployment.md)"
        )


def write_manifest(root: Path, data: dict[str, Any]) -> Path:
    path = Path(root) / MANIFEST
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **data}, indent=2))
    return path


def read_manifest(root) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not an export directory (no {MANIFEST}); create one with `canary-qwen export`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {data.get('format_version')}, this toolkit reads {FORMAT_VERSION}"
        )
    return Manifest(root, data)


def record_engine_build(root, record: dict[str, Any]) -> Manifest:
    """Store ``record`` as the manifest's engine build record (``build-engines`` does)."""
    manifest = read_manifest(root)
    data = {k: v for k, v in manifest.data.items() if k != "format_version"}
    write_manifest(manifest.root, {**data, ENGINE_BUILD: record})
    return read_manifest(root)
