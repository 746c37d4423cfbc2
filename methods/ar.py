"""Autoregressive baseline: every step proposes the root-only tree, so each verify forward
commits exactly one token (MAT = 1.00) through the same loop, timer and counters as every method.

    python run.py method=ar
"""

from specdec.verify.proposer import Proposer, register


@register("ar")
class Autoregressive(Proposer):
    """No draft. The base class already proposes the root-only tree."""

    def tree_sizes(self) -> tuple[int, ...]:
        return (1,)
