"""``python -m canary_qwen.cli``: the same as the ``canary-qwen`` command (scripts/gpu_bench.sh uses it)."""

import sys

from . import main

sys.exit(main())
