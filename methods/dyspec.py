"""DySpec's greedy dynamic token tree (Xiong et al., arXiv 2410.11744) over any drafter -- a
RECONSTRUCTION from the paper: no released code was found, so runs are labelled "DySpec (reconstruction)".

    python run.py method=dyspec drafter=early_exit

Best-first growth by value (the estimated acceptance), the paper's greedy heap-based construction: a
heap holds, for every expanded node, its next not-yet-added child; each round pops the single best
entry, adds that child to the tree, pushes its next sibling, runs one drafter forward at the new node
and pushes its first child. Values only shrink along a path, so (greedy) nodes are added in non-increasing
value order and the popped set is always a connected tree of exactly ``budget`` draft nodes (the top-``budget``
nodes by value). ``budget`` counts draft tokens, root excluded (verify forward: budget + 1 tokens).

``band`` (a speed-up of this harness, not the paper's): with band b in (0, 1), a round also pops every
further entry whose value is at least (1 - b) x the round's best and expands all popped nodes in one
drafter forward: fewer, wider forwards, at the price of adding some nodes before better ones that a
pending forward would have revealed. ``band: 0`` (default) is pure best-first, one forward per node.

Greedy: children are the draft's top-ranked tokens (``deterministic`` tree). Sampling (temperature > 0):
siblings are drawn from q (the draft under the target's processors) without replacement, in pop order,
and verified by RSD's recursive rejection (``without_replacement``). A sibling is drawn only when its
heap entry is popped, and that entry's key is the expected value of the next draw (value(parent) x
E[q_raw(x)] over the remaining law), never the drawn token's own value: whether the i-th sibling exists
then depends only on earlier draws, which keeps the recursive rule exact. Ranking uses the raw draft
(temperature 1).
"""

from __future__ import annotations

import heapq
import math

import torch

from methods._dyntree import DynamicTreeProposer
from specdec.errors import SettingError, UserError
from specdec.verify.proposer import MethodEnv, register
from specdec.verify.tree import DETERMINISTIC, WITHOUT_REPLACEMENT
from specdec.drafters.tree_builder import Pool


@register("dyspec")
class DySpec(DynamicTreeProposer):
    paper = "DySpec (reconstruction)"

    def __init__(self, env: MethodEnv, budget=59, band: float = 0.0, max_depth: int = 10):
        if not 0 <= band < 1 or max_depth < 1:
            raise SettingError(f"band must be in [0, 1) and max_depth >= 1, got {band}, {max_depth}")
        self.band, self.max_tree_depth = float(band), max_depth
        super().__init__(env, self.key, budget)
        if self.auto and not self.greedy:
            raise UserError("dyspec: budget=auto is greedy-only (a top-N cut could drop a sampled sibling that "
                            "later siblings' draw law depends on)")
        self.grow_budget = self.auto.max_budget if self.auto else self.drafts

    def tree_kind(self) -> str:
        return DETERMINISTIC if self.greedy else WITHOUT_REPLACEMENT

    def grow(self, pool: Pool, root_logprobs: torch.Tensor, max_depth: int) -> None:
        heap: list[tuple[float, int]] = []  # (-key, parent): ties -> earlier recorded parent
        source: dict[int, list] = {}             # parent -> its children's source (see _open)
        self._open(pool, heap, source, 0, root_logprobs[0])
        size = 0
        while heap and size < self.grow_budget:
            floor = -heap[0][0] + (math.log1p(-self.band) if self.band else 0.0)
            batch, popped = [], 0
            while heap and size < self.grow_budget and (popped == 0 or (self.band and -heap[0][0] >= floor)):
                _, parent = heapq.heappop(heap)
                node = self._pop_child(pool, heap, source, parent)
                size += 1
                popped += 1
                if pool.depth[node] < max_depth:
                    batch.append(node)
            if batch and size < self.grow_budget:
                for node, row in zip(batch, pool.expand(batch)):
                    self._open(pool, heap, source, node, row)

    def stats(self) -> dict:
        return {**super().stats(), "reconstruction": "no released code; built from arXiv 2410.11744",
                "expansion": "best-first" if not self.band else f"banded best-first (band {self.band})"}

    def _open(self, pool: Pool, heap, source, node: int, logprobs: torch.Tensor) -> None:
        """Register ``node``'s children source from its raw draft log q [V] and push its first child."""
        if self.greedy:
            top_lp, top_tok = logprobs.topk(min(self.grow_budget, logprobs.shape[-1]))
            source[node] = [top_lp.cpu().tolist(), top_tok.cpu().tolist(), 0]     # ranked children, next rank
        else:
            draw_probs = self.probs(logprobs[None])[0]                              # q [V] the children are drawn from
            pool.draft_probs[node] = draw_probs
            source[node] = [draw_probs.clone(), logprobs.cpu().exp()]               # remaining law, raw q
        self._push(pool, heap, source, node)

    def _push(self, pool: Pool, heap, source, node: int) -> None:
        """Push ``node``'s next child with its key (exact value when greedy, expected value when sampling)."""
        src = source[node]
        if self.greedy:
            lps, _, rank = src
            if rank < len(lps) and lps[rank] > -math.inf:
                heapq.heappush(heap, (-(pool.logvalue[node] + lps[rank]), node))
            return
        remaining, raw = src
        mass = float(remaining.sum())
        if mass > 1e-9:
            key = pool.logvalue[node] + math.log(max(float((remaining * raw).sum()) / mass, 1e-30))
            heapq.heappush(heap, (-key, node))

    def _pop_child(self, pool: Pool, heap, source, parent: int) -> int:
        """Add ``parent``'s next child to the pool (draw it when sampling) and push the sibling after it."""
        src = source[parent]
        if self.greedy:
            lps, toks, rank = src
            node = pool.add(toks[rank], parent, pool.logvalue[parent] + lps[rank])
            src[2] = rank + 1
        else:
            remaining, raw = src
            token = int(torch.multinomial(remaining / remaining.sum(), 1, generator=self.generator))
            remaining[token] = 0.0
            node = pool.add(token, parent, pool.logvalue[parent] + math.log(max(float(raw[token]), 1e-30)))
        self._push(pool, heap, source, parent)
        return node
