"""Khisti et al.'s multi-draft speculative sampling: Khisti, Ebrahimi, Dbouk, Behboodi, Memisevic, Louizos,
"Multi-Draft Speculative Sampling: Canonical Decomposition and Theoretical Limits" (arXiv 2410.18234, ICLR 2025).

    python run.py method=khisti drafter=early_exit temperature=1

Drafting is SpecInfer's (methods/specinfer.py): k i.i.d. sequences of length L drawn from the UNTOUCHED draft
law q, merged into a trie with multiplicities; the tree stores that q. Verification (``multi_draft_is``,
specdec/verify/acceptance.py ``Sampling._multi_draft_is`` and ``lp_selection``) is the paper's canonical
decomposition (Section 3) at every node: a selection beta picks one of the K drafted tokens, then
single-draft speculative sampling runs on the pick against r, the exact law of the pick. beta is the paper's
optimised selection: the linear program in beta that maximises the acceptance sum_y min(p(y), r_beta(y))
(Section 3), solved per node over a truncated alphabet (Section 4's LP truncation: the LP sees s =
``lp_tokens`` individual tokens; s = 5 is the paper's best of {5, 10, 15} in its truncation ablation). Any
beta is exact because r is computed exactly for the beta used, on the full vocabulary. With K = 1 there is
nothing to select: r = q and the rule is SpS.

Where the paper leaves the detail open (or where it could not be confirmed), the reading taken:

* [U] The tokens outside the s LP tokens. Reason: they must stay selectable (drafts come from the full q)
  and r must stay exact and cheap on a 49k vocabulary. Reading: they are grouped, sorted by p / q, into
  ``tail_classes`` runs of equal p + q mass; each run is one more LP symbol, and when the LP picks a run the
  token is one of that run's draws taken uniformly, so r is q restricted to the run times a scalar (a run
  of equal p / q behaves exactly as one token; sorting keeps each run close to that).
* [U] Which tokens get their own LP symbol: the s largest in p + q (the mass either model puts on them).
* [U] The paper's experiments also cut the vocabulary to a top-|Omega_0| alphabet (10 to 50 tokens); here
  the draft law is never truncated (drafts are SpecInfer's, exact for the real q); the tail runs take the
  place of the tokens such a cut would drop.
* [design] beta depends on the draws only through the SET of LP symbols they hit (2^n - 1 patterns for
  n = lp_tokens + tail_classes symbols, whatever K). No acceptance is lost by this: a law r is reachable
  by some beta iff r(T) <= P(some draft lies in T) for every set T, a condition on sets only; with every
  token its own symbol the LP attains the paper's optimum min_S p(S) + 1 - q(S)^K (tests/test_khisti.py).
* A residual token held by a rejected child is not descended into (the paper's scheme is token-level).

Under greedy the tree is SpecInfer's deterministic top-k trie (argmax match). The harness's earlier
simplification (top-M drafting + plain self-normalised IS pick) lives on as ``khisti_sir``.
"""

from __future__ import annotations

import dataclasses

from methods.specinfer import SpecInfer
from specdec.verify.acceptance import ISSelection, MultiDraftTree
from specdec.errors import SettingError
from specdec.verify.proposer import MethodEnv, register
from specdec.verify.tree import MULTI_DRAFT_IS, DraftTree

MAX_LP_SYMBOLS = 12  # lp_tokens + tail_classes: the LP has 2^n - 1 draw patterns per node [design]


def with_selection(tree: DraftTree, selection: ISSelection) -> DraftTree:
    """``tree`` as a MultiDraftTree naming its selection step (the rule reads it); other kinds unchanged."""
    if tree.kind != MULTI_DRAFT_IS:
        return tree
    fields = {f.name: getattr(tree, f.name) for f in dataclasses.fields(DraftTree)}
    return MultiDraftTree(**fields, selection=selection)


@register("khisti")
class Khisti(SpecInfer):
    tree_kind = MULTI_DRAFT_IS

    def __init__(self, env: MethodEnv, k: int = 4, length: int = 4, lp_tokens: int = 5, tail_classes: int = 3):
        super().__init__(env, k, length)
        if lp_tokens < 1 or tail_classes < 1:
            raise SettingError(f"lp_tokens and tail_classes must be >= 1, got {lp_tokens}, {tail_classes}")
        if lp_tokens + tail_classes > MAX_LP_SYMBOLS:
            raise SettingError(f"lp_tokens + tail_classes must be <= {MAX_LP_SYMBOLS} (the selection LP has "
                               f"2^n - 1 draw patterns), got {lp_tokens + tail_classes}")
        self.selection = ISSelection("lp", lp_tokens, tail_classes)

    def tree(self, tokens, parents, kind, q_rows, multiplicity=None) -> DraftTree:
        return with_selection(super().tree(tokens, parents, kind, q_rows, multiplicity), self.selection)
