#!/usr/bin/env bash
# Create .venv with the package and every extra the demo and tests use (once; again when the
# dependency files change). Pinned where the CPU wheels and the Triton python stub need it.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/constraints.txt ] && [ "$stamp" -nt scripts/install_perf_analyzer.py ]; then
  exit 0
fi
"${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
.venv/bin/python scripts/install_perf_analyzer.py
touch "$stamp"
