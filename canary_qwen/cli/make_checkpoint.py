"""``canary-qwen make-checkpoint``: a random-weight checkpoint in the real layout."""

from __future__ import annotations


def add_make_checkpoint(sub) -> None:
    p = sub.add_parser(
        "make-checkpoint",
        help="write a random-weight checkpoint in the real layout",
        description="Write config.json + model.safetensors (+ tokenizer files and llm_backbone/config.json for "
        "offline loading) with random weights: 'tiny' for tests, 'small' (tiny with a 128-wide LLM, as INT4 "
        "quantization needs) and 'full' for the real 2.5B architecture.",
    )
    p.add_argument("--size", choices=("tiny", "small", "full"), default="tiny")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--head-dim",
        type=int,
        help="the LLM's attention head size instead of the size's own "
        "(vLLM on a CPU needs one of 32, 64, 80, ..., 256; tiny has 16)",
    )
    p.set_defaults(run=run_make_checkpoint)


def run_make_checkpoint(args) -> int:
    from ..model.synthetic import make_checkpoint

    out = make_checkpoint(args.out, args.size, args.seed, head_dim=args.head_dim)
    print(f"wrote {args.size} checkpoint to {out}")
    return 0
