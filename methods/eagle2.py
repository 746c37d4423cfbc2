"""EAGLE-2's dynamic draft tree (Li et al., arXiv 2406.16858; released code SafeAILab/EAGLE @ cb7e084,
``eagle/model/cnets1.py::Model.topK_genrate``) over any drafter.

    python run.py method=eagle2 drafter=eagle                 # EAGLE-2 itself (an EAGLE head trained here)
    python run.py method=eagle2 drafter=early_exit            # "EAGLE-2 tree policy (drafter: early_exit)"

Expansion: the root's top-k children are the first frontier; ``depth`` times, one drafter forward over
the k frontier nodes gives each its top-k children (value = parent's + log q), all k*k are recorded,
and the k of highest value become the next frontier. Rerank: the tree is the top-(``budget`` - 1) of all
k + depth*k^2 recorded candidates (ancestor-closed, BFS order). ``budget`` is the release's
``total_token``: tokens per verify forward, root included (``Model.__init__`` keeps ``total_tokens - 1``
drafts; default 60 in ``ea_model.py`` and ``evaluation/gen_ea_answer_vicuna.py``). ``rerank: false`` is the
paper's ablation: only nodes that were in a frontier (k per depth) compete for the budget. Draft cost
1 + depth forwards; deepest node depth + 1. Children are top-ranked, so the tree is ``deterministic``.
"""

from __future__ import annotations

import torch

from methods._dyntree import DynamicTreeProposer
from specdec.errors import SettingError
from specdec.verify.proposer import MethodEnv, register
from specdec.drafters.tree_builder import Pool, stable_top


@register("eagle2")
class Eagle2(DynamicTreeProposer):
    paper = "EAGLE-2"
    budget_includes_root = True   # budget = total_token of the release

    def __init__(self, env: MethodEnv, budget=60, depth: int = 5, top_k: int = 10, rerank: bool = True):
        if depth < 0 or top_k < 1:
            raise SettingError(f"depth must be >= 0 and top_k >= 1, got depth={depth}, top_k={top_k}")
        self.expansions, self.top_k, self.rerank = depth, top_k, rerank
        self.max_tree_depth = depth + 1
        super().__init__(env, self.key, budget)

    def grow(self, pool: Pool, root_logprobs: torch.Tensor, max_depth: int) -> None:
        frontier = pool.add_top([0], root_logprobs, self.top_k)
        beam = set(frontier)
        for _ in range(min(self.expansions, max_depth - 1)):
            kids = pool.add_top(frontier, pool.expand(frontier), self.top_k)
            values = torch.tensor([pool.logvalue[c] for c in kids], dtype=torch.float64)
            frontier = [kids[i] for i in sorted(stable_top(values, self.top_k).tolist())]
            beam.update(frontier)
        if not self.rerank:
            pool.eligible = beam
