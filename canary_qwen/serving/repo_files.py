"""Writing a Triton model repository: config.pbtxt pieces, model code, artifacts, the repository's info file.

Shared by the onnx and trt flavours. Config text is written by hand (protobuf text format) and every
generated repository is parsed back and checked (``config_check``) before a generator returns.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from ..errors import ArtifactError
from ..export.manifest import MANIFEST, Manifest

VERSION = "1"
REPO_INFO = "canary_qwen_repo.json"  # a file at the repository root: Triton only looks at folders
# The models both flavours have under the same names, with the same public interface.
ENSEMBLE, STREAM = "canary_qwen", "canary_qwen_stream"
PREPROCESSING, POSTPROCESSING = "preprocessing", "postprocessing"


# -- request bounds ----------------------------------------------------------------------------------------
# -- config text ---------------------------------------------------------------------------------------
def tensor(name: str, dtype: str, dims, *, scalar: bool = False, optional: bool = False, ragged: bool = False) -> str:
    """One input/output entry; ``scalar``: dims [1] that the model sees as [] (``reshape: { shape: [ ] }``)."""
    extra = (" reshape: { shape: [ ] }" if scalar else "") + (" optional: true" if optional else "")
    extra += " allow_ragged_batch: true" if ragged else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def io_block(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def params_block(params: dict) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: {_quoted(v)} }} }}\n' for k, v in params.items())


def _quoted(value) -> str:
    """A protobuf text-format string (a JSON value's quotes escaped)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def python_model(
    name, max_batch, inputs, outputs, *, instances=1, queue_delay_us=None, queue=None, decoupled=False, params=None
) -> str:
    """``queue``: (max_queue_size, timeout_us) for the dynamic batcher's queue; a request beyond the size, or
    waiting longer than the timeout (0: no limit), is refused at once ("Exceeds maximum queue size",
    "Request timeout expired") instead of piling up behind the others."""
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    if queue_delay_us is not None or queue is not None:
        policy = ""
        if queue is not None:
            size, timeout_us = queue
            policy = f" default_queue_policy {{ max_queue_size: {size} timeout_action: REJECT"
            policy += f" default_timeout_microseconds: {timeout_us} }}" if timeout_us else " }"
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us or 0}{policy} }}\n"
    text += io_block("input", inputs) + io_block("output", outputs)
    text += f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
    return text + params_block(params or {})


def audio_inputs(*, optional: bool = False, ragged: bool = False) -> list[str]:
    """AUDIO (16 kHz float32 samples) and the optional PROMPT string: what a client sends. ``optional``: AUDIO may be
    left out (models with LLM mode, which take a DIALOGUE instead)."""
    return [
        tensor("AUDIO", "TYPE_FP32", [-1], optional=optional, ragged=ragged),
        tensor("PROMPT", "TYPE_STRING", [1], optional=True),
    ]


def dialogue_input() -> str:
    """DIALOGUE: an LLM-mode request in place of AUDIO, its turns as JSON (``checks.read_dialogue``)."""
    return tensor("DIALOGUE", "TYPE_STRING", [1], optional=True)


def max_new_tokens_input() -> str:
    return tensor("MAX_NEW_TOKENS", "TYPE_INT32", [1], optional=True)


def ensemble_outputs() -> list[str]:
    """TEXT and OUTPUT_IDS: the ensemble's answer, and each response of a stream model (a piece, and its ids)."""
    return [tensor("TEXT", "TYPE_STRING", [1]), tensor("OUTPUT_IDS", "TYPE_INT64", [-1])]


def prompt_tokens_output() -> str:
    """PROMPT_TOKENS: a request's prompt length in tokens (the engine models; an API's usage counts it)."""
    return tensor("PROMPT_TOKENS", "TYPE_INT64", [1])


def ensemble_step(model: str, inputs: dict, outputs: dict) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'    {{ model_name: "{model}" model_version: -1{maps} }}'


# -- files -----------------------------------------------------------------------------------------------
def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` (a fresh name), or copy it where linking is impossible; says which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)
        return "copied"


def copy_artifacts(manifest: Manifest, names, dest: Path) -> dict[str, int]:
    """Every file of the named artifacts, at the same relative paths, plus a ``manifest.json`` listing
    only those artifacts (so ``read_manifest(dest).artifact(name)`` works there). Returns link/copy counts."""
    counts = {"linked": 0, "copied": 0}
    data = dict(manifest.data)
    data["artifacts"] = {}
    for name in names:
        manifest.artifact(name)  # a clear ArtifactError when it is missing
        entry = manifest.data["artifacts"][name]
        for f in entry["files"]:
            src = manifest.root / f["path"]
            if not src.is_file() or src.stat().st_size != f["bytes"]:
                raise ArtifactError(f"{src} is missing or not the size {MANIFEST} records: re-run `canary-qwen export`")
            counts[link_or_copy(src, dest / f["path"])] += 1
        data["artifacts"][name] = entry
    (dest / MANIFEST).write_text(json.dumps(data, indent=2))
    return counts


def model_code(filename: str) -> str:
    return resources.files("canary_qwen.serving.models").joinpath(filename).read_text()


def write_models(out: Path, manifest: Manifest | None, configs: dict[str, str], model_files: dict) -> dict[str, int]:
    """Each model's folder: config.pbtxt, and for python models (``model_files``: name -> (code file in
    ``canary_qwen.serving.models``, artifact names)) ``1/model.py`` plus the artifacts it reads.
    Returns how many artifact files were hard-linked and copied."""
    counts = {"linked": 0, "copied": 0}
    for name, text in configs.items():
        version_dir = out / name / VERSION
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text)
        if name in model_files:
            code, artifacts = model_files[name]
            assert manifest is not None, "python models with artifacts need the export's manifest"
            (version_dir / "model.py").write_text(model_code(code))
            for kind, n in copy_artifacts(manifest, artifacts, version_dir).items():
                counts[kind] += n
    return counts


def replace_model_dirs(out: Path, names) -> None:
    """Remove the folders of ``names`` in ``out`` (stale models of an earlier run); anything else stays."""
    for name in names:
        if (out / name).exists():
            shutil.rmtree(out / name)


def write_repo_info(out: Path, flavor: str, export_root: Path, models, settings: dict, files: dict) -> None:
    (out / REPO_INFO).write_text(
        json.dumps(
            {
                "flavor": flavor,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "export_dir": str(export_root.resolve()),
                "models": sorted(models),
                "settings": settings,
                "files": files,
            },
            indent=2,
        )
    )
