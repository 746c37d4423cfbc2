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

``target_probs`` (p) is the softmax of the target logits after the same temperature / top-k / top-p
processors that plain sampling uses; ``draft_probs`` (q) is what the proposer drew the children from.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .tree import CHAIN_SAMPLED, DETERMINISTIC, IID, DraftTree


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
        draws = [c for c in kids for _ in range(int(multiplicity[c]) if multiplicity is not None else 1)]
        if len(draws) > 1:
            draws = [draws[i] for i in torch.randperm(len(draws), generator=self.generator).tolist()]
        residual = target_probs
        for child in draws:
            x = tokens[child]
            q_x = float(draft_probs[x])
            if q_x > 0 and float(torch.rand((), generator=self.generator)) < min(1.0, float(residual[x]) / q_x):
                return child, x
            leftover = (residual - draft_probs).clamp_min(0)
            if float(leftover.sum()) <= 0:  # residual == q: the rejection above had probability 0
                break
            residual = leftover / leftover.sum()
        return None, self.draw(residual)


def make_rule(temperature: float, top_k: int = 0, top_p: float = 1.0,
              generator: Optional[torch.Generator] = None):
    """Greedy for temperature 0, exact sampling otherwise."""
    if temperature is None or temperature <= 0:
        return Greedy()
    return Sampling(sampling_processors(temperature, top_k, top_p), generator or torch.Generator())
