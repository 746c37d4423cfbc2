"""Hydra's tree growth: the static Medusa tree, filled level by level by sequentially dependent heads.

Paper: Ankner et al., "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", COLM 2024,
arXiv 2402.05109. Released code: ``zankner/Hydra`` @ ``3f39fbd`` (restated, not copied):
``hydra/model/hydra_heads/prefix_mlp_head.py`` (``HydraPrefixMLP._grounded_proposal``) with the tree
``mc_sim_7b_63`` (``hydra/model/hydra_choices.py``; Spec-Bench's ``--hydra-choices`` default). Design notes:
docs/medusa_hydra.md.

    python run.py method=hydra                         # SmolLM2 + the heads trained here (make train-hydra)
    python run.py method=hydra_cpu                     # the first 15 entries of the tree (CPU-sized)
    python run.py method=hydra model=vicuna-7b drafter.release=ankner/hydra-vicuna-7b-v1.3

Each step: the drafter (``drafter=hydra``, specdec/drafters/medusa.py) brings its prefix layer up to date and
gives head 0's logits for the root's children; then, per depth, every node of the previous level gets its
children as the top-ranked tokens of ITS OWN row (r-th best for rank r), and the nodes of this level that have
children are expanded in one head call (their rows = parent's row + the embedding of their token). For
``mc_sim_7b_63`` that is head calls on 1 / 10 / 10 / 1 rows giving 10 / 28 / 23 / 2 nodes, as released. Unlike
Medusa, a node's token depends on its whole path. The tree is ``deterministic``: greedy and exact
sample-and-follow by the shared verifier; Hydra's typical acceptance (lossy) is not implemented.

Same decisions as methods/medusa.py (``tree_nodes`` prefixes, nodes deeper than the heads dropped, depth cut
near ``max_new_tokens``, step 1 from ``prompt[-2]``). The release's buffers assume that the children which have
children of their own are the best-ranked siblings; this grower does not (it expands whichever nodes have
children in the template).
"""

from __future__ import annotations

import torch

from methods.medusa import HeadTreeProposer
from methods.recycle import Template
from specdec.verify.proposer import Context, register


@register("hydra")
class Hydra(HeadTreeProposer):
    drafter_kind = "hydra"
    paper = "Hydra"

    def fill(self, template: Template, ctx: Context) -> torch.Tensor:
        tokens = [ctx.root] + [0] * (template.size - 1)
        child_logits = {0: self.follow(ctx)}    # template node -> logits [V] of its children
        drafter_node = {0: 0}                   # template node -> the drafter's node index
        ranks = template.ranks.tolist()
        for lo, hi in zip(template.bounds[:-1], template.bounds[1:]):   # one level (depth) at a time
            level = range(lo, hi)
            parents = sorted({template.parent_list[i] for i in level})
            row = {p: j for j, p in enumerate(parents)}
            best = max(ranks[i] for i in level) + 1
            top = torch.topk(torch.stack([child_logits[p] for p in parents]), best, dim=-1).indices.tolist()
            for i in level:
                tokens[i] = top[row[template.parent_list[i]]][ranks[i]]
            inner = [i for i in level if template.children[i]]
            if inner:
                start = len(drafter_node)
                logits = self.drafter.expand([tokens[i] for i in inner],
                                             [drafter_node[template.parent_list[i]] for i in inner])
                for j, i in enumerate(inner):
                    drafter_node[i], child_logits[i] = start + j, logits[j]
        return torch.tensor(tokens, dtype=torch.long, device=template.depth.device)
