#!/usr/bin/env bash
# The GPU measurements, on a machine with an NVIDIA GPU, PyTorch and no network (the lent H100):
#
#   bash scripts/gpu_bench.sh checks   # CUDA-graph test; fp32 and bf16 divergence reports (with NeMo)
#   bash scripts/gpu_bench.sh bench    # NeMo at batch 192 and 384 vs torch-fast, 768 clips of 2-20 s
#   bash scripts/gpu_bench.sh vllm     # torch-fast vs vLLM on a bf16 export, same clips (needs `vllm` installed:
#                                      # pip install 'canary-qwen[vllm]' onnxruntime-gpu; written against vLLM's API, not run on a GPU yet)
#
# Each step writes into $OUT (default: gpu_out/) and makes the full-size random checkpoint itself
# when /tmp/canary_full is missing (a fresh machine). Missing Python packages come from .whl/, which
# `bash scripts/device_wheels.sh` fills beforehand where PyPI is reachable. Afterwards, here:
# copy $OUT/h100 to docs/bench/h100 and render docs/benchmarks.md with it first
# (canary_qwen.bench.report.write_docs over docs/bench/h100, cpu_full and cpu_tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-}"
if [[ "$step" != checks && "$step" != bench && "$step" != vllm ]]; then
  echo "usage: bash scripts/gpu_bench.sh checks|bench|vllm" >&2
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
  vllm)
    python3 -c "import vllm" || { echo "vllm is not installed: pip install 'canary-qwen[vllm]'" >&2; exit 1; }
    export_dir=/tmp/canary_full_export_bf16
    [[ -f "$export_dir/manifest.json" ]] || python3 -m canary_qwen.cli export --model "$ckpt" --out "$export_dir" \
      --precision bf16 --lora-adapter
    python3 -m canary_qwen.cli bench --model "$ckpt" --export-dir "$export_dir" --backends torch-fast vllm \
      --synthetic mixed:2-20:768 --batch-size 768 --tokens-per-second 3.5 --dtype bf16 --device cuda \
      --out "$out/h100_vllm" --no-progress 2>&1 | tee "$out/bench_vllm.log" || failed=1
    ;;
esac
exit "$failed"
