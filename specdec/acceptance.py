"""Acceptance rules: which tree nodes a verify step accepts and which bonus token it adds.

Chosen by the sampling settings and the tree's ``kind``, never by the method (specs/verifier.md §6,
specs/spectr_multidraft.md):

* greedy (temperature 0): the deepest node whose every token equals the target's argmax at its
  parent; bonus = argmax at that node. Lossless: identical to greedy autoregressive decoding.
* sampling, ``deterministic`` drafts (sample-and-follow): draw ``y ~ p`` at the node; descend into
  the child holding ``y``, else ``y`` is the bonus. Exact: every committed token is a draw from p.
* sampling, ``chain_sampled`` / ``iid`` drafts: SpecInfer multi-step speculative sampling (Miao et
  al., arXiv 2305.09781) over the i.i.d. draws at a node (a node of multiplicity m counts m times,
  in a random order: see ``_specinfer``); with one child it is the single-draft rule of Leviathan
  et al. (arXiv 2211.17192).
* sampling, ``iid_kseq`` drafts: SpecTr's K-SEQ with rho* (Sun et al., arXiv 2310.15141) over the same
  i.i.d. trie (``_kseq``).
* sampling, ``without_replacement`` drafts: RSD's recursive rejection sampling (Jeon et al., arXiv
  2402.14160): the draft law is renormalised after each rejected sibling (``_recursive``).
* sampling, ``multi_draft_is`` drafts: Khisti et al.'s two-step scheme (arXiv 2410.18234) over the same
  i.i.d. trie: an importance-weighted choice among the drafted tokens, then single-draft SD against the
  exact law r of that choice (``_multi_draft_is``).

``target_probs`` (p) is the softmax of the target logits after the same temperature / top-k / top-p
processors that plain sampling uses; ``draft_probs`` (q) is what the proposer drew the children from.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import Optional

import numpy as np
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .errors import UserError
from .tree import CHAIN_SAMPLED, DETERMINISTIC, IID, IID_KSEQ, MULTI_DRAFT_IS, WITHOUT_REPLACEMENT, DraftTree


class Greedy:
    """Longest draft path matching the target's argmax chain, plus the bonus argmax token."""

    lossless = True

    def __call__(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        pred = logits.argmax(-1)  # [T]
        if tree.size == 1:
            return [0], int(pred[0])
        match = (tree.tokens[1:] == pred[tree.parents[1:]]).tolist()  # [T-1]: child == argmax at parent
        parents, depth = tree.parent_list, tree.depth.tolist()
        ok = [True] + [False] * (tree.size - 1)
        best = 0
        for i in range(1, tree.size):
            ok[i] = match[i - 1] and ok[parents[i]]
            if ok[i] and depth[i] > depth[best]:
                best = i
        return tree.path_to(best), int(pred[best])


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
    made with the target's own settings so that q and p are comparable (spectr_multidraft.md §0)."""
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


MAX_IS_MULTISETS = 200_000  # cap on the draw multisets enumerated for multi_draft_is's r [design]


def is_multisets(m: int, k: int) -> int:
    """Number of multisets of k draws over m tokens, C(m + k - 1, k): what the exact r of ``multi_draft_is``
    enumerates. A UserError past ``MAX_IS_MULTISETS`` (e.g. m = 10: k <= 10; m = 40: k <= 4)."""
    n = math.comb(m + k - 1, k)
    if n > MAX_IS_MULTISETS:
        raise UserError(f"multi_draft_is: the exact selection law needs C({m}+{k}-1, {k}) = {n} draw multisets "
                        f"(cap {MAX_IS_MULTISETS}); lower method.top_m or method.k")
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
    """beta [..., m]: self-normalised importance resampling of the K draws, beta_y = n_y w(y) / sum_x n_x w(x),
    with n [..., m] how often each token was drawn and w = p / q [m]: one draw picked w.p. ∝ its weight,
    i.e. the SIR estimate of p from the K draws. If p vanishes on every draw, a uniform draw (n_y / K):
    any beta is exact as long as r uses the same one. [U] The spec words it "among the distinct drafted
    tokens"; counting repeats is the reading taken: identical at K = 2 (the spec's closed form), and it
    keeps q = p fully accepted, where weighting each distinct token once accepts only 0.94 / 0.74 at
    K = 3 / 8 (q = p = a random vocab-6 law)."""
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


class Sampling:
    """Exact speculative sampling for every tree kind; one seeded generator per question."""

    lossless = True  # in distribution, not in token identity

    def __init__(self, processors: LogitsProcessorList, generator: torch.Generator):
        self.processors = processors
        self.generator = generator

    def target_probs(self, logits_row: torch.Tensor) -> torch.Tensor:
        """float32 [V] on CPU: p at one node after the sampling processors."""
        scores = self.processors(None, logits_row[None].float())  # prefix-independent warpers only
        return torch.softmax(scores[0], -1).cpu()

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def __call__(self, tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
        tokens = tree.tokens.tolist()
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
                                                    tree.multiplicity)
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
        """K-SEQ (SpecTr §3 of spectr_multidraft.md): accept draw X_i w.p. min(1, p / (rho* q)), in order;
        if none is, sample p_res = [p - min(q, p/rho*) P_acc / beta] / (1 - beta)^k. Exact because
        P(Y = x, accepted) = min(q, p/rho*) P_acc / beta, and p_res >= 0 by the choice of rho*."""
        draws = self._draw_order(kids, multiplicity)
        k = len(draws)
        rho = kseq_rho(target_probs, draft_probs, k)
        for child in draws:
            x = tokens[child]
            q_x = float(draft_probs[x])
            if q_x > 0 and float(torch.rand((), generator=self.generator)) < min(1.0, float(target_probs[x]) / (rho * q_x)):
                return child, x
        accepted_mass = torch.minimum(draft_probs, target_probs / rho)   # [V]
        beta = float(accepted_mass.sum())
        if beta <= 1e-12:  # q disjoint from p: nothing could be accepted, the residual is p itself
            return None, self.draw(target_probs)
        residual = (target_probs - accepted_mass * (1.0 - (1.0 - beta) ** k) / beta).clamp_min(0)
        if float(residual.sum()) <= 1e-12:  # rejection had probability 0 (q == p): round-off only
            return None, self.draw(target_probs)
        return None, self.draw(residual / residual.sum())

    def _multi_draft_is(self, target_probs, draft_probs, kids, tokens, multiplicity) -> tuple[Optional[int], int]:
        """Khisti, Ebrahimi, Dbouk, Behboodi, Memisevic, Louizos, "Multi-Draft Speculative Sampling:
        Canonical Architectures and Theoretical Limits" (arXiv 2410.18234; spectr_multidraft.md §5).

        The paper's canonical two steps over the K i.i.d. draws alive at the node (a child of multiplicity m
        is m draws): (1) select one drafted token Y ~ beta(draws), here self-normalised importance resampling
        with w = p / q (``is_selection``: the spec's implementable exact variant; the paper's own IS weight
        formula is [U] and its LP-optimal beta is not implemented); (2) single-draft SD of Y against r, the
        law of the selection: accept w.p. min(1, p(Y) / r(Y)), else emit y ~ norm((p - r)^+). Exact for ANY
        beta because r is computed exactly (``is_selection_law``): P(emit y) = min(r, p)(y) + (p - r)^+(y)
        = p(y). The enumeration needs q with a small support (top-M drafting). A residual token held by a
        child is not descended into (``descend_on_residual_match`` = false, as for K-SEQ).
        """
        counts = multiplicity[kids].tolist() if multiplicity is not None else [1] * len(kids)  # draws per child
        drafted = [tokens[c] for c in kids]                                      # distinct sibling tokens
        target, draft = target_probs.double(), draft_probs.double()              # [V] float64
        q_drafted = draft[drafted].numpy()                                       # [n]
        if len(set(drafted)) < len(drafted) or q_drafted.min() <= 0:
            raise ValueError("multi_draft_is needs distinct children drawn from the stored q (q > 0 at each)")
        weights = target[drafted].numpy() / q_drafted                            # [n] w = p / q
        pick = self.draw(torch.from_numpy(is_selection(weights, np.array(counts, dtype=np.float64))))
        r = is_selection_law(target, draft, sum(counts))                          # [V]
        y = drafted[pick]
        if float(torch.rand((), generator=self.generator)) < min(1.0, float(target[y]) / max(float(r[y]), 1e-300)):
            return kids[pick], y
        residual = (target - r).clamp_min(0)
        if float(residual.sum()) <= 1e-12:  # sum min(p, r) = 1: the rejection had probability 0 (round-off)
            return None, self.draw(target)
        return None, self.draw(residual / residual.sum())

    def _recursive(self, target_probs, draft_probs, kids, tokens) -> tuple[Optional[int], int]:
        """RSD recursive rejection over distinct siblings drawn without replacement (§4): step i is the
        single-draft rule between p_i and q_i, the law of x_i given x_1..x_{i-1} were drawn before it."""
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
