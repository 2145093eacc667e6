"""Greedy tokens of every CPU backend against NeMo 3.0 on random SALMs that NeMo itself built and saved.

Shapes vary what the fixed-checkpoint parity tests keep constant: encoder depth, heads, kernel size,
xscaling, shared (untie_biases: false) position biases, LoRA rank / targets / rsLoRA, Qwen3 heads and
RoPE base in both config layouts, non-ASCII prompts. Clips run from the shortest the package accepts
(20 ms) through the short ones where issue 15 diverged, to a long one; alone and in one mixed batch.
A failure names the case and seed; ``python scripts/fidelity_sweep.py --case NAME --seeds N`` replays it.
"""

from __future__ import annotations

import json

import pytest
from nemo_build import CASES, build_nemo_salm, compare_with_nemo, sweep_clip
from safetensors import safe_open

pytestmark = pytest.mark.nemo
MAX_NEW_TOKENS = 10
SECONDS = (0.02, 0.3, 0.9, 1.37, 2.0, 3.5, 15.0)

RUNS = [
    ("released-shape", 0),
    ("released-shape", 1),
    ("released-shape", 2),
    ("tied-biases-xscaling", 3),
    ("tied-biases-xscaling", 4),
    ("wide-heads-no-lora", 5),
    ("mlp-rslora-tied", 6),
    ("mlp-rslora-tied", 7),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine, handing each small matmul to a second thread
    made a transcription 20x slower (1.16 s vs 0.06 s for ten tokens)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=RUNS, ids=[f"{name}-seed{seed}" for name, seed in RUNS])
def run(request, tmp_path_factory):
    from canary_qwen.backends.fast_torch import FastTorchBackend
    from canary_qwen.backends.onnx_runtime import OnnxBackend
    from canary_qwen.backends.torch_ref import TorchBackend
    from canary_qwen.export.artifacts import export_all

    name, seed = request.param
    shape, prompt = CASES[name]
    out = tmp_path_factory.mktemp(f"{name}-{seed}") / "salm"
    nemo = build_nemo_salm(out, shape, seed)
    export = export_all(out, out.parent / "export", progress=False)
    backends = [TorchBackend(str(out)), FastTorchBackend(str(out), dtype="fp32"), OnnxBackend(str(export.root))]
    return name, seed, shape, prompt, out, nemo, backends


def test_greedy_tokens_equal_nemo_alone_and_mixed(run):
    name, seed, shape, prompt, _, nemo, backends = run
    clips = [sweep_clip(s, seed) for s in SECONDS]
    alone, mismatches = compare_with_nemo(nemo, backends, clips, SECONDS, prompt, MAX_NEW_TOKENS)
    assert len({tuple(t) for t in alone}) > 1, f"{name} seed {seed}: degenerate model, every clip decodes alike"
    detail = "; ".join(f"{m.backend} {m.batch} {m.seconds} s: NeMo {m.nemo} vs {m.ours}" for m in mismatches[:6])
    assert not mismatches, (
        f"case {name} seed {seed} prompt {prompt!r}: {len(mismatches)} disagreements with NeMo ({detail}); "
        f"replay: python scripts/fidelity_sweep.py --case {name} --seeds {seed}"
    )


def test_cases_reach_the_layouts_they_are_for(run):
    """Guards against a case silently testing something else (NeMo or transformers changing what they save)."""
    _, _, shape, _, out, _, _ = run
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        biases = sorted(k for k in f.keys() if k.endswith("pos_bias_u"))
    assert len(biases) == (shape.n_layers if shape.untie_biases else 1), biases
    llm_config = json.loads((out.parent / f"{out.name}-qwen" / "config.json").read_text())
    assert ("rope_theta" in llm_config) == shape.legacy_rope, llm_config
