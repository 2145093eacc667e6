"""The decoding core every path shares: the prompt splicer and the greedy loop with its one stop rule."""

from .greedy import TokenStreams, greedy_decode, token_budgets, until_eos
from .splice import check_prompt_ids, left_pad, splice_and_pad, splice_row

__all__ = [
    "TokenStreams",
    "check_prompt_ids",
    "greedy_decode",
    "left_pad",
    "splice_and_pad",
    "splice_row",
    "token_budgets",
    "until_eos",
]
