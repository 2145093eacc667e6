#!/usr/bin/env bash
# Run the whole test suite (lint, type check, NeMo parity, ONNX Runtime, real Triton server) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
.venv/bin/ruff check canary_qwen tests scripts
.venv/bin/ruff format --check canary_qwen tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
