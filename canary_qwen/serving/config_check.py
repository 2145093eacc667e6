"""Check a Triton model repository offline, before a server refuses to load it.

Triton reports ensemble wiring mistakes one at a time, at load, deep in its log. These checks
repeat its rules (core ``ValidateEnsembleSchedulingConfig`` / ``ValidateEnsembleConfig``) on the
config.pbtxt files alone, so every problem of a generated repository shows up at once, in tests
and without a server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from ..errors import CanaryQwenError, UsageError


class ModelConfigError(CanaryQwenError, ValueError):
    """A config.pbtxt that does not parse, or a repository with problems (listed in ``problems``)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # pragma: no cover - tritonclient is in the serve extra
        raise ImportError("checking Triton configs needs tritonclient: pip install 'tritonclient[grpc]'") from e
    return model_config_pb2


def parse_model_config(path_or_text: str | os.PathLike):
    """Parse a config.pbtxt (a path, or the text itself) into ``model_config_pb2.ModelConfig``.

    A ``Path`` or a one-line string naming an existing file is read; any other string is parsed as text.
    """
    pb2 = _pb2()
    if isinstance(path_or_text, os.PathLike) or ("\n" not in path_or_text and Path(path_or_text).is_file()):
        source = str(path_or_text)
        try:
            text = Path(path_or_text).read_text()
        except OSError as e:
            raise ModelConfigError(f"{source}: cannot read model config: {e}") from e
    else:
        source, text = "<model config text>", path_or_text
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ModelConfigError(f"{source}: invalid model config: {e}") from e
    return config


@dataclass
class _Tensor:
    """An ensemble tensor: who writes it, who reads it, and the dtype both sides declare."""

    dtype: int | None = None
    writer: str | None = None
    readers: list[int] = field(default_factory=list)  # step indices


def _dims_ok(a, a_batch: bool, b, b_batch: bool) -> bool:
    """Triton's rule: same dims with -1 as wildcard, or same once batch dims are made explicit."""

    def same(x, y):
        return len(x) == len(y) and all(i == j or -1 in (i, j) for i, j in zip(x, y))

    return same(a, b) or same(([-1] if a_batch else []) + a, ([-1] if b_batch else []) + b)


def _check_one_ensemble(name: str, cfg, configs: dict, repo: Path) -> list[str]:
    pb2 = _pb2()
    dtype_name = pb2.DataType.Name
    where = f"ensemble '{name}'"
    problems: list[str] = []
    steps = cfg.ensemble_scheduling.step
    if not steps:
        return [f"{where}: no ensemble_scheduling.step"]
    if len(cfg.instance_group):
        problems.append(f"{where}: instance_group must not be set on an ensemble")
    batch = cfg.max_batch_size > 0
    # ensemble tensor -> (dtype, dims, batching, declared by)
    decl: dict[str, tuple] = {}
    for io in list(cfg.input) + list(cfg.output):
        dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
        decl[io.name] = (io.data_type, dims, batch, name)
    tensors: dict[str, _Tensor] = {}

    def unify(tensor: str, dtype, dims, batching, model: str, ctx: str) -> None:
        if tensor not in decl:
            decl[tensor] = (dtype, dims, batching, model)
            return
        d0, dims0, b0, m0 = decl[tensor]
        if d0 != dtype:
            problems.append(
                f"{ctx}: ensemble tensor '{tensor}' is {dtype_name(dtype)} in '{model}' but {dtype_name(d0)} in '{m0}'"
            )
        elif not _dims_ok(list(dims0), b0, list(dims), batching):
            problems.append(
                f"{ctx}: ensemble tensor '{tensor}' has shape {list(dims)} in '{model}' but {list(dims0)} in '{m0}'"
            )

    for i, step in enumerate(steps):
        ctx = f"{where} step {i} ('{step.model_name}')"
        if not step.model_name:
            problems.append(f"{where} step {i}: model_name is empty")
            continue
        if not step.input_map or not step.output_map:
            problems.append(f"{ctx}: input_map and output_map must both be set")
        for ens in step.output_map.values():
            t = tensors.setdefault(ens, _Tensor())
            if t.writer is not None:
                problems.append(f"{ctx}: ensemble tensor '{ens}' is already written by step {t.writer}")
            t.writer = str(i)
        for ens in step.input_map.values():
            tensors.setdefault(ens, _Tensor()).readers.append(i)

        target = configs.get(step.model_name)
        if target is None:
            problems.append(f"{ctx}: no model '{step.model_name}' with a config.pbtxt in {repo}")
            continue
        if step.model_version > 0 and not (repo / step.model_name / str(step.model_version)).is_dir():
            problems.append(f"{ctx}: model version {step.model_version} has no directory")
        if target.max_batch_size and target.max_batch_size < cfg.max_batch_size:
            problems.append(
                f"{ctx}: max_batch_size {target.max_batch_size} is below the ensemble's {cfg.max_batch_size}"
            )
        t_batch = target.max_batch_size > 0
        inputs = {t.name: t for t in target.input}
        outputs = {t.name: t for t in target.output}
        for model_tensor, ens in step.input_map.items():
            if model_tensor not in inputs:
                problems.append(
                    f"{ctx}: input_map names input '{model_tensor}', which '{step.model_name}' does not have "
                    f"(it has: {', '.join(inputs) or 'none'})"
                )
            else:
                unify(ens, inputs[model_tensor].data_type, inputs[model_tensor].dims, t_batch, step.model_name, ctx)
        for in_name, spec in inputs.items():
            if in_name not in step.input_map and not spec.optional:
                problems.append(f"{ctx}: required input '{in_name}' of '{step.model_name}' is not mapped")
        for model_tensor, ens in step.output_map.items():
            if model_tensor not in outputs:
                problems.append(
                    f"{ctx}: output_map names output '{model_tensor}', which '{step.model_name}' does not have "
                    f"(it has: {', '.join(outputs) or 'none'})"
                )
            else:
                unify(ens, outputs[model_tensor].data_type, outputs[model_tensor].dims, t_batch, step.model_name, ctx)

    # Data flow: every tensor a step reads must be an ensemble input or written by a step; every ensemble
    # output must be written; ensemble inputs and intermediate tensors must be read by someone.
    ens_inputs = {t.name for t in cfg.input}
    ens_outputs = {t.name for t in cfg.output}
    for tname in ens_inputs:
        if tname in tensors and tensors[tname].writer is not None:
            problems.append(f"{where}: ensemble input '{tname}' is also written by step {tensors[tname].writer}")
        if tname not in tensors or not tensors[tname].readers:
            problems.append(f"{where}: ensemble input '{tname}' is not used by any step")
    for tname in ens_outputs:
        if tname not in tensors or tensors[tname].writer is None:
            problems.append(f"{where}: ensemble output '{tname}' is not written by any step")
    for tname, t in tensors.items():
        if tname in ens_inputs or tname in ens_outputs:
            continue
        if t.writer is None:
            problems.append(
                f"{where}: steps {t.readers} read '{tname}', which is neither an ensemble input nor written by a step"
            )
        elif not t.readers:
            problems.append(f"{where}: tensor '{tname}' written by step {t.writer} is never used")
    problems.extend(_cycle_problems(where, steps, tensors, ens_inputs))
    return problems


def _cycle_problems(where: str, steps, tensors: dict, ens_inputs: set) -> list[str]:
    """Steps that can never run because their inputs depend on themselves."""
    ready = set(ens_inputs)
    done: set[int] = set()
    progress = True
    while progress:
        progress = False
        for i, step in enumerate(steps):
            if i not in done and all(ens in ready for ens in step.input_map.values()):
                done.add(i)
                ready.update(step.output_map.values())
                progress = True
    stuck = [i for i in range(len(steps)) if i not in done]
    # report only steps whose missing inputs are written by some step (missing writers are reported above)
    cyclic = [
        i for i in stuck if all(tensors[e].writer is not None or e in ens_inputs for e in steps[i].input_map.values())
    ]
    return [f"{where}: steps {cyclic} can never run (their inputs depend on each other)"] if cyclic else []


def load_repo_configs(repo_dir: str | os.PathLike) -> tuple[dict, list[str]]:
    """Parse every ``<model>/config.pbtxt``: returns ({model name: config}, problems)."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        raise UsageError(f"model repository {repo} is not a directory")
    configs, problems = {}, []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = model_dir / "config.pbtxt"
        if not path.is_file():
            continue  # Triton may auto-complete it; a step naming this model is reported as missing
        try:
            cfg = parse_model_config(path)
        except ModelConfigError as e:
            problems.append(str(e))
            continue
        if cfg.name and cfg.name != model_dir.name:
            problems.append(f"{path}: name '{cfg.name}' differs from its directory '{model_dir.name}'")
        if not any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
            problems.append(f"{model_dir}: no numeric version directory (e.g. '1/'); Triton loads nothing without one")
        configs[model_dir.name] = cfg
    return configs, problems


def check_ensemble(repo_dir: str | os.PathLike, *, raise_on_problems: bool = False) -> list[str]:
    """Check every model config in ``repo_dir`` and the wiring of every ensemble in it.

    Returns the problems found, as readable sentences (empty: all good). With ``raise_on_problems``,
    raises :class:`ModelConfigError` listing them instead.
    """
    configs, problems = load_repo_configs(repo_dir)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble" or cfg.HasField("ensemble_scheduling"):
            if cfg.platform != "ensemble":
                problems.append(f"model '{name}': ensemble_scheduling is set but platform is not \"ensemble\"")
            problems.extend(_check_one_ensemble(name, cfg, configs, Path(repo_dir)))
    if problems and raise_on_problems:
        raise ModelConfigError(
            f"{len(problems)} problem(s) in model repository {repo_dir}:\n  " + "\n  ".join(problems), problems
        )
    return problems
