"""The ``onnx`` flavour of the Triton model repository: every model is a python-backend model running
ONNX Runtime (or plain Python), so it serves on a CPU with the tritonserver bundled in nvidia-pytriton.

Models (tensor names; shapes without the batch dimension, every model has max_batch_size > 0):

| model | inputs | outputs |
| --- | --- | --- |
| ``preprocessing`` | AUDIO fp32 [-1], PROMPT string [1] (optional) | PROMPT_IDS int64 [-1], SAMPLES fp32 [-1] (AUDIO, checked) |
| ``encoder`` | AUDIO fp32 [-1] (ragged, dynamic batching) | EMBEDDINGS fp32 [-1, H] |
| ``llm`` | PROMPT_IDS int64 [-1], EMBEDDINGS fp32 [-1, H] (ragged, dynamic batching), MAX_NEW_TOKENS int32 [1] (optional) | OUTPUT_IDS int64 [-1] |
| ``postprocessing`` | OUTPUT_IDS int64 [-1] | TEXT string [1], TOKEN_IDS int64 [-1] (the ids again) |
| ``canary_qwen`` (ensemble) | AUDIO fp32 [-1], PROMPT string [1] (optional), MAX_NEW_TOKENS int32 [1] (optional) | TEXT string [1], OUTPUT_IDS int64 [-1] |
| ``llm_stream`` | as ``llm``, decoupled: one OUTPUT_IDS [1] response per token | OUTPUT_IDS int64 [-1] |
| ``canary_qwen_stream`` (decoupled BLS) | as ``canary_qwen`` | TEXT string [1] pieces, then an empty final response |

The last two exist with ``decoupled_streaming=True``. ``llm_stream`` is the llm again with a decoupled
config: an ensemble that contains a decoupled step counts as decoupled, and Triton's HTTP endpoint and
gRPC ModelInfer refuse decoupled models, so the ensemble needs a non-decoupled ``llm`` of its own.

Every artifact a model reads is hard-linked (copied across file systems) into its version folder with
a ``manifest.json`` of its own, so the repository can be moved or copied as a whole. The model code is
``canary_qwen.triton_repo.models.*``, copied as ``model.py``; it imports ``canary_qwen``, so the server's
Python (the one its python stub runs) must have this package installed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from ..export.manifest import MANIFEST, Manifest, read_manifest
from .config_check import check_ensemble

ENSEMBLE = "canary_qwen"
STREAM = "canary_qwen_stream"
PREPROCESSING, ENCODER, LLM, LLM_STREAM, POSTPROCESSING = "preprocessing", "encoder", "llm", "llm_stream", "postprocessing"
MODEL_NAMES = (PREPROCESSING, ENCODER, LLM, POSTPROCESSING, ENSEMBLE, LLM_STREAM, STREAM)
VERSION = "1"
REPO_INFO = "canary_qwen_repo.json"  # a file at the repository root: Triton only looks at folders

# model -> (code file in canary_qwen.triton_repo.models, artifacts it reads)
_MODEL_FILES = {
    PREPROCESSING: ("preprocessing.py", ("tokenizer",)),
    ENCODER: ("encoder.py", ("encoder",)),
    LLM: ("llm.py", ("decoder", "embed_tokens")),
    LLM_STREAM: ("llm.py", ("decoder", "embed_tokens")),
    POSTPROCESSING: ("postprocessing.py", ("tokenizer",)),
    STREAM: ("stream.py", ("tokenizer",)),
}


# -- config text ---------------------------------------------------------------------------------------
def _tensor(name: str, dtype: str, dims, *, optional: bool = False, ragged: bool = False) -> str:
    extra = (" optional: true" if optional else "") + (" allow_ragged_batch: true" if ragged else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ]{extra} }}'


def _io(kind: str, tensors: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(tensors) + "\n]\n"


def _params(params: dict) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _python_model(name, max_batch, inputs, outputs, *, instances=1, queue_delay_us=None, decoupled=False, params=None) -> str:
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    if queue_delay_us is not None:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    text += _io("input", inputs) + _io("output", outputs)
    text += f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]\n"
    return text + _params(params or {})


def _audio_inputs() -> list[str]:
    return [_tensor("AUDIO", "TYPE_FP32", [-1]), _tensor("PROMPT", "TYPE_STRING", [1], optional=True)]


def _llm_tensors(hidden: int) -> tuple[list[str], list[str]]:
    inputs = [
        _tensor("PROMPT_IDS", "TYPE_INT64", [-1], ragged=True),
        _tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden], ragged=True),
        _tensor("MAX_NEW_TOKENS", "TYPE_INT32", [1], optional=True),
    ]
    return inputs, [_tensor("OUTPUT_IDS", "TYPE_INT64", [-1])]


def _step(model: str, inputs: dict, outputs: dict) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'    {{ model_name: "{model}" model_version: -1{maps} }}'


def ensemble_config(max_batch: int) -> str:
    inputs = _audio_inputs() + [_tensor("MAX_NEW_TOKENS", "TYPE_INT32", [1], optional=True)]
    outputs = [_tensor("TEXT", "TYPE_STRING", [1]), _tensor("OUTPUT_IDS", "TYPE_INT64", [-1])]
    steps = [
        # A chain, not preprocessing and encoder side by side: when two parallel steps of one request both
        # fail, Triton 2.51's gRPC endpoint can stop answering later ensemble requests (measured; HTTP is
        # unaffected). preprocessing checks the audio and hands the checked samples on.
        _step(PREPROCESSING, {"AUDIO": "AUDIO", "PROMPT": "PROMPT"}, {"PROMPT_IDS": "prompt_ids", "SAMPLES": "samples"}),
        _step(ENCODER, {"AUDIO": "samples"}, {"EMBEDDINGS": "embeddings"}),
        _step(LLM, {"PROMPT_IDS": "prompt_ids", "EMBEDDINGS": "embeddings", "MAX_NEW_TOKENS": "MAX_NEW_TOKENS"},
              {"OUTPUT_IDS": "output_ids"}),
        # OUTPUT_IDS comes back from postprocessing, not straight from llm: Triton 2.51 prunes an ensemble
        # output the client did not ask for even when a later step reads it ("unexpected deadlock").
        _step(POSTPROCESSING, {"OUTPUT_IDS": "output_ids"}, {"TEXT": "TEXT", "TOKEN_IDS": "OUTPUT_IDS"}),
    ]
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n' + _io("input", inputs) + _io("output", outputs)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def model_configs(
    model: dict, *, max_batch: int, instances: int, queue_delay_us: int, decoupled_streaming: bool,
    max_audio_s: float, max_new_tokens: int, device: str, ort_threads: int,
) -> dict[str, str]:
    """config.pbtxt text for every model of the repository, by model name."""
    hidden = model["hidden_size"]
    runtime = {"device": device, "ort_threads": ort_threads}
    llm_in, llm_out = _llm_tensors(hidden)
    configs = {
        PREPROCESSING: _python_model(PREPROCESSING, max_batch, _audio_inputs(),
                                     [_tensor("PROMPT_IDS", "TYPE_INT64", [-1]), _tensor("SAMPLES", "TYPE_FP32", [-1])],
                                     params={"max_audio_s": max_audio_s}),
        ENCODER: _python_model(ENCODER, max_batch, [_tensor("AUDIO", "TYPE_FP32", [-1], ragged=True)],
                               [_tensor("EMBEDDINGS", "TYPE_FP32", [-1, hidden])], instances=instances,
                               queue_delay_us=queue_delay_us, params={"max_audio_s": max_audio_s, **runtime}),
        LLM: _python_model(LLM, max_batch, llm_in, llm_out, instances=instances, queue_delay_us=queue_delay_us,
                           params={"max_new_tokens": max_new_tokens, **runtime}),
        POSTPROCESSING: _python_model(POSTPROCESSING, max_batch, [_tensor("OUTPUT_IDS", "TYPE_INT64", [-1])],
                                      [_tensor("TEXT", "TYPE_STRING", [1]), _tensor("TOKEN_IDS", "TYPE_INT64", [-1])]),
        ENSEMBLE: ensemble_config(max_batch),
    }
    if decoupled_streaming:
        configs[LLM_STREAM] = _python_model(LLM_STREAM, max_batch, llm_in, llm_out, instances=instances,
                                            queue_delay_us=queue_delay_us, decoupled=True,
                                            params={"max_new_tokens": max_new_tokens, **runtime})
        stream_in = _audio_inputs() + [_tensor("MAX_NEW_TOKENS", "TYPE_INT32", [1], optional=True)]
        configs[STREAM] = _python_model(
            STREAM, max_batch, stream_in, [_tensor("TEXT", "TYPE_STRING", [1])], decoupled=True,
            params={"max_audio_s": max_audio_s, "max_new_tokens": max_new_tokens, "encoder_model": ENCODER,
                    "llm_model": LLM_STREAM, "max_streams": 4 * max_batch},
        )
    return configs


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
                raise FileNotFoundError(f"{src} is missing or not the size {MANIFEST} records: re-run `canary-qwen export`")
            counts[link_or_copy(src, dest / f["path"])] += 1
        data["artifacts"][name] = entry
    (dest / MANIFEST).write_text(json.dumps(data, indent=2))
    return counts


def model_code(filename: str) -> str:
    return resources.files("canary_qwen.triton_repo.models").joinpath(filename).read_text()


def generate_onnx_repo(
    export_dir,
    out_dir,
    *,
    max_batch: int = 8,
    instances: int = 1,
    queue_delay_us: int = 2000,
    decoupled_streaming: bool = True,
    max_audio_s: float | None = None,
    max_new_tokens: int = 128,
    device: str = "cpu",
    ort_threads: int = 0,
) -> Path:
    """Write the onnx-flavour model repository for the export in ``export_dir`` to ``out_dir``; returns it.

    ``max_batch``: largest batch each model takes (and the ensemble's max_batch_size); ``instances``:
    instances of encoder / llm / llm_stream; ``queue_delay_us``: how long their dynamic batchers wait to
    fill a batch; ``max_audio_s``: longest clip accepted (default: the export's max_audio_s);
    ``max_new_tokens``: default decoding budget (requests may send MAX_NEW_TOKENS); ``device``: cpu, or
    cuda with onnxruntime-gpu in the server's Python; ``ort_threads``: intra-op threads per session (0:
    ONNX Runtime's default). Folders of this repository's model names in ``out_dir`` are replaced;
    anything else there is left alone.
    """
    if max_batch < 1 or instances < 1 or queue_delay_us < 0 or max_new_tokens < 1 or ort_threads < 0:
        raise ValueError("max_batch, instances and max_new_tokens must be >= 1; queue_delay_us and ort_threads >= 0")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    manifest = read_manifest(export_dir)
    if max_audio_s is None:
        max_audio_s = float(manifest.data.get("max_audio_s", 40.0))
    if not max_audio_s > 0:
        raise ValueError(f"max_audio_s must be > 0, got {max_audio_s}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = model_configs(
        manifest.model, max_batch=max_batch, instances=instances, queue_delay_us=queue_delay_us,
        decoupled_streaming=decoupled_streaming, max_audio_s=max_audio_s, max_new_tokens=max_new_tokens,
        device=device, ort_threads=ort_threads,
    )
    for name in MODEL_NAMES:  # a stale llm_stream / canary_qwen_stream from an earlier run must go too
        if (out / name).exists():
            shutil.rmtree(out / name)
    counts = {"linked": 0, "copied": 0}
    for name, text in configs.items():
        version_dir = out / name / VERSION
        version_dir.mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(text)
        if name in _MODEL_FILES:
            code, artifacts = _MODEL_FILES[name]
            (version_dir / "model.py").write_text(model_code(code))
            for kind, n in copy_artifacts(manifest, artifacts, version_dir).items():
                counts[kind] += n
    (out / REPO_INFO).write_text(json.dumps({
        "flavor": "onnx",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_dir": str(manifest.root.resolve()),
        "models": sorted(configs),
        "settings": {"max_batch": max_batch, "instances": instances, "queue_delay_us": queue_delay_us,
                     "decoupled_streaming": decoupled_streaming, "max_audio_s": max_audio_s,
                     "max_new_tokens": max_new_tokens, "device": device, "ort_threads": ort_threads},
        "files": counts,
    }, indent=2))
    check_ensemble(out, raise_on_problems=True)
    return out
