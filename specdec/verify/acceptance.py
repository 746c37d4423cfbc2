"""Acceptance rules: which tree nodes a verify step accepts and which bonus token it adds.

Chosen by the sampling settings and the tree's ``kind``, never by the method (docs/verifier.md §6,
docs/spectr_multidraft.md):

* greedy (temperature 0): the deepest node whose every token equals the target's argmax at its
  parent; bonus = argmax at that node. Lossless: identical to greedy autoregressive decoding.
* sampling, ``deterministic`` drafts (sample-and-follow): draw ``y ~ p`` at the node; descend into
  the child holding ``y``, else ``y`` is the bonus. Exact: every committed token is a draw from p.
* sampling, ``chain_sampled`` / ``iid`` drafts: SpecInfer multi-step speculative sampling (Miao et
  al., arXiv 2305.09781) over the i.i.d. draws at a node (a node of multiplicity m counts m times,
  in a random order: see ``_specinfer``); with one child it is the single-draft rule of Leviathan
  et al. (arXiv 2211.17192).
* sampling, ``iid_kseq`` drafts: SpecTr's K-SEQ with rho* (Sun et al., arXiv 2310.15141) over the same
  i.i.d. trie (``_kseq``); a residual token that a (rejected) child holds is descended into.
* sampling, ``without_replacement`` drafts: RSD's recursive rejection sampling (Jeon et al., arXiv
  2402.14160): the draft law is renormalised after each rejected sibling (``_recursive``).
* sampling, ``multi_draft_is`` drafts: the canonical two-step scheme of Khisti et al. (arXiv 2410.18234,
  Section 3) over the same i.i.d. trie: a selection beta picks one drafted token, then single-draft SD runs
  against the exact law r of that pick (``_multi_draft_is``). Which beta is read from the tree
  (``MultiDraftTree.selection``): the paper's LP-optimised selection over a truncated alphabet (``khisti``,
  ``lp_selection``), or the harness's simplified self-normalised IS pick (``khisti_sir``).

``target_probs`` (p) is the softmax of the target logits after the same temperature / top-k / top-p
processors that plain sampling uses; ``draft_probs`` (q) is what the proposer drew the children from.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import Optional

import numpy as np
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec.errors import UserError
from specdec.verify.tree import CHAIN_SAMPLED, DETERMINISTIC, IID, IID_KSEQ, MULTI_DRAFT_IS, WITHOUT_REPLACEMENT, DraftTree


class Greedy:
    """Longest draft path matching the target's argmax chain, plus the bonus argmax token.

    Computed on the logits' device and read back once per step (docs/verifier.md §6): a node is accepted iff
    every node on its root path holds the argmax at its parent (one masked reduction over the ancestor
    matrix); the deepest accepted node wins, ties to the smallest index (``argmax`` returns the first
    maximum); one ``tolist`` brings back its ancestor row (the path), the bonus token and, unless the
    tree already knows them, the tree's token ids (left in ``tree.token_list`` for the commit)."""

    lossless = True

    def __call__(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        tree = tree.to(logits.device)
        pred = self.argmax(logits)  # [T]
        if tree.size == 1:
            return [0], int(pred[0])
        match = tree.tokens == pred[tree.parents.clamp_min(0)]       # [T]: node == argmax at its parent
        match[0] = True
        ok = ~(tree.ancestors & ~match).any(1)                         # [T]: the whole root path matches
        best = torch.where(ok, tree.depth, -1).argmax().view(1)        # deepest, first in index order
        parts = [tree.ancestors.index_select(0, best)[0].long(), pred.index_select(0, best)]
        known = "token_list" in tree.__dict__
        values = torch.cat(parts if known else parts + [tree.tokens]).tolist()
        T = tree.size
        if not known:
            tree.__dict__["token_list"] = values[T + 1:]
        return [j for j in range(T) if values[j]], values[T]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's argmax after every node [T] (the rule's one T x V pass; a benchmark may time it apart)."""
        return logits.argmax(-1)


def sampling_processors(temperature: float, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """The transformers warpers, in ``generate``'s order (temperature, top-k, top-p)."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k and top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return procs


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """float32 [n, V]: softmax of logits [n, V] after the sampling processors -- the q a drafter draws from,
    made with the target's own settings so that q and p are comparable (docs/spectr_multidraft.md §0)."""
    return torch.softmax(sampling_processors(temperature, top_k, top_p)(None, logits.float()), -1)


def kseq_rho(target_probs: torch.Tensor, draft_probs: torch.Tensor, k: int, iters: int = 24) -> float:
    """SpecTr's rho*: the smallest rho in [1, k] with rho * beta(rho) >= 1 - (1 - beta(rho))^k, where
    beta(rho) = sum_x min(q(x), p(x) / rho). The gap is increasing in rho, so bisect (k = 1 gives 1),
    returning the feasible upper end: exact for any ``iters`` (24 leave rho* within (k-1) 6e-8)."""
    p, q = target_probs.double().cpu().numpy(), draft_probs.double().cpu().numpy()  # float64; numpy: cheap on tiny V

    def gap(rho: float) -> float:
        beta = float(np.minimum(q, p / rho).sum())
        return rho * beta - (1.0 - (1.0 - beta) ** k)

    if gap(1.0) >= 0:
        return 1.0
    lo, hi = 1.0, float(k)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gap(mid) >= 0 else (mid, hi)
    return hi


# ---------------------------------------------------------------- multi_draft_is: which selection beta
@dataclass(frozen=True)
class ISSelection:
    """The selection step of a ``multi_draft_is`` tree. ``rule="lp"``: Khisti et al.'s LP-optimised
    selection over a truncated alphabet of ``lp_tokens`` single tokens plus ``tail_classes`` classes of the
    remaining tokens (``lp_selection``; methods/khisti.py). ``rule="sir"``: the harness's simplified
    self-normalised IS pick over a top-M draft law (``is_selection``; methods/khisti_sir.py)."""

    rule: str = "lp"
    lp_tokens: int = 5
    tail_classes: int = 3

    def __post_init__(self):
        if self.rule not in ("lp", "sir"):
            raise ValueError(f"unknown selection rule {self.rule!r}; expected 'lp' or 'sir'")
        if self.lp_tokens < 1 or self.tail_classes < 1:
            raise ValueError(f"lp_tokens and tail_classes must be >= 1, got {self.lp_tokens}, {self.tail_classes}")


KHISTI_LP = ISSelection()  # what a plain DraftTree of kind multi_draft_is gets


@dataclass(frozen=True, eq=False)
class MultiDraftTree(DraftTree):
    """A ``multi_draft_is`` draft tree that names its selection step (the tree is what the rule reads)."""

    selection: ISSelection = field(default=KHISTI_LP)


# ---------------------------------------------------------------- khisti_sir: the simplified SIR pick
MAX_IS_MULTISETS = 200_000  # cap on the draw multisets enumerated for khisti_sir's r [design]


def is_multisets(m: int, k: int) -> int:
    """Number of multisets of k draws over m tokens, C(m + k - 1, k): what the exact r of the ``sir``
    selection enumerates. A UserError past ``MAX_IS_MULTISETS`` (e.g. m = 10: k <= 10; m = 40: k <= 4)."""
    n = math.comb(m + k - 1, k)
    if n > MAX_IS_MULTISETS:
        raise UserError(f"multi_draft_is (sir): the exact selection law needs C({m}+{k}-1, {k}) = {n} draw "
                        f"multisets (cap {MAX_IS_MULTISETS}); lower method.top_m or method.k")
    return n


@lru_cache(maxsize=16)
def _multiset_table(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset of k draws over m tokens: counts [N, m] (float64) and log multinomial coefficients [N]."""
    n = is_multisets(m, k)
    draws = np.array(list(combinations_with_replacement(range(m), k)), dtype=np.int64).reshape(n, k)  # [N, k]
    counts = np.zeros((n, m))
    np.add.at(counts, (np.arange(n)[:, None], draws), 1.0)
    log_factorial = np.array([math.lgamma(i + 1) for i in range(k + 1)])
    log_coef = log_factorial[k] - log_factorial[counts.astype(np.int64)].sum(1)
    counts.flags.writeable = log_coef.flags.writeable = False  # cached: shared by every call
    return counts, log_coef


def is_selection(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """beta [..., m] of ``khisti_sir`` (this harness's simplified variant, not the paper's optimised
    selection): self-normalised importance resampling of the K draws, beta_y = n_y w(y) / sum_x n_x w(x),
    with n [..., m] how often each token was drawn and w = p / q [m]. If p vanishes on every draw, a
    uniform draw (n_y / K): any beta is exact as long as r uses the same one. Repeats are counted (keeps
    q = p fully accepted)."""
    w = counts * weights
    total = w.sum(-1, keepdims=True)
    uniform = counts / counts.sum(-1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), uniform)


def is_selection_law(target_probs: torch.Tensor, draft_probs: torch.Tensor, k: int) -> torch.Tensor:
    """r [V] float64: the exact law of the token ``is_selection`` picks from k i.i.d. draws of q (p, q [V]).
    beta depends only on the multiset of draws, so r = sum over the multisets of k draws over q's support
    of multinomial(multiset; q) * beta(multiset): C(M + k - 1, k) terms, vectorised (M = |support of q|)."""
    support = torch.nonzero(draft_probs > 0).flatten()                        # [M]
    q = draft_probs[support].double().cpu().numpy()
    q = q / q.sum()                                                           # [M]
    weights = target_probs[support].double().cpu().numpy() / q                # [M] w = p / q
    counts, log_coef = _multiset_table(len(q), k)                              # [N, M], [N]
    multiset_probs = np.exp(log_coef + counts @ np.log(q))                    # [N]
    beta = is_selection(weights, counts)                                      # [N, M]
    r = torch.zeros(draft_probs.shape[-1], dtype=torch.float64)
    r[support.cpu()] = torch.from_numpy(multiset_probs @ beta)
    return r


# ---------------------------------------------------------------- khisti: the LP-optimised selection
LP_GRID = 16  # chord points per tail class on a uniform grid of its W range (plus up to 2 * LP_GRID kinks) [design]


def selection_classes(target: np.ndarray, draft: np.ndarray, lp_tokens: int, tail_classes: int) -> list[np.ndarray]:
    """The truncated alphabet of the LP: a partition of q's support (p, q float64 [V]) into classes, each
    an int array of token ids. The ``lp_tokens`` tokens of largest p + q are single classes; the rest (the
    tail) is sorted by p / q and cut into ``tail_classes`` runs of equal p + q mass. A support no larger
    than lp_tokens + tail_classes gives every token its own class: the untruncated LP."""
    support = np.flatnonzero(draft > 0)
    if len(support) <= lp_tokens + tail_classes:
        return [support[i:i + 1] for i in range(len(support))]
    order = support[np.argsort(-(target[support] + draft[support]), kind="stable")]
    classes = [order[i:i + 1] for i in range(lp_tokens)]
    tail = order[lp_tokens:]                                                  # >= tail_classes + 1 tokens
    with np.errstate(divide="ignore"):
        log_ratio = np.log(target[tail]) - np.log(draft[tail])                # -inf where p = 0
    tail = tail[np.argsort(log_ratio, kind="stable")]
    mass = np.cumsum(target[tail] + draft[tail])
    cuts = np.searchsorted(mass, mass[-1] * np.arange(1, tail_classes) / tail_classes, side="right")
    cuts = np.unique(np.clip(cuts, 1, len(tail) - 1))
    return classes + [run for run in np.split(tail, cuts) if len(run)]


def hit_set_probs(class_mass: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For k i.i.d. draws over n classes of masses ``class_mass`` [n] (sum 1): members [2^n, n] (bool; row
    D = bitmask of a set of classes) and P(the set of classes drawn at least once is exactly D) [2^n], by
    Moebius inversion of P(every draw lies in T) = mass(T)^k over the subsets."""
    n = len(class_mass)
    masks = np.arange(1 << n)
    members = ((masks[:, None] >> np.arange(n)) & 1).astype(bool)            # [2^n, n]
    probs = np.minimum(members @ class_mass, 1.0) ** k                       # P(all draws in T)
    for i in range(n):
        has = (masks >> i) & 1 == 1
        probs[has] -= probs[masks[has] ^ (1 << i)]
    probs = np.clip(probs, 0.0, None)
    probs[0] = 0.0                                                           # k >= 1: some class is drawn
    return members, probs / probs.sum()


def _class_cuts(target: np.ndarray, draft: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Chords (slopes, intercepts) under G(W) = sum_b min(p_b, W q_b / Q) for one tail class (p, q of its
    tokens, Q = q(class)): the acceptance of the class when it is picked with total probability W and the
    drawn token of the class is then taken uniformly among its draws (law q / Q). G is concave and
    piecewise linear (kinks at W = p_b Q / q_b); t <= every chord line is its interpolant on the grid,
    exact at the grid points, which include W = Q (the SpS point, so the LP never does worse than SpS)."""
    mass = draft.sum()
    w_max = 1.0 - (1.0 - mass) ** k                                          # P(the class is drawn at all)
    kink = target * mass / draft
    order = np.argsort(kink)
    kink = kink[order]
    cum_p = np.concatenate([[0.0], np.cumsum(target[order])])
    cum_q = np.concatenate([[0.0], np.cumsum(draft[order] / mass)])
    inner = kink[(kink > 0) & (kink < w_max)]
    if len(inner) > 2 * LP_GRID:
        inner = np.quantile(inner, np.linspace(0, 1, 2 * LP_GRID))
    points = np.unique(np.concatenate([np.linspace(0.0, w_max, LP_GRID), [min(mass, w_max)], inner]))
    j = np.searchsorted(kink, points, side="right")
    value = cum_p[j] + points * (1.0 - cum_q[j])                             # G at the points
    width = np.diff(points)
    keep = width > 1e-15
    slopes = np.diff(value)[keep] / width[keep]
    return slopes, value[:-1][keep] - slopes * points[:-1][keep]


def _lp_beta(target: np.ndarray, draft: np.ndarray, classes: list[np.ndarray], k: int, members: np.ndarray,
             probs: np.ndarray) -> np.ndarray:
    """beta [2^n, n]: for each set D of drawn classes, the probability of picking class g in D, maximising
    the acceptance sum_g G_g(W_g), W_g = sum_D P(D) beta_g(D), with G_g = min(p_b, W) for a single token
    and the chord model of ``_class_cuts`` for a tail class. Variables: u = P(D) beta(D) per (D, g in D),
    W [n], t [n] (t_g <= G_g(W_g)); HiGHS. A solver failure falls back to a uniform pick among the drawn
    classes (still exact: r is computed from the beta that is used)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    n = len(classes)
    live = np.flatnonzero(probs > 0)
    pattern, cls = np.nonzero(members[live])                                 # one variable per (D, g in D)
    nu = len(pattern)
    iw, it, nvar = nu, nu + n, nu + 2 * n
    rows = np.concatenate([pattern, len(live) + cls, len(live) + np.arange(n)])
    cols = np.concatenate([np.arange(nu), np.arange(nu), iw + np.arange(n)])
    vals = np.concatenate([np.ones(nu), -np.ones(nu), np.ones(n)])
    a_eq = coo_matrix((vals, (rows, cols)), shape=(len(live) + n, nvar)).tocsr()
    b_eq = np.concatenate([probs[live], np.zeros(n)])                        # sum_g u = P(D); W_g = sum_D u
    ub_rows, ub_cols, ub_vals, b_ub = [], [], [], []
    bounds = [(0.0, None)] * (nu + n)
    for g, tokens in enumerate(classes):
        if len(tokens) == 1:                                                 # t_g <= W_g, t_g <= p_b
            slopes, intercepts = np.ones(1), np.zeros(1)
            bounds.append((0.0, float(target[tokens[0]])))
        else:
            slopes, intercepts = _class_cuts(target[tokens], draft[tokens], k)
            bounds.append((0.0, None))
        first = len(b_ub)
        for i, (slope, intercept) in enumerate(zip(slopes, intercepts)):     # t_g - slope W_g <= intercept
            ub_rows += [first + i, first + i]
            ub_cols += [it + g, iw + g]
            ub_vals += [1.0, -float(slope)]
            b_ub.append(float(intercept))
    a_ub = coo_matrix((ub_vals, (ub_rows, ub_cols)), shape=(len(b_ub), nvar)).tocsr()
    objective = np.zeros(nvar)
    objective[it:] = -1.0                                                    # maximise sum_g t_g
    result = linprog(objective, A_ub=a_ub, b_ub=np.array(b_ub), A_eq=a_eq, b_eq=b_eq, bounds=bounds,
                     method="highs")
    beta = np.zeros(members.shape)
    if result.status == 0:
        beta[live[pattern], cls] = np.clip(result.x[:nu], 0.0, None)
    total = beta.sum(1, keepdims=True)
    uniform = members / np.maximum(members.sum(1, keepdims=True), 1)
    return np.where(total > 0, beta / np.where(total > 0, total, 1.0), uniform)


@dataclass
class LPSelection:
    """Khisti et al.'s selection at one node: the classes of the truncated alphabet, each drafted token's
    class (``class_of`` [V], -1 off q's support), beta [2^n, n] per set of drawn classes, and r [V] float64,
    the exact law of the picked token."""

    classes: list[np.ndarray]
    class_of: np.ndarray
    beta: np.ndarray
    law: torch.Tensor

    def acceptance(self, target_probs: torch.Tensor) -> float:
        """P(the picked draft is accepted) = sum min(p, r)."""
        return float(torch.minimum(target_probs.double().cpu(), self.law).sum())


def lp_selection(target_probs: torch.Tensor, draft_probs: torch.Tensor, k: int, lp_tokens: int = 5,
                 tail_classes: int = 3) -> LPSelection:
    """Khisti et al.'s LP-optimised selection for k i.i.d. draws of q (p, q [V], full vocabulary): the selection
    beta maximising the acceptance sum_y min(p(y), r_beta(y)) of the canonical decomposition (arXiv
    2410.18234, Section 3: a linear program in beta), solved over a truncated alphabet (Section 4's LP
    truncation, s = ``lp_tokens``; the tail classes are this harness's [U] reading, see methods/khisti.py).

    Truncated alphabet (``selection_classes``): n = lp_tokens + tail_classes classes (fewer if q's support
    is smaller). beta depends on the draws only through the SET of classes they hit (2^n - 1 patterns,
    whatever k); within the picked class the token is one of that class's draws taken uniformly (law q
    restricted to the class, whatever the other draws are). Hence r_b = W_g q_b / q(g) for b in class g,
    W_g = sum_D P(D) beta_g(D): exact for the full vocabulary in O(V log V + 2^n n). beta solves the LP
    of ``_lp_beta``. k = 1 (one draw: nothing to select) gives r = q, i.e. SpS."""
    p = target_probs.double().cpu().numpy()
    q = draft_probs.double().cpu().numpy()
    q = q / q.sum()
    classes = selection_classes(p, q, lp_tokens, tail_classes)
    class_mass = np.array([q[c].sum() for c in classes])
    members, probs = hit_set_probs(class_mass, k)
    if k > 1 and len(classes) > 1:
        beta = _lp_beta(p, q, classes, k, members, probs)
    else:  # one draw (or one class): the pick is forced
        beta = members / np.maximum(members.sum(1, keepdims=True), 1)
    picked = probs @ beta                                                    # W [n]
    law = np.zeros_like(q)
    class_of = np.full(len(q), -1, dtype=np.int64)
    for g, tokens in enumerate(classes):
        law[tokens] = picked[g] * q[tokens] / class_mass[g]
        class_of[tokens] = g
    return LPSelection(classes, class_of, beta, torch.from_numpy(law))


def lp_selection_law(target_probs: torch.Tensor, draft_probs: torch.Tensor, k: int, lp_tokens: int = 5,
                     tail_classes: int = 3) -> torch.Tensor:
    """r [V] float64 of ``lp_selection``."""
    return lp_selection(target_probs, draft_probs, k, lp_tokens, tail_classes).law


def optimal_acceptance_bound(target_probs: torch.Tensor, draft_probs: torch.Tensor, k: int) -> float:
    """min over S of p(S) + 1 - q(S)^k: no scheme verifying k i.i.d. draws of q accepts more (tokens in S
    at most p(S); tokens outside S only when drafted). The minimum over all S is attained by a set
    {x: p(x) / q(x) <= theta} (an exchange argument on this concave-of-modular function), so scanning the
    p / q order is exact; and the selection LP over the full alphabet attains it (a test checks this)."""
    p = target_probs.double().cpu().numpy()
    q = draft_probs.double().cpu().numpy()
    q = q / q.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(q > 0, p / np.where(q > 0, q, 1.0), np.inf)
    order = np.argsort(ratio, kind="stable")
    value = np.cumsum(p[order]) + 1.0 - np.minimum(np.cumsum(q[order]), 1.0) ** k
    return float(min(1.0, value.min()))


class Sampling:
    """Exact speculative sampling for every tree kind; one seeded generator per question."""

    lossless = True  # in distribution, not in token identity

    def __init__(self, processors: LogitsProcessorList, generator: torch.Generator):
        self.processors = processors
        self.generator = generator
        self._selections: OrderedDict = OrderedDict()  # a few recent LP selections, keyed by (p, q, k, knobs)

    def target_probs(self, logits_row: torch.Tensor) -> torch.Tensor:
        """float32 [V] on CPU: p at one node after the sampling processors."""
        scores = self.processors(None, logits_row[None].float())  # prefix-independent warpers only
        return torch.softmax(scores[0], -1).cpu()

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def __call__(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        tokens = tree.token_list
        node, path = 0, [0]
        while True:
            target_probs = self.target_probs(logits[node])
            kids = tree.children[node]
            if not kids:
                return path, self.draw(target_probs)
            if tree.kind == DETERMINISTIC:
                child, token = self._follow(target_probs, kids, tokens)
            elif tree.kind in (CHAIN_SAMPLED, IID):
                draft_probs = tree.draft_probs[node].float().cpu()
                child, token = self._specinfer(target_probs, draft_probs, kids, tokens, tree.multiplicity)
            elif tree.kind == IID_KSEQ:
                child, token = self._kseq(target_probs, tree.draft_probs[node].float().cpu(), kids, tokens,
                                          tree.multiplicity)
            elif tree.kind == WITHOUT_REPLACEMENT:
                child, token = self._recursive(target_probs, tree.draft_probs[node].float().cpu(), kids, tokens)
            elif tree.kind == MULTI_DRAFT_IS:
                child, token = self._multi_draft_is(target_probs, tree.draft_probs[node].float().cpu(), kids, tokens,
                                                    tree.multiplicity, getattr(tree, "selection", KHISTI_LP))
            else:  # pragma: no cover - DraftTree validates kinds
                raise ValueError(tree.kind)
            if child is None:
                return path, token
            path.append(child)
            node = child

    def _follow(self, target_probs, kids, tokens) -> tuple[Optional[int], int]:
        """Sample-and-follow: y ~ p; descend into the first child holding y."""
        y = self.draw(target_probs)
        for child in kids:
            if tokens[child] == y:
                return child, y
        return None, y

    def _specinfer(self, target_probs, draft_probs, kids, tokens, multiplicity) -> tuple[Optional[int], int]:
        """SpecInfer multi-step rule over the draws at one node.

        A node of multiplicity m stands for m draws. Merging repeats loses their draw order, and
        processing them back to back is biased; but i.i.d. draws are exchangeable, so a uniformly
        random order of the multiset is distributed exactly as the true draw order.
        """
        residual = target_probs
        for child in self._draw_order(kids, multiplicity):
            accepted, next_residual = self._single_draft(residual, draft_probs, tokens[child])
            if accepted:
                return child, tokens[child]
            if next_residual is None:
                break
            residual = next_residual
        return None, self.draw(residual)

    def _single_draft(self, residual, draft_probs, x: int) -> tuple[bool, Optional[torch.Tensor]]:
        """One single-draft step (Leviathan et al.): accept ``x`` w.p. min(1, residual[x] / q[x]); on
        rejection also return the next residual norm(max(0, residual - q)), or None when it is empty
        (residual == q: the rejection had probability 0)."""
        q_x = float(draft_probs[x])
        if q_x > 0 and float(torch.rand((), generator=self.generator)) < min(1.0, float(residual[x]) / q_x):
            return True, None
        leftover = (residual - draft_probs).clamp_min(0)
        if float(leftover.sum()) <= 0:
            return False, None
        return False, leftover / leftover.sum()

    def _draw_order(self, kids, multiplicity) -> list[int]:
        """The i.i.d. draws at a node, a node of multiplicity m counted m times, in a uniformly random
        order (exchangeable draws: distributed as the true draw order)."""
        draws = [c for c in kids for _ in range(int(multiplicity[c]) if multiplicity is not None else 1)]
        if len(draws) > 1:
            draws = [draws[i] for i in torch.randperm(len(draws), generator=self.generator).tolist()]
        return draws

    def _kseq(self, target_probs, draft_probs, kids, tokens, multiplicity) -> tuple[Optional[int], int]:
        """K-SEQ (Sun et al., arXiv 2310.15141): accept draw X_i w.p. min(1, p / (rho* q)), in order; if none
        is, sample Y from p_res = [p - min(q, p/rho*) P_acc / beta] / (1 - beta)^k. Exact because
        P(Y = x, accepted) = min(q, p/rho*) P_acc / beta, and p_res >= 0 by the choice of rho*.

        Descend on a residual match (the ``descend_on_residual_match`` option of SpecTr's tree version): if
        Y equals a child's token, the walk continues into that child. Exact: Y is the committed token either
        way (distributed as p), and the child's subtree holds the continuations of the drafts that drew Y,
        i.i.d. from q(. | Y) given their count and independent of this level's coins, which is all the rule
        at the child assumes. Note: at rho = rho* > 1 (rho* beta = P_acc) p_res is proportional to
        (p - rho* q)^+, positive only where min(1, p / (rho* q)) = 1, i.e. on tokens a draw would have been
        accepted surely; so a rejected draft is never the residual sample and the descent changes nothing
        beyond the bisection's slack on rho* (~1e-8). It does for any valid rho > rho* (tests force rho = k)."""
        draws = self._draw_order(kids, multiplicity)
        k = len(draws)
        rho = kseq_rho(target_probs, draft_probs, k)
        for child in draws:
            x = tokens[child]
            q_x = float(draft_probs[x])
            accept = min(1.0, float(target_probs[x]) / (rho * q_x)) if q_x > 0 else 0.0
            if q_x > 0 and float(torch.rand((), generator=self.generator)) < accept:
                return child, x
        accepted_mass = torch.minimum(draft_probs, target_probs / rho)   # [V]
        beta = float(accepted_mass.sum())
        if beta <= 1e-12:  # q disjoint from p: nothing could be accepted, the residual is p itself
            y = self.draw(target_probs)
        else:
            residual = (target_probs - accepted_mass * (1.0 - (1.0 - beta) ** k) / beta).clamp_min(0)
            if float(residual.sum()) <= 1e-12:  # rejection had probability 0 (q == p): round-off only
                y = self.draw(target_probs)
            else:
                y = self.draw(residual / residual.sum())
        holder = next((child for child in kids if tokens[child] == y), None)
        return holder, y

    def _multi_draft_is(self, target_probs, draft_probs, kids, tokens, multiplicity,
                        selection: ISSelection = KHISTI_LP) -> tuple[Optional[int], int]:
        """Khisti, Ebrahimi, Dbouk, Behboodi, Memisevic, Louizos, "Multi-Draft Speculative Sampling:
        Canonical Decomposition and Theoretical Limits" (arXiv 2410.18234), Section 3's canonical
        decomposition over the K i.i.d. draws alive at the node (a child of multiplicity m is m draws):
        (1) a selection beta picks one drafted token Y; (2) single-draft SD of Y against r, the exact law of
        the pick: accept w.p. min(1, p(Y) / r(Y)), else emit y ~ norm((p - r)^+). Exact for ANY beta as
        long as r is the law of the beta actually used: P(emit y) = min(r, p)(y) + (p - r)^+(y) = p(y).
        ``selection.rule``: "lp" (``khisti``: ``lp_selection``, the paper's LP-optimised selection over a
        truncated alphabet) or "sir" (``khisti_sir``: the harness's simplified IS pick, ``is_selection``).
        A residual token held by a child is not descended into (as the paper's token-level scheme)."""
        counts = multiplicity[kids].tolist() if multiplicity is not None else [1] * len(kids)  # draws per child
        drafted = [tokens[c] for c in kids]                                      # distinct sibling tokens
        if len(set(drafted)) < len(drafted) or float(draft_probs[drafted].min()) <= 0:
            raise ValueError("multi_draft_is needs distinct children drawn from the stored q (q > 0 at each)")
        target = target_probs.double()
        if selection.rule == "sir":
            pick, law = self._sir_pick(target, draft_probs.double(), drafted, counts)
        else:
            pick, law = self._lp_pick(target_probs, draft_probs, drafted, counts, selection)
        y = drafted[pick]
        if float(torch.rand((), generator=self.generator)) < min(1.0, float(target[y]) / max(float(law[y]), 1e-300)):
            return kids[pick], y
        residual = (target - law).clamp_min(0)
        if float(residual.sum()) <= 1e-12:  # sum min(p, r) = 1: the rejection had probability 0 (round-off)
            return None, self.draw(target)
        return None, self.draw(residual / residual.sum())

    def _sir_pick(self, target, draft, drafted, counts) -> tuple[int, torch.Tensor]:
        """khisti_sir's pick: self-normalised IS over the draws (w = p / q), and its law by enumeration."""
        weights = target[drafted].numpy() / draft[drafted].numpy()              # [n] w = p / q
        pick = self.draw(torch.from_numpy(is_selection(weights, np.array(counts, dtype=np.float64))))
        return pick, is_selection_law(target, draft, sum(counts))

    def _lp_pick(self, target_probs, draft_probs, drafted, counts, selection: ISSelection) -> tuple[int, torch.Tensor]:
        """khisti's pick (``lp_selection``): the set D of classes the draws hit -> class g ~ beta(D) -> one
        of that class's draws, uniformly (a child with probability proportional to its multiplicity)."""
        chosen = self._selection(target_probs, draft_probs, sum(counts), selection)
        classes = chosen.class_of[drafted]                                       # [n]
        if (classes < 0).any():
            raise ValueError("multi_draft_is: a child holds a token outside the stored q's support")
        mask = int(np.bitwise_or.reduce(np.left_shift(1, classes)))
        g = self.draw(torch.from_numpy(chosen.beta[mask]))
        members = [i for i, c in enumerate(classes.tolist()) if c == g]
        pick = members[self.draw(torch.tensor([float(counts[i]) for i in members]))] if len(members) > 1 else members[0]
        return pick, chosen.law

    def _selection(self, target_probs, draft_probs, k: int, selection: ISSelection) -> LPSelection:
        """``lp_selection`` for this node, reused while the same (p, q, k, knobs) come back (a test's
        repeated trials; a real decode visits each node once)."""
        key = (k, selection.lp_tokens, selection.tail_classes, str(target_probs.dtype), str(draft_probs.dtype),
               target_probs.numpy().tobytes(), draft_probs.numpy().tobytes())
        chosen = self._selections.get(key)
        if chosen is None:
            chosen = lp_selection(target_probs, draft_probs, k, selection.lp_tokens, selection.tail_classes)
            self._selections[key] = chosen
            if len(self._selections) > 8:
                self._selections.popitem(last=False)
        return chosen

    def _recursive(self, target_probs, draft_probs, kids, tokens) -> tuple[Optional[int], int]:
        """RSD recursive rejection over distinct siblings drawn without replacement (docs/spectr_multidraft.md
        §4): step i is the single-draft rule between p_i and q_i, the law of x_i given x_1..x_{i-1} were drawn
        before it."""
        residual, remaining = target_probs, draft_probs.clone()
        for child in kids:
            x = tokens[child]
            q_x = float(remaining[x])
            accepted, next_residual = self._single_draft(residual, remaining, x)
            if accepted:
                return child, x
            if next_residual is None:
                break
            residual = next_residual
            if q_x >= 1.0:  # x was the only token q could draw: no sibling can follow
                break
            remaining[x] = 0.0
            remaining = remaining / (1.0 - q_x)
        return None, self.draw(residual)


def make_rule(temperature: float, top_k: int = 0, top_p: float = 1.0,
              generator: Optional[torch.Generator] = None):
    """Greedy for temperature 0, exact sampling otherwise."""
    if temperature is None or temperature <= 0:
        return Greedy()
    return Sampling(sampling_processors(temperature, top_k, top_p), generator or torch.Generator())
