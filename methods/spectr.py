"""SpecTr: k i.i.d. draft sequences verified by K-SEQ with rho* (Sun et al., NeurIPS 2023, arXiv
2310.15141).

    python run.py method=spectr drafter=early_exit temperature=1

The draft trie is SpecInfer's (methods/specinfer.py: k i.i.d. sequences of length L, multiplicities
kept); only the verification differs: at each node the ``iid_kseq`` rule accepts draw X_i with
probability min(1, p / (rho* q)) where rho* solves rho beta(rho) = 1 - (1 - beta(rho))^k for the k
drafts alive at that node, and the residual is SpecTr's p_res. With k = 1 it is SpS. The paper's
exact draft-sequence algorithm is [U] (no official code); this is the derived tree version. When no
draw is accepted and the residual sample equals a drafted (rejected) token, the walk descends into that
child (``descend_on_residual_match``): exact, since the child's continuations are i.i.d. draws from
q(. | prefix) that do not depend on the coins of this level (specdec/verify/acceptance.py ``Sampling._kseq``).
With rho = rho* that event has probability zero up to round-off: p_res is positive only on tokens with
p > rho* q, which a draw is accepted with probability 1 (see ``_kseq``); it matters for any larger rho.
"""

from __future__ import annotations

from methods.specinfer import SpecInfer
from specdec.verify.proposer import register
from specdec.verify.tree import IID_KSEQ


@register("spectr")
class SpecTr(SpecInfer):
    tree_kind = IID_KSEQ
