"""SpecTr: k i.i.d. draft sequences verified by K-SEQ with rho* (Sun et al., NeurIPS 2023, arXiv
2310.15141; spectr_multidraft.md §3).

    python run.py method=spectr drafter=early_exit temperature=1

The draft trie is SpecInfer's (methods/specinfer.py: k i.i.d. sequences of length L, multiplicities
kept); only the verification differs: at each node the ``iid_kseq`` rule accepts draw X_i with
probability min(1, p / (rho* q)) where rho* solves rho beta(rho) = 1 - (1 - beta(rho))^k for the k
drafts alive at that node, and the residual is SpecTr's p_res. With k = 1 it is SpS. The paper's
exact draft-sequence algorithm is [U] (no official code); this is the spec's derived tree version,
without descending on a residual match (``descend_on_residual_match`` = false, the spec's default).
"""

from __future__ import annotations

from methods.specinfer import SpecInfer
from specdec.proposer import register
from specdec.tree import IID_KSEQ


@register("spectr")
class SpecTr(SpecInfer):
    tree_kind = IID_KSEQ
