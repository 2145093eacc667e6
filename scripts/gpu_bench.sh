#!/usr/bin/env bash
# The GPU measurements, on a machine with an NVIDIA GPU, PyTorch and no network (the lent H100):
#
#   bash scripts/gpu_bench.sh checks   # CUDA-graph test; fp32 and bf16 divergence reports (with NeMo)
#   bash scripts/gpu_bench.sh bench    # NeMo at batch 192 and 384 vs torch-fast, 768 clips of 2-20 s
#
# Each step writes into $OUT (default: gpu_out/) and makes the full-size random checkpoint itself
# when /tmp/canary_full is missing (a fresh machine). Missing Python packages come from .whl/, which
# `bash scripts/device_wheels.sh` fills beforehand where PyPI is reachable. Afterwards, here:
# copy $OUT/h100 to docs/bench/h100 and render docs/benchmarks.md with it first
# (canary_qwen.bench.report.write_docs over docs/bench/h100, cpu_full and cpu_tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-}"
if [[ "$step" != checks && "$step" != bench ]]; then
  echo "usage: bash scripts/gpu_bench.sh checks|bench" >&2
  exit 2
fi
out="${OUT:-gpu_out}"
mkdir -p "$out"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
ckpt=/tmp/canary_full
[[ -f "$ckpt/model.safetensors" ]] || python3 -m canary_qwen.cli make-checkpoint --size full --seed 0 --out "$ckpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

failed=0
case "$step" in
  checks)  # each check runs even when an earlier one failed; the exit code says whether any did
    python3 -m pytest -q -p no:cacheprovider tests/test_export.py -k cuda_graph 2>&1 | tee "$out/cuda_graph_test.log" || failed=1
    for dtype in fp32 bf16; do
      python3 -m canary_qwen.bench.divergence --model "$ckpt" --dtype "$dtype" --device cuda --nemo \
        --synthetic mixed:1-20:16 --out "$out/divergence_$dtype.json" 2>&1 | tee "$out/divergence_$dtype.log" || failed=1
    done
    ;;
  bench)
    python3 -m canary_qwen.cli bench --model "$ckpt" --backends nemo torch-fast --synthetic mixed:2-20:768 \
      --batch-size 192 384 --tokens-per-second 3.5 --dtype bf16 --device cuda --out "$out/h100" --no-progress \
      2>&1 | tee "$out/bench.log" || failed=1
    ;;
esac
exit "$failed"
