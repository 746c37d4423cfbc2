"""``khisti_sir``: this harness's SIMPLIFIED variant of Khisti et al.'s two-step multi-draft scheme (arXiv
2410.18234), NOT the paper's scheme (that is ``khisti``, methods/khisti.py).

    python run.py method=khisti_sir drafter=early_exit temperature=1

It keeps the harness's earlier construction under its own name, for comparison:

* drafting: SpecInfer's trie (k i.i.d. sequences of length L), but at every node q is first cut to its
  top_m tokens and renormalised, and the children are drawn from (and the tree stores) that truncated q;
* selection: plain self-normalised importance resampling of the draws, w = p / q (``is_selection`` in
  specdec/verify/acceptance.py), instead of the paper's optimised selection;
* then single-draft SD against r, the exact law of that pick, enumerated over the C(top_m + K - 1, K) draw
  multisets (``is_selection_law``); exact for the truncated q it drew from.

The truncation changes what is drafted, so at K = 1 this is SpS against the top-M q, not SpS: it accepts
sum min(p, q_top) instead of sum min(p, q). Under greedy the tree is SpecInfer's deterministic top-k trie
(argmax match).
"""

from __future__ import annotations

import torch

from methods.khisti import with_selection
from methods.specinfer import SpecInfer
from specdec.verify.acceptance import ISSelection, is_multisets
from specdec.errors import SettingError
from specdec.verify.proposer import MethodEnv, register
from specdec.verify.tree import MULTI_DRAFT_IS, DraftTree

SIR = ISSelection("sir")


def truncate_top_m(probs: torch.Tensor, m: int) -> torch.Tensor:
    """probs [n, V] -> the same rows cut to their m largest entries and renormalised [n, V]."""
    values, index = probs.topk(min(m, probs.shape[-1]), dim=-1)
    return torch.zeros_like(probs).scatter_(-1, index, values / values.sum(-1, keepdim=True))


@register("khisti_sir")
class KhistiSIR(SpecInfer):
    tree_kind = MULTI_DRAFT_IS

    def __init__(self, env: MethodEnv, k: int = 4, length: int = 4, top_m: int = 10):
        super().__init__(env, k, length)
        if top_m < 1:
            raise SettingError(f"top_m must be >= 1, got {top_m}")
        self.top_m = top_m
        is_multisets(top_m, k)  # the verifier's exact r must stay enumerable: a clear error at start-up

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [n, V] -> the top-M q [n, V] the children are drawn from (and the tree stores)."""
        return truncate_top_m(super().probs(logits), self.top_m)

    def tree(self, tokens, parents, kind, q_rows, multiplicity=None) -> DraftTree:
        return with_selection(super().tree(tokens, parents, kind, q_rows, multiplicity), SIR)
