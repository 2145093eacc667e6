"""The ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles, made ready to run without PyTriton: its
paths, a backend folder with the python stub for this interpreter, and the environment the stub needs (PATH so it
embeds *this* Python and its site-packages, LD_LIBRARY_PATH for the wheel's vendored libraries and the matching
libpython)."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from ..errors import BackendUnavailable

INSTALL_HINT = "pip install nvidia-pytriton==0.7.0  (or: pip install 'canary-qwen[serve]')"


class TritonNotFoundError(BackendUnavailable):
    """The bundled tritonserver (nvidia-pytriton wheel) is not installed or is incomplete."""


@dataclass(frozen=True)
class BundledTriton:
    """Paths inside an installed ``nvidia-pytriton`` wheel."""

    root: Path  # .../site-packages/pytriton/tritonserver
    binary: Path  # root/bin/tritonserver
    python_backend: Path  # root/backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stubs: Path  # root/python_backend_stubs/<major.minor>/triton_python_backend_stub
    caches: Path  # root/caches (response cache plugins)
    libs: Path  # .../site-packages/nvidia_pytriton.libs (vendored shared libraries)

    def stub_for(self, version: str | None = None) -> Path:
        """The python backend stub built for ``version`` ("3.11"; default: the running interpreter)."""
        version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / "triton_python_backend_stub").is_file())
            raise TritonNotFoundError(
                f"nvidia-pytriton has no python backend stub for Python {version} (it has: {', '.join(have) or 'none'}); "
                "run the server from a virtualenv with one of those Python versions"
            )
        return stub


def find_bundled_triton() -> BundledTriton:
    """Locate tritonserver in the installed ``pytriton`` package (found without importing it)."""
    spec = util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(f"the Triton server is not installed: {INSTALL_HINT}")
    package = Path(list(spec.submodule_search_locations)[0])
    root = package / "tritonserver"
    triton = BundledTriton(
        root=root,
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stubs=root / "python_backend_stubs",
        caches=root / "caches",
        libs=package.parent / "nvidia_pytriton.libs",
    )
    needed = [
        triton.binary,
        triton.python_backend / "libtriton_python.so",
        triton.python_backend / "triton_python_backend_utils.py",
        triton.stubs,
        triton.libs,
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise TritonNotFoundError(
            f"the pytriton package at {package} lacks {', '.join(missing)} (a source build or another version?): {INSTALL_HINT}"
        )
    return triton


def prepare_backend_dir(
    dest: str | os.PathLike, triton: BundledTriton | None = None, python_version: str | None = None
) -> Path:
    """Assemble ``dest/python/`` the way tritonserver expects, and return ``dest`` (for --backend-directory).

    The wheel keeps the stubs for all Python versions apart from the backend library; the backend looks
    for ``triton_python_backend_stub`` next to ``libtriton_python.so``, so the one matching the
    interpreter that will run the models is copied in.
    """
    triton = triton or find_bundled_triton()
    stub = triton.stub_for(python_version)
    dest = Path(dest)
    folder = dest / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for src in (
        triton.python_backend / "libtriton_python.so",
        triton.python_backend / "triton_python_backend_utils.py",
        stub,
    ):
        shutil.copy2(src, folder / src.name)
    return dest


def server_env(triton: BundledTriton, base: dict | None = None) -> dict:
    """Environment for tritonserver and its python stubs.

    The venv's bin goes first on PATH: the stub embeds Python and finds its prefix (so pyvenv.cfg and the
    venv's site-packages) from the ``python3`` it sees there. LIBDIR goes on LD_LIBRARY_PATH so the stub
    loads this interpreter's libpython, not a system one of the same version.
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink to the base one
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    libs = [str(triton.libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    return env


def check_numpy() -> None:
    # The 2.51 stub silently returns empty outputs under numpy 2 (measured); warn early instead.
    try:
        major = int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if major >= 2:
        warnings.warn(
            "numpy >= 2 is installed: Triton 2.51's python backend returns empty outputs with it; install numpy<2",
            RuntimeWarning,
            stacklevel=3,
        )
