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

``target_probs`` (p) is the softmax of the target logits after the same temperature / top-k / top-p
processors that plain sampling uses; ``draft_probs`` (q) is what the proposer drew the children from.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .tree import CHAIN_SAMPLED, DETERMINISTIC, IID, IID_KSEQ, WITHOUT_REPLACEMENT, DraftTree


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
