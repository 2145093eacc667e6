"""The package's errors. Every error a user can cause (bad input, missing files or engines) derives from
:class:`CanaryQwenError`; the command line prints those as one line and exits 2, anything else is a bug."""

from __future__ import annotations

import importlib
import os


class CanaryQwenError(Exception):
    """Base of every error this package raises on purpose."""


class UsageError(CanaryQwenError, ValueError):
    """An option, argument or combination of them outside what the operation can do."""


class ExternalToolError(CanaryQwenError, RuntimeError):
    """A tool this package drives (TensorRT's builder, trtllm-build, espeak-ng) failed; the message says how."""


class CheckpointError(CanaryQwenError, RuntimeError):
    """A checkpoint is missing, truncated, or does not match its config."""


class ArtifactError(CanaryQwenError, RuntimeError):
    """An export directory is missing, incomplete or from an incompatible version."""


class AudioError(CanaryQwenError, ValueError):
    """Audio that cannot be turned into model input; ``path`` is the file (None for an in-memory array)."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path or '<array>'}: {problem}")


class InputError(CanaryQwenError, ValueError):
    """A request whose tensors or options are not acceptable (answered to the caller, never a crash)."""


class EngineFailed(CanaryQwenError, RuntimeError):
    """An in-process engine failed while it decoded a request (the server's fault; the request may succeed again)."""


class RequestTimeout(CanaryQwenError):
    """No answer within the time a request is given (by a server, or by the engine in this process)."""


class Overloaded(CanaryQwenError):
    """Too many requests at once: this one was refused at once instead of queued; retrying later can succeed."""


class BackendUnavailable(CanaryQwenError):
    """A backend cannot run here; the message says why (and what to install or pass)."""


class MissingDependencyError(BackendUnavailable, ImportError):
    """A path was used where its package (or a GPU) is not available.

    ``package`` is the import name that failed, ``requirement`` says what to install.
    """

    def __init__(self, package: str, requirement: str, detail: str | None = None):
        message = f"{package} is not available: this path needs {requirement}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.package = package
        self.requirement = requirement


def import_optional(package: str, requirement: str):
    """``import package`` or a :class:`MissingDependencyError` that says what to install."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise MissingDependencyError(package, requirement, str(e)) from e
