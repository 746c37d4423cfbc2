"""Medusa-1's tree policy: a static tree of rank paths filled from the Medusa heads' top-k per depth.

Paper: Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
ICML 2024, arXiv 2401.10774. Released code: ``FasterDecoding/Medusa`` @ ``e2a5d20`` (restated, not copied):
the tree ``mc_sim_7b_63`` (``medusa/model/medusa_choices.py``, also Spec-Bench's ``--medusa-choices`` default)
and the fill of ``medusa/model/utils.py`` (``generate_medusa_buffers``, ``generate_candidates``). Design notes:
docs/medusa_hydra.md.

    python run.py method=medusa                        # SmolLM2 + the heads trained here (make train-medusa)
    python run.py method=medusa_cpu                    # the first 15 entries of the tree (CPU-sized)
    python run.py method=medusa model=vicuna-7b drafter.release=FasterDecoding/medusa-vicuna-7b-v1.3

Each step: the drafter (``drafter=medusa``, specdec/drafters/medusa.py) runs its K heads once on the target's
feature of the last committed position; a node at depth d with last rank r gets head d-1's r-th best token --
it depends on (depth, rank) only, not on its parent (sequentially independent heads). The tree is
``deterministic`` (top-ranked, distinct siblings): greedy keeps the longest path matching the target's argmax,
sampling uses the shared verifier's sample-and-follow rule, which is exact. Medusa's own "typical acceptance"
(a fixed threshold on p, argmax bonus) is lossy and is not implemented (docs/medusa_hydra.md §4).

Decisions ([design]):
  * ``tree_nodes``: the first N entries of the tree *as written* in the release (every prefix of that list is
    ancestor-closed), re-sorted breadth-first as ``generate_medusa_buffers`` does.
  * Nodes deeper than the drafter's head count are dropped (logged once, counted in ``stats``): e.g. a
    2-head drafter keeps the depth <= 2 part of ``mc_sim_7b_63``.
  * Near ``max_new_tokens`` the tree is cut to depth ``remaining - 1`` (the step also commits a bonus token).
  * Step 1 reads the feature of ``prompt[-2]`` with root ``prompt[-1]`` (the harness prefills ``prompt[:-1]``);
    Medusa prefills the whole prompt and lets the target pick the first token. Only step 1 differs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from methods._draft import DraftModelProposer
from methods.recycle import RankPath, Template
from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, register
from specdec.verify.tree import DETERMINISTIC, DraftTree

log = logging.getLogger(__name__)

# Static trees as rank paths in the release's written order (one path per word, one digit per depth; every
# rank is < 10 = the release's TOPK). mc_sim_7b_63: medusa/model/medusa_choices.py @ e2a5d20 -- 63 paths,
# 10 / 28 / 23 / 2 nodes at depths 1-4, 42 leaves.
TREES = {
    "mc_sim_7b_63": "0 00 1 01 2 000 10 02 3 03 4 04 20 05 001 5 06 6 07 010 11 7 08 002 30 09 8 9 100 020 12 003 "
                    "40 21 004 005 0000 011 006 030 50 13 007 008 009 60 040 14 70 012 200 31 22 80 050 15 101 021 "
                    "90 060 0001 16 070",
}


def tree_paths(tree: str, tree_nodes: int | None = None) -> list[RankPath]:
    """The rank paths of ``tree`` in written order; ``tree_nodes`` keeps the first N (ancestor-closed)."""
    if tree not in TREES:
        raise SettingError(f"tree {tree!r} is unknown; use one of {sorted(TREES)}")
    paths = [tuple(int(c) for c in word) for word in TREES[tree].split()]
    if tree_nodes is None:
        return paths
    if not isinstance(tree_nodes, int) or isinstance(tree_nodes, bool) or not 1 <= tree_nodes <= len(paths):
        raise SettingError(f"tree_nodes must be an int in 1..{len(paths)} (entries of {tree}) or null, "
                           f"got {tree_nodes!r}")
    return paths[:tree_nodes]


class HeadTreeProposer(DraftModelProposer, ABC):
    """A static rank tree over a head drafter of kind ``drafter_kind``; subclasses implement ``fill``."""

    drafter_kind = "medusa"
    paper = "Medusa-1"

    def __init__(self, env: MethodEnv, tree: str = "mc_sim_7b_63", tree_nodes: int | None = None):
        super().__init__(env, self.key)
        kind = getattr(self.drafter, "kind", None)
        if kind != self.drafter_kind:
            raise SettingError(f"drafts with {self.paper} heads: use drafter={self.drafter_kind} "
                               f"(got drafter kind {kind!r})")
        paths = tree_paths(tree, tree_nodes)
        heads = self.drafter.num_heads
        kept = [p for p in paths if len(p) <= heads]
        self.dropped = len(paths) - len(kept)
        if self.dropped:
            log.info("%s: the drafter has %d heads, so %d of %d tree entries deeper than %d are dropped",
                     self.key, heads, self.dropped, len(paths), heads)
        self.tree_name, self.max_depth = tree, max(len(p) for p in kept)
        self.templates = {d: Template.from_paths([p for p in kept if len(p) <= d], env.device)
                          for d in range(1, self.max_depth + 1)}
        widest = self.templates[self.max_depth].max_rank + 1
        if widest > env.vocab_size:
            raise SettingError(f"tree {tree!r} needs the {widest} best tokens per head, but the vocabulary has "
                               f"{env.vocab_size}")

    @abstractmethod
    def fill(self, template: Template, ctx: Context) -> torch.Tensor:
        """int64 [T]: the template's tokens for this step (root first)."""

    def propose(self, ctx: Context) -> DraftTree:
        depth = self.depth(ctx, self.max_depth)
        if depth == 0 or len(ctx.tokens) < 2:  # nothing to draft, or no feature before the root yet
            return DraftTree.root_only(ctx.root, self.env.device)
        template = self.templates[depth]
        tree = DraftTree(self.fill(template, ctx), template.parents, kind=DETERMINISTIC)
        # static template: hand the verifier its precomputed buffers (DraftTree's cached properties)
        tree.__dict__.update(depth=template.depth, ancestors=template.ancestors, parent_list=template.parent_list,
                             children=template.children)
        return tree

    def tree_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({1} | {t.size for t in self.templates.values()}))

    @property
    def label(self) -> str:
        heads = self.drafter.heads
        return f"{self.paper} ({heads.num_heads} heads, {'shared' if heads.share_lm_head else 'own'} LM head)"

    def stats(self) -> dict:
        return {**super().stats(), "label": self.label, "tree": self.tree_name,
                "tree_tokens": self.templates[self.max_depth].size, "tree_depth": self.max_depth,
                "heads": self.drafter.num_heads, "tree_entries_dropped": self.dropped}


@register("medusa")
class Medusa(HeadTreeProposer):
    """Node (depth d, last rank r) <- head d-1's r-th best token, all heads run once on one feature."""

    def fill(self, template: Template, ctx: Context) -> torch.Tensor:
        self.follow(ctx)
        top = self.drafter.top_tokens(template.max_rank + 1).to(template.depth.device)   # [K, k]
        tokens = torch.empty(template.size, dtype=torch.long, device=template.depth.device)
        tokens[0] = ctx.root
        tokens[1:] = top[template.depth[1:] - 1, template.ranks[1:]]
        return tokens
