"""Shared proposer of the dynamic-tree methods (eagle2, opt_tree, dyspec): the drafter follows the
committed sequence, the policy (``grow``) fills a ``specdec.drafters.tree_builder.Pool``, the builder keeps the
top-N nodes as the tree. Runs are named honestly: "EAGLE-2 tree policy (drafter: early_exit)" unless the
drafter is an EAGLE head (then plain "EAGLE-2").

Budget: each method's ``budget`` knob keeps its paper's / release's meaning (``budget_includes_root``:
EAGLE-2's ``total_token`` counts the root, OPT-Tree's ``--nodes`` does not); internally N = draft nodes.

Learned state (``reset("run")``): the auto budget's calibration and mean draft time. Stats
(``reset_stats``): tokens per verify forward (root included), pool nodes and proposer ms per step, the
calibration table (node value bin -> nodes drafted, nodes accepted) and the auto budget's chosen N.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from methods._draft import DraftModelProposer
from specdec.verify.decode import Stopwatch
from specdec.errors import SettingError, UserError
from specdec.verify.proposer import Context, MethodEnv, StepResult, sizes_up_to
from specdec.verify.tree import DETERMINISTIC, DraftTree
from specdec.drafters.tree_builder import AutoBudget, Pool, run_settings, select

CALIBRATION_BINS = 10  # node value in [i/10, (i+1)/10)


class DynamicTreeProposer(DraftModelProposer, ABC):
    """Subclasses set ``paper`` and implement ``grow(pool, root_logprobs [1, V], max_depth)``."""

    paper = "dynamic tree"
    max_tree_depth = 64           # subclasses: the policy's deepest node
    budget_includes_root = False  # True: ``budget`` / ``auto_budget.max_budget`` count tokens per verify (root included)

    def __init__(self, env: MethodEnv, name: str, budget):
        """``budget``: the method's knob, or "auto" with the run's ``auto_budget`` settings (conf/auto_budget/,
        one definition for the three methods: ``latency_profile`` and ``max_budget``)."""
        super().__init__(env, name)
        root = int(self.budget_includes_root)
        self.auto = None
        if budget == "auto":
            auto = env.auto_budget or {}
            if not auto.get("latency_profile"):
                raise UserError(f"method {name!r}: budget=auto needs auto_budget.latency_profile=<profile JSON>")
            self.auto = AutoBudget(auto["latency_profile"], int(auto.get("max_budget", 64)) - root,
                                   run_settings(env.device, env.model))
        elif not isinstance(budget, int) or isinstance(budget, bool) or budget < 1 + root:
            raise SettingError(f"budget must be an int >= {1 + root} or 'auto', got {budget!r}")
        self.budget = budget                                   # the knob, in the method's own unit
        self.drafts = None if self.auto else budget - root     # N draft nodes kept per tree (root excluded)
        self.clock = Stopwatch(env.device)
        self._draft_seconds = 0.0
        self.reset_stats()

    @property
    def label(self) -> str:
        kind = getattr(self.drafter, "kind", "?")
        head = getattr(getattr(self.drafter, "head", None), "kind", None)  # e.g. early_exit + Kangaroo adapter
        return self.paper if kind == "eagle" else f"{self.paper} tree policy (drafter: {kind}{'+' + head if head else ''})"

    # ------------------------------------------------------------------ the step
    def tree_kind(self) -> str:
        return DETERMINISTIC  # top-ranked children: sample-and-follow under sampling

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
        budget = self.auto.choose(pool) if self.auto else self.drafts
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
        if scope == "run" and self.auto:
            self.auto.reset()   # learned state: the calibration and mean draft time N is chosen from

    def reset_stats(self) -> None:
        super().reset_stats()
        self.calib_nodes = [0] * CALIBRATION_BINS
        self.calib_accepted = [0] * CALIBRATION_BINS
        self.steps = self.tokens_per_verify = self.pool_nodes = 0
        self.proposer_seconds = 0.0
        if self.auto:
            self.auto.reset_stats()

    def tree_sizes(self) -> tuple[int, ...]:
        if self.auto:  # the budget is picked per step, up to max_budget drafts
            return sizes_up_to(self.auto.max_budget + 1)
        return (1, self.drafts + 1)

    def stats(self) -> dict:
        n = max(self.steps, 1)
        out = {**super().stats(), "label": self.label,
               "budget": self.budget,
               "budget_counts": "tokens per verify (root included)" if self.budget_includes_root
               else "draft nodes (root excluded)",
               "tokens_per_verify": self.tokens_per_verify / n,   # root included, whatever the budget counts
               "pool_nodes_per_step": self.pool_nodes / n,
               "proposer_ms_per_step": 1000 * self.proposer_seconds / n,
               "calibration_bins": [i / CALIBRATION_BINS for i in range(CALIBRATION_BINS)],
               "calibration_nodes": list(self.calib_nodes),
               "calibration_accepted": list(self.calib_accepted)}
        if self.auto:
            root = int(self.budget_includes_root)               # chosen N in the budget's unit
            out["auto_budget_chosen"] = {str(k + root): v for k, v in sorted(self.auto.chosen.items())}
            out["auto_calibration"] = self.auto.calibration
        return out
