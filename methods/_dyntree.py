"""Shared proposer of the dynamic-tree methods (eagle2, opt_tree, dyspec; specs/dynamic_trees.md):
the drafter follows the committed sequence, the policy (``grow``) fills a ``specdec.tree_builder.Pool``,
the builder keeps the top-N nodes as the tree. Runs are named honestly: "EAGLE-2 tree policy
(drafter: early_exit)" unless the drafter is an EAGLE head (then plain "EAGLE-2").

Stats per run: tokens per verify forward (root included), the chosen N per step (auto budget), the
calibration table (node value bin -> nodes drafted, nodes accepted; spec §4 "Logging"), and the mean
proposer time per step in ms.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from methods._draft import DraftModelProposer
from specdec.decode import Stopwatch
from specdec.errors import UserError
from specdec.proposer import Context, MethodEnv, StepResult
from specdec.tree import DETERMINISTIC, DraftTree
from specdec.tree_builder import AutoBudget, Pool, select

CALIBRATION_BINS = 10  # node value in [i/10, (i+1)/10)


class DynamicTreeProposer(DraftModelProposer, ABC):
    """Subclasses set ``paper`` and implement ``grow(pool, root_logprobs [1, V], max_depth)``."""

    paper = "dynamic tree"
    max_tree_depth = 64  # subclasses: the policy's deepest node

    def __init__(self, env: MethodEnv, name: str, budget, latency_profile: str | None = None,
                 auto_max_budget: int = 64):
        super().__init__(env, name)
        self.auto = None
        if budget == "auto":
            if not latency_profile:
                raise UserError(f"method {name!r}: budget=auto needs latency_profile=<profile JSON>")
            self.auto = AutoBudget(latency_profile, int(auto_max_budget))
        elif not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive int or 'auto', got {budget!r}")
        self.budget = budget
        self.clock = Stopwatch(env.device)
        self.reset("run")

    @property
    def label(self) -> str:
        kind = getattr(self.drafter, "kind", "?")
        head = getattr(getattr(self.drafter, "head", None), "kind", None)  # e.g. early_exit + Kangaroo adapter
        return self.paper if kind == "eagle" else f"{self.paper} tree policy (drafter: {kind}{'+' + head if head else ''})"

    # ------------------------------------------------------------------ the step
    def tree_kind(self) -> str:
        return DETERMINISTIC  # top-ranked children: sample-and-follow under sampling (spec, common facts)

    @abstractmethod
    def grow(self, pool: Pool, root_logprobs: torch.Tensor, max_depth: int) -> None:
        """The policy: expand ``pool`` from the root's draft log-probs (one drafter forward per round)."""

    def propose(self, ctx: Context) -> DraftTree:
        start = self.clock.mark()  # read in observe, after the verify synced (no extra device sync here)
        max_depth = self.depth(ctx, self.max_tree_depth)
        if max_depth == 0:
            return DraftTree.root_only(ctx.root, self.env.device)
        pool = Pool.start(self.drafter, ctx.root)
        self.grow(pool, torch.log_softmax(self.follow(ctx).float(), -1)[None], max_depth)
        budget = self.auto.choose(pool) if self.auto else self.budget
        tree = pool.tree(select(pool, budget), self.tree_kind(), self.env.device, self.env.vocab_size)
        self._marks = (start, self.clock.mark())
        return tree

    def observe(self, step: StepResult) -> None:
        if step.tree.meta is None:
            return
        self._draft_seconds = self.clock.seconds(*self._marks)
        accepted = set(step.path[1:])
        for node, logvalue in enumerate(step.tree.meta["logvalue"][1:], start=1):
            b = min(int(math.exp(logvalue) * CALIBRATION_BINS), CALIBRATION_BINS - 1)
            self.calib_nodes[b] += 1
            self.calib_accepted[b] += node in accepted
        self.steps += 1
        self.tokens_per_verify += step.tree.size
        self.pool_nodes += step.tree.meta["pool_size"] - 1
        self.proposer_seconds += self._draft_seconds
        if self.auto:
            self.auto.observe(step.tree, len(step.path) - 1, self._draft_seconds)

    def reset(self, scope: str) -> None:
        super().reset(scope)
        if scope == "run":
            self.calib_nodes = [0] * CALIBRATION_BINS
            self.calib_accepted = [0] * CALIBRATION_BINS
            self.steps = self.tokens_per_verify = self.pool_nodes = 0
            self.proposer_seconds = self._draft_seconds = 0.0
            if self.auto:
                self.auto.reset()

    def stats(self) -> dict:
        n = max(self.steps, 1)
        out = {**super().stats(), "label": self.label,
               "budget": "auto" if self.auto else self.budget,
               "tokens_per_verify": self.tokens_per_verify / n,   # root included (spec §6 budget semantics)
               "pool_nodes_per_step": self.pool_nodes / n,
               "proposer_ms_per_step": 1000 * self.proposer_seconds / n,
               "calibration_bins": [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS)],
               "calibration_nodes": list(self.calib_nodes),
               "calibration_accepted": list(self.calib_accepted)}
        if self.auto:
            out["auto_budget_chosen"] = {str(k): v for k, v in sorted(self.auto.chosen.items())}
            out["auto_calibration"] = self.auto.calibration
        return out
