"""A larger NeMo fidelity sweep than tests/test_fidelity_sweep.py: every case x several seeds x many clip
lengths, each clip alone and all in one mixed batch, for torch / torch-fast / onnx against NeMo 3.0.

    python scripts/fidelity_sweep.py                       # 4 cases x 5 seeds, 20 ms .. 30 s
    python scripts/fidelity_sweep.py --case released-shape --seeds 3   # replay one test failure

Needs nemo-toolkit (the `nemo` extra). Prints one line per model and a summary; exit code 1 on any
disagreement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SECONDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1, 1.37, 1.6, 2.0, 2.5, 3.0, 4.0, 5.0, 8.0, 15.0, 30.0)


def main() -> int:
    from nemo_build import CASES, build_nemo_salm, compare_with_nemo, sweep_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run (default: all)")
    p.add_argument("--seeds", default="0-4", help="seeds: N, N-M or a comma list (default: 0-4)")
    p.add_argument("--seconds", default=",".join(map(str, SECONDS)), help="clip lengths in seconds, comma list")
    p.add_argument("--max-new-tokens", type=int, default=10)
    args = p.parse_args()
    if "-" in args.seeds:
        lo, hi = map(int, args.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
    seconds = [float(s) for s in args.seconds.split(",")]

    import torch

    from canary_qwen.backends.fast_torch import FastTorchBackend
    from canary_qwen.backends.onnx_runtime import OnnxBackend
    from canary_qwen.backends.torch_ref import TorchBackend
    from canary_qwen.export.artifacts import export_all

    torch.set_num_threads(1)  # tiny models: a second thread only adds hand-off cost
    compared, bad_by_backend, bad_by_length, bad_models = 0, Counter(), Counter(), []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        for name in args.case or list(CASES):
            shape, prompt = CASES[name]
            for seed in seeds:
                out = Path(tmp) / f"{name}-{seed}" / "salm"
                nemo = build_nemo_salm(out, shape, seed)
                export = export_all(out, out.parent / "export", progress=False)
                backends = [
                    TorchBackend(str(out)),
                    FastTorchBackend(str(out), dtype="fp32"),
                    OnnxBackend(str(export.root)),
                ]
                clips = [sweep_clip(s, seed) for s in seconds]
                alone, found = compare_with_nemo(nemo, backends, clips, seconds, prompt, args.max_new_tokens)
                compared += 2 * len(clips) * len(backends)
                distinct = len({tuple(t) for t in alone})
                for m in found:
                    bad_by_backend[m.backend] += 1
                    bad_by_length[m.seconds] += 1
                if found:
                    bad_models.append(f"{name} seed {seed}")
                print(
                    f"{name} seed {seed}: {len(found)} disagreements, {distinct} distinct NeMo outputs of {len(clips)}",
                    flush=True,
                )
                for m in found[:4]:
                    print(f"    {m.backend} {m.batch} {m.seconds} s: NeMo {m.nemo} vs {m.ours}")
    models = len(args.case or CASES) * len(seeds)
    print(
        f"\n{models} NeMo-built models, {len(seconds)} clip lengths ({min(seconds)}-{max(seconds)} s), "
        f"{compared} clip decodes compared (alone + mixed batch, torch / torch-fast / onnx): "
        f"{sum(bad_by_backend.values())} disagree with NeMo; {time.perf_counter() - start:.0f} s"
    )
    if bad_models:
        print("models with disagreements:", ", ".join(bad_models))
        print("by backend:", dict(bad_by_backend), "by length:", dict(sorted(bad_by_length.items())))
    return 1 if bad_models else 0


if __name__ == "__main__":
    sys.exit(main())
