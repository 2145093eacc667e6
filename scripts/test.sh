#!/usr/bin/env bash
# Run the whole test suite (NeMo parity, ONNX Runtime, real Triton server) on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
exec .venv/bin/python -m pytest -q "$@"
