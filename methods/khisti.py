"""Khisti et al.'s multi-draft speculative sampling: k i.i.d. draft sequences drawn from a top-M draft
distribution, verified by the two-step importance-sampling scheme (Khisti, Ebrahimi, Dbouk, Behboodi,
Memisevic, Louizos, "Multi-Draft Speculative Sampling: Canonical Architectures and Theoretical Limits",
arXiv 2410.18234; spectr_multidraft.md §5).

    python run.py method=khisti drafter=early_exit temperature=1

The draft trie is SpecInfer's (methods/specinfer.py: k i.i.d. sequences of length L, multiplicities kept);
two things differ. (1) At every node q is cut to its top_m tokens and renormalised *before* the children
are drawn, and that truncated q is what the tree stores (the verifier needs the law the children came
from; the paper truncates the alphabet the same way, 10/20/40 tokens). (2) The ``multi_draft_is`` rule
(specdec/acceptance.py ``_multi_draft_is``) picks one drafted token by self-normalised importance
resampling (w = p / q) and runs single-draft SD against r, the exact law of that pick, enumerated over
the C(top_m + K - 1, K) draw multisets. Only the spec's exact IS variant is implemented, not the paper's
LP-optimal selection. Under greedy the tree is SpecInfer's deterministic top-k trie (argmax match).
"""

from __future__ import annotations

import torch

from methods.specinfer import SpecInfer
from specdec.acceptance import is_multisets
from specdec.proposer import MethodEnv, register
from specdec.tree import MULTI_DRAFT_IS


def truncate_top_m(probs: torch.Tensor, m: int) -> torch.Tensor:
    """probs [n, V] -> the same rows cut to their m largest entries and renormalised [n, V]."""
    values, index = probs.topk(min(m, probs.shape[-1]), dim=-1)
    return torch.zeros_like(probs).scatter_(-1, index, values / values.sum(-1, keepdim=True))


@register("khisti")
class Khisti(SpecInfer):
    tree_kind = MULTI_DRAFT_IS

    def __init__(self, env: MethodEnv, k: int = 4, length: int = 4, top_m: int = 10):
        super().__init__(env, k, length)
        if top_m < 1:
            raise ValueError(f"top_m must be >= 1, got {top_m}")
        self.top_m = top_m
        is_multisets(top_m, k)  # the verifier's exact r must stay enumerable: a clear error at start-up

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [n, V] -> the top-M q [n, V] the children are drawn from (and the tree stores)."""
        return truncate_top_m(super().probs(logits), self.top_m)
