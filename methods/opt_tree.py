"""OPT-Tree (Wang et al., TACL 2025, arXiv 2406.17276; released code Jikai0Wang/OPT-Tree @ 4f87f54) over any drafter.

    python run.py method=opt_tree drafter=early_exit

Layer by layer: each of the ``nodes`` (n) nodes of the current layer proposes its top-n children
(value = parent's value x q), and only the global top-n of those n*n form the next layer. After adding
layer L+1, E = the sum of the n largest values over layers 1..L (the expected acceptance length of the
best n-node tree among them); the tree keeps deepening while E grew by more than ``threshold`` (delta)
since the last layer and fewer than ``max_depth`` layers exist, else the tree is the top-n nodes of
layers 1..L (as ``opt_classic/tree.py::Tree.update`` of the release: layer L+1 is only a look-ahead and
its forward is spent). Draft cost: one forward of n nodes per layer. Children are top-ranked, so the tree
is ``deterministic`` (the release verifies by sample-and-follow).

Budget: ``nodes`` (and ``budget``, default ``nodes``) counts draft nodes, root excluded, as the release's
``--nodes``: ``Tree.update`` keeps the top-``nnodes`` drafts and ``opt_classic/model.py`` prepends the last
committed token, so a verify forward carries nodes + 1 tokens (51 at the default 50).
"""

from __future__ import annotations

import math

import torch

from methods._dyntree import DynamicTreeProposer
from specdec.errors import SettingError
from specdec.verify.proposer import MethodEnv, register
from specdec.drafters.tree_builder import Pool


@register("opt_tree")
class OptTree(DynamicTreeProposer):
    paper = "OPT-Tree"

    def __init__(self, env: MethodEnv, nodes: int = 50, threshold: float = 0.5, max_depth: int = 10,
                 budget=None):
        if nodes < 1 or max_depth < 2:
            raise SettingError(f"nodes must be >= 1 and max_depth >= 2, got nodes={nodes}, max_depth={max_depth}")
        self.nodes, self.threshold, self.max_layers = nodes, threshold, max_depth
        self.max_tree_depth = max_depth - 1
        super().__init__(env, self.key, nodes if budget is None else budget)

    def grow(self, pool: Pool, root_logprobs: torch.Tensor, max_depth: int) -> None:
        layers = [pool.add_top([0], root_logprobs, self.nodes)]
        expected_prev = 0.0
        while len(layers) < max_depth:      # a look-ahead layer deeper than the step may commit is never built
            layers.append(pool.add_top(layers[-1], pool.expand(layers[-1]), self.nodes, keep=self.nodes))
            values = sorted((pool.logvalue[v] for layer in layers[:-1] for v in layer), reverse=True)
            expected = sum(math.exp(v) for v in values[: self.nodes])
            if not (expected - expected_prev > self.threshold and len(layers) < self.max_layers):
                pool.eligible = {v for layer in layers[:-1] for v in layer}
                return
            expected_prev = expected
