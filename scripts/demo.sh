#!/usr/bin/env bash
# The main job on the embedded CPU default: tiny random checkpoint (or --model) -> ONNX export ->
# Triton model repository -> bundled Triton server -> client transcribes a spoken clip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing espeak-ng (speaks the demo clip)"
    apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "espeak-ng is missing: install it (apt-get install espeak-ng) or pass --audio FILE" >&2
  fi
fi
exec .venv/bin/canary-qwen demo "$@"
