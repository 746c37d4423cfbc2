"""The shared builder of dynamic draft trees: EAGLE-2, OPT-Tree, DySpec.

All three methods rank draft nodes by a *value*, the product of draft probabilities along the
root -> node path (stored as a log-sum, ``logvalue``; the root's is 0), grow a candidate pool through
the drafter's batched tree forward, and keep a budgeted, connected subtree. They differ only in how
they grow the pool (the *policy*, one module in ``methods/``). This module holds what they share:

* ``Pool``: the candidate nodes (token, parent, depth, logvalue) and the map to the drafter's own
  tree numbering; ``expand`` feeds chosen frontier nodes to the drafter in one forward and returns
  their children's raw draft log-probs (temperature 1: values are ranked on the raw draft).
* ``select``: top-``budget`` eligible nodes by value (ties -> earlier recorded), the ancestor closure
  (values are monotone along paths, so this only matters for ties and hand-made values), and, if the
  closure overshoots, dropping the lowest-value leaves.
* ``Pool.tree``: the kept nodes in breadth-first order, siblings in recording (= draw) order, as the
  ``DraftTree`` the shared verifier takes; per-node logvalues ride in ``tree.meta`` for calibration.
* ``AutoBudget``: EAGLE-2's ``total_token=-1`` analogue -- N chosen per step from a measured latency
  profile t(n) and a running calibration of values against acceptance, maximising predicted tokens/s.

Here budgets always count draft nodes N (root excluded; a verify forward runs N + 1 tokens, which the
stats report as ``tokens_per_verify``). A method's own knob may count differently (EAGLE-2's
``total_token`` includes the root); ``methods/_dyntree.py`` converts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from specdec.errors import UserError
from specdec.verify.profile import Profile
from specdec.verify.tree import DETERMINISTIC, DraftTree


@dataclass
class Pool:
    """Candidate nodes of one step; node 0 is the root (the last committed token)."""

    drafter: object                                         # specdec.drafters.Drafter (follow() already called)
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    logvalue: list[float] = field(default_factory=list)     # log prod q along the path; root 0.0
    drafter_id: list[Optional[int]] = field(default_factory=list)  # index in the drafter's tree; None = never fed
    eligible: Optional[set[int]] = None                     # nodes a policy allows in the tree (None = all)
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q its children were drawn from [V]

    @classmethod
    def start(cls, drafter, root: int) -> "Pool":
        return cls(drafter, [root], [-1], [0], [0.0], [0])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, logvalue: float) -> int:
        self.tokens.append(int(token)); self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1); self.logvalue.append(float(logvalue))
        self.drafter_id.append(None)
        return len(self.tokens) - 1

    def add_top(self, parents: Sequence[int], logprobs: torch.Tensor, k: int, keep: Optional[int] = None) -> list[int]:
        """Children of ``parents`` from their draft log-probs [n, V]: each parent's top-``k`` tokens,
        value = parent's + log q. ``keep``: record only the global top-``keep`` of the n*k (OPT-Tree).
        Returns the new node ids, parent by parent, each parent's children by descending q."""
        top_lp, top_tok = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)     # [n, k]
        both = torch.cat([top_lp.double(), top_tok.double()], 1).cpu()          # one read (ids exact in float64)
        top_lp, top_tok = both[:, :top_lp.shape[1]], both[:, top_lp.shape[1]:].long()
        values = torch.tensor([self.logvalue[p] for p in parents], dtype=torch.float64)[:, None] + top_lp.double()
        flat = torch.arange(values.numel())
        if keep is not None and keep < values.numel():
            flat = stable_top(values.flatten(), keep).sort().values             # recording order kept
        k_eff = top_lp.shape[1]
        flat_values, flat_tokens = values.flatten().tolist(), top_tok.flatten().tolist()
        return [self.add(flat_tokens[i], parents[i // k_eff], flat_values[i]) for i in flat.tolist()
                if flat_values[i] > -math.inf]                                   # never draft padded / -inf tokens

    @torch.inference_mode()
    def expand(self, nodes: Sequence[int]) -> torch.Tensor:
        """One drafter forward over ``nodes`` (their parents already fed). Returns raw log q [n, V] after each."""
        base = len(self.drafter.tree_tokens)
        logits = self.drafter.expand([self.tokens[v] for v in nodes], [self.drafter_id[self.parents[v]] for v in nodes])
        for i, v in enumerate(nodes):
            self.drafter_id[v] = base + i
        return torch.log_softmax(logits.float(), -1)

    def tree(self, keep: Sequence[int], kind: str = DETERMINISTIC, device="cpu", vocab: Optional[int] = None) -> DraftTree:
        """The kept nodes (root implied) in BFS order, siblings in recording order."""
        kept = set(keep)
        kids: dict[int, list[int]] = {}
        for v in sorted(kept):
            kids.setdefault(self.parents[v], []).append(v)
        order, i = [0], 0
        while i < len(order):
            order.extend(kids.get(order[i], []))
            i += 1
        if len(order) != len(kept) + 1:
            raise ValueError("kept nodes are not ancestor-closed")
        new = {old: j for j, old in enumerate(order)}
        draft_probs = None
        if kind != DETERMINISTIC:
            draft_probs = torch.zeros(len(order), vocab)
            for j, v in enumerate(order):
                if v in self.draft_probs and kids.get(v):
                    draft_probs[j] = self.draft_probs[v]
        meta = {"logvalue": [self.logvalue[v] for v in order], "pool_size": len(self)}
        return DraftTree.from_lists([self.tokens[v] for v in order], [-1] + [new[self.parents[v]] for v in order[1:]],
                                    device, kind=kind, draft_probs=draft_probs, meta=meta)  # one copy to the device


def stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``values`` [n], ties -> lower index (torch.topk does not promise it)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:k]


def select(pool: Pool, budget: int) -> list[int]:
    """Top-``budget`` eligible non-root nodes by value (ties -> earlier recorded), closed under ancestors;
    if the closure exceeds the budget, the lowest-value leaves are dropped (ties -> later recorded first)."""
    cands = [v for v in range(1, len(pool)) if (pool.eligible is None or v in pool.eligible)
             and pool.logvalue[v] > -math.inf]
    cands.sort(key=lambda v: (-pool.logvalue[v], v))
    keep = set(cands[:max(0, budget)])
    for v in list(keep):                                   # ancestor closure
        p = pool.parents[v]
        while p > 0 and p not in keep:
            keep.add(p)
            p = pool.parents[p]
    if len(keep) > budget:
        n_kids = {v: 0 for v in keep}
        for v in keep:
            if pool.parents[v] > 0:
                n_kids[pool.parents[v]] += 1
        while len(keep) > budget:
            leaf = min((v for v in keep if n_kids[v] == 0), key=lambda v: (pool.logvalue[v], -v))
            keep.remove(leaf)
            if pool.parents[leaf] > 0:
                n_kids[pool.parents[leaf]] -= 1
    return sorted(keep)


PROFILE_FIELDS = ("model", "device", "dtype", "backend", "threads")  # written by analysis.latency.measure_profile


def run_settings(device, model=None) -> dict:
    """This run's values of the latency profile's ``PROFILE_FIELDS``, those that can be known: the device type;
    torch's intra-op threads on CPU only (a GPU forward does not depend on them); with the target ``model``
    its dtype, back end (``specdec.backends.backend_of``) and name (``config.name_or_path``, if set)."""
    from specdec.backends import backend_of

    device = torch.device(device)
    out: dict = {"device": device.type}
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
    if model is not None:
        if getattr(model, "dtype", None) is not None:
            out["dtype"] = str(model.dtype).removeprefix("torch.")
        out["backend"] = backend_of(model)
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        if name:
            out["model"] = str(name)
    return out


def _model_key(name) -> str:
    """Compare models by their last path component, ``.gguf`` dropped, case-folded: the profile records the path
    given to ``--model`` (``embedded:pkg/F.gguf``, a hub id, a local path), the run the location it was loaded
    from (an embedded GGUF's safetensors cache ``.../models/F``, the hub id, the path)."""
    tail = str(name).removeprefix("embedded:").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return tail.removesuffix(".gguf").casefold()


def profile_mismatch(meta: dict, run: dict) -> list[str]:
    """``"field profile-value (profile) vs run-value (run)"`` per ``PROFILE_FIELDS`` entry known on both sides
    that differs (a field missing from an older or hand-made profile, or unknown for the run, is not compared)."""
    diffs = []
    for key in PROFILE_FIELDS:
        if meta.get(key) is None or run.get(key) is None:
            continue
        prof, ours = meta[key], run[key]
        same = _model_key(prof) == _model_key(ours) if key == "model" else str(prof) == str(ours)
        if not same:
            diffs.append(f"{key} {prof} (profile) vs {ours} (run)")
    return diffs


class AutoBudget:
    """Per-step N maximising predicted tokens/s = (1 + c * sum of the top-N values) / (t_draft + t(N + 1)).

    t(n) is the device's measured verify latency (``analysis.latency`` profile JSON, ``python -m
    analysis.latency profile``), refused if it was measured under other settings than ``run``
    (``run_settings``); c is the running calibration of values against acceptance (accepted draft tokens /
    summed values of the verified trees, prior 1 = EAGLE-2's "confidence ~ acceptance"); t_draft the
    proposer's running mean time per step. EAGLE-2's released auto mode instead times target forwards of
    40..60 tokens at start and discounts them by fixed factors (SafeAILab/EAGLE @ cb7e084,
    ``eagle/model/ea_model.py::EaModel.from_pretrained``); this one uses the profile the project's cost
    model uses.

    Learned state (``reset``): c and t_draft. Stats (``reset_stats``): ``chosen``, the histogram of N."""

    def __init__(self, profile_path: str, max_budget: int, run: Optional[dict] = None):
        path = Path(profile_path)
        if not path.is_file():
            raise UserError(f"budget=auto needs a latency profile: {path} not found; measure one with "
                            f"`python -m analysis.latency profile --out {path}`")
        self.profile = Profile.load(path)
        diffs = profile_mismatch(self.profile.meta, run or {})
        if diffs:
            flags = " ".join(f"--{k} {run[k]}" for k in PROFILE_FIELDS if k in run)
            raise UserError(f"latency profile {path} does not match this run: {'; '.join(diffs)}; measure one with "
                            f"`python -m analysis.latency profile {flags} --out <json>`")
        self.max_budget = max_budget
        self.t = torch.tensor(self.profile.t(list(range(1, max_budget + 2))), dtype=torch.float64)  # t(N+1), N = 0..max
        self.reset()
        self.reset_stats()

    def reset(self) -> None:
        """Forget the learned calibration and mean draft time."""
        self.accepted, self.predicted = 1.0, 1.0   # calibration prior: c = 1
        self.draft_seconds, self.steps = 0.0, 0

    def reset_stats(self) -> None:
        self.chosen: dict[int, int] = {}

    @property
    def calibration(self) -> float:
        return self.accepted / self.predicted

    def choose(self, pool: Pool) -> int:
        values = sorted((pool.logvalue[v] for v in range(1, len(pool)) if pool.eligible is None or v in pool.eligible),
                        reverse=True)[: self.max_budget]
        gain = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.tensor(values, dtype=torch.float64).exp().cumsum(0)])       # [N + 1]: N = 0..
        t_draft = self.draft_seconds / self.steps if self.steps else 0.0
        rate = (1.0 + self.calibration * gain) / (t_draft + self.t[: gain.numel()])
        n = int(rate.argmax())
        self.chosen[n] = self.chosen.get(n, 0) + 1
        return n

    def observe(self, tree: DraftTree, accepted: int, draft_seconds: float) -> None:
        """Learn from one verified tree: ``accepted`` draft tokens of it, ``draft_seconds`` spent proposing it."""
        self.accepted += accepted
        self.predicted += sum(math.exp(v) for v in tree.meta["logvalue"][1:])
        self.draft_seconds += draft_seconds
        self.steps += 1
