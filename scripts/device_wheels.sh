#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that the lent GPU machine lacks (Python 3.12, torch 2.11,
# no network there): NeMo 3.0 for the baseline, soundfile/soxr/whisper-normalizer for this package.
# scripts/gpu_bench.sh installs them there. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
# Two have no wheel on PyPI: build them from source here (pure Python, so they fit any machine).
no_wheel="antlr4_python3_runtime intervaltree"
while read -r spec; do
  [[ -z "$spec" ]] && continue
  name="${spec%%==*}"
  if ls .whl | grep -qi "^${name//_/[-_]}-${spec##*==}-"; then continue; fi
  if [[ " $no_wheel " == *" $name "* ]]; then
    python3 -m pip wheel -q --no-deps -w .whl "$spec"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d .whl "$spec"
  fi
done < scripts/device_wheels.txt
du -sh .whl
