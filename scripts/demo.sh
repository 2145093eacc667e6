#!/usr/bin/env bash
# The main job on the embedded CPU default: tiny random checkpoint (or --model) -> ONNX export ->
# Triton model repository -> bundled Triton server -> client transcribes a spoken clip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system_deps.sh
exec .venv/bin/canary-qwen demo "$@"
