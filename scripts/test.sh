#!/usr/bin/env bash
# Run the whole test suite (lint, type check, NeMo parity, ONNX Runtime, real Triton server, vLLM) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
.venv/bin/ruff check canary_qwen tests scripts
.venv/bin/ruff format --check canary_qwen tests scripts
.venv/bin/mypy
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
# vLLM lives in .venv-vllm (see setup.sh); its tests skip in .venv and run there. Arguments select .venv's tests.
if [ $# -eq 0 ]; then
  .venv-vllm/bin/python -m pytest -q tests/test_vllm.py tests/test_triton_vllm.py tests/test_openai_vllm.py || status=$?
fi
exit "$status"
