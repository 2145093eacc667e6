"""Put Triton's ``perf_analyzer`` into the virtual environment (``.venv/bin/perf_analyzer``).

PyPI's ``perf-analyzer`` is an empty placeholder and today's ``tritonclient`` wheels no longer carry the
binary. ``tritonclient`` 2.41.0 (x86_64) still does; it needs ``libb64.so.0d`` and ``libcudart.so.12``
(loaded even for CPU-only runs), both of which the ``nvidia-pytriton`` wheel already bundles. So: fetch
that one wheel (hash-checked), take the binary out, and write a wrapper that points the loader at
pytriton's copies of the two libraries. Anything else (another CPU, no network) prints why and leaves
the environment as it is: the perf_analyzer test then skips with that reason.

Usage: python scripts/install_perf_analyzer.py  (with the venv's python; scripts/setup.sh runs it)
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "tritonclient-2.41.0-py3-none-manylinux1_x86_64.whl"
WHEEL_SHA256 = "cf4ed5df836fa99937678a9fd852f86ba05c7b83656dd0a540e20afdb9ab4629"
MEMBER = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
# soname the binary asks for -> prefix of pytriton's auditwheel-renamed copy in nvidia_pytriton.libs
LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def _works(wrapper: Path) -> bool:
    if not wrapper.is_file():
        return False
    run = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True)
    return run.returncode == 0 and "Perf Analyzer" in run.stdout + run.stderr


def _download(dest: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux1_x86_64",
            "tritonclient==2.41.0",
            "-d",
            str(dest),
        ],
        check=True,
    )
    wheel = dest / WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def install() -> str:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"skipped: the binary exists for Linux x86_64 only, not {sys.platform} {platform.machine()}"
    venv_bin = Path(sysconfig.get_path("scripts"))
    wrapper = venv_bin / "perf_analyzer"
    if _works(wrapper):
        return f"already there: {wrapper}"
    bundled = Path(sysconfig.get_path("purelib")) / "nvidia_pytriton.libs"
    home = venv_bin.parent / "libexec" / "perf_analyzer"
    home.mkdir(parents=True, exist_ok=True)
    for soname, prefix in LIBS.items():
        found = sorted(bundled.glob(prefix + "*.so*"))
        if not found:
            return f"skipped: {bundled} has no {prefix}* (install nvidia-pytriton first)"
        link = home / soname
        link.unlink(missing_ok=True)
        link.symlink_to(found[0])
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_download(Path(tmp))) as wheel:
            (home / "perf_analyzer").write_bytes(wheel.read(MEMBER))
    (home / "perf_analyzer").chmod(0o755)
    wrapper.write_text(
        "#!/bin/sh\n# Triton perf_analyzer 2.41.0 with nvidia-pytriton's libb64 and libcudart (scripts/install_perf_analyzer.py)\n"
        f'LD_LIBRARY_PATH="{home}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" exec "{home}/perf_analyzer" "$@"\n'
    )
    wrapper.chmod(0o755)
    if not _works(wrapper):
        raise RuntimeError(f"{wrapper} was written but `perf_analyzer --version` fails")
    return f"installed: {wrapper}"


if __name__ == "__main__":
    try:
        print(f"perf_analyzer {install()}")
    except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
        print(f"perf_analyzer not installed ({e}); its test will skip", file=sys.stderr)
