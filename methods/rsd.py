"""RSD: recursive speculative decoding, draft trees sampled without replacement (Jeon et al., arXiv
2402.14160; docs/spectr_multidraft.md §4).
No official code was found; the tree builders follow docs/spectr_multidraft.md §4.

    python run.py method=rsd drafter=early_exit temperature=1                      # RSD-C, branching [3, 1, 1]
    python run.py method=rsd drafter=early_exit temperature=1 tree=beam beam_width=4 depth=4   # RSD-S

* ``tree: constant`` (RSD-C): every node at level l draws ``branching[l]`` distinct children by
  Gumbel-top-k on log q (i.i.d. Gumbel noise, keep the largest; their order is the draw order).
* ``tree: beam`` (RSD-S): stochastic beam search (Kool et al. 2019): each depth keeps the W partial
  sequences with the largest perturbed sequence scores, the children's Gumbels conditioned on their
  parent's perturbed score; the kept siblings are a prefix of their parent's Gumbel order.
The verifier's ``without_replacement`` rule renormalises q after each rejected sibling. Under greedy
the noise is zero: RSD-C becomes a top-b tree and RSD-S a plain beam search on the draft logits.
Exactness of the RSD-S variant relies on the [U] reading of docs/spectr_multidraft.md §4 (siblings kept
= a prefix of the per-node draw order); tests/test_multidraft.py checks it statistically on a tiny model.
"""

from __future__ import annotations

import torch

from methods._draft import DraftModelProposer
from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, register
from specdec.verify.tree import WITHOUT_REPLACEMENT, DraftTree

TREES = ("constant", "beam")


def gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    """i.i.d. standard Gumbel noise (float64)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log((-torch.log(u)).clamp_min(1e-300))


def conditioned_gumbel(scores: torch.Tensor, parent: float) -> torch.Tensor:
    """Kool et al.'s truncation: Gumbels ``scores`` [V] shifted so that their max equals ``parent``
    (numerically stable form of -log(exp(-parent) - exp(-max) + exp(-scores)))."""
    top = scores.max()
    v = parent - scores + torch.log1p(-torch.exp(scores - top).clamp(max=1 - 1e-16))
    return parent - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))


@register("rsd")
class RSD(DraftModelProposer):
    def __init__(self, env: MethodEnv, tree: str = "constant", branching: list | tuple = (3, 1, 1),
                 beam_width: int = 4, depth: int = 4):
        super().__init__(env, "rsd")
        if tree not in TREES:
            raise SettingError(f"tree must be one of {TREES}, got {tree!r}")
        if tree == "constant" and (not branching or min(branching) < 1):
            raise SettingError(f"branching must be a non-empty list of positive ints, got {branching}")
        if tree == "beam" and (beam_width < 1 or depth < 1):
            raise SettingError(f"beam_width and depth must be >= 1, got {beam_width}, {depth}")
        self.kind, self.branching = tree, [int(b) for b in branching]
        self.beam_width, self.beam_depth = beam_width, depth

    def tree_sizes(self) -> tuple[int, ...]:
        if self.kind == "beam":
            return (1, 1 + self.beam_width * self.beam_depth)
        level, nodes = 1, 1
        for b in self.branching:  # RSD-C: a constant branching factor per level
            level *= b
            nodes += level
        return (1, nodes)

    def perturbed(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log q + Gumbel [V] float64, q [V]); under greedy the raw log-softmax and no q."""
        if self.greedy:
            return torch.log_softmax(logits.double(), -1), None
        q = self.probs(logits[None])[0]                                     # [V]
        return q.double().log() + gumbel(q.shape, self.generator), q

    def propose(self, ctx: Context) -> DraftTree:
        depth = self.depth(ctx, len(self.branching) if self.kind == "constant" else self.beam_depth)
        if depth == 0:
            return DraftTree.root_only(ctx.root, self.env.device)
        tokens, parents, q_rows = [ctx.root], [-1], {}
        score = [0.0]                      # RSD-S: perturbed (sampling) or plain (greedy) sequence score
        phi = [0.0]                        # RSD-S: log q of the path
        frontier, logits = [0], self.follow(ctx)[None]  # logits [len(frontier), V]
        for level in range(depth):
            candidates = []                # (key, node, token, phi) per possible child
            for node, row in zip(frontier, logits):
                keys, q = self.perturbed(row)
                if q is not None:
                    q_rows[node] = q
                if self.kind == "constant":
                    top = keys.topk(self.branching[level])
                    values, ids = torch.stack([top.values, top.indices.double()]).tolist()  # one read (ids exact)
                    candidates += [(k, node, int(t), 0.0) for k, t in zip(values, ids) if k > float("-inf")]
                    continue
                logq = torch.log_softmax(row.double(), -1) if q is None else q.double().log()
                path = phi[node] + logq                                     # [V]
                seq = path if self.greedy else conditioned_gumbel(phi[node] + keys, score[node])
                top = seq.topk(min(self.beam_width, int((seq > float("-inf")).sum())))
                values, ids, logqs = torch.stack([top.values, top.indices.double(), path[top.indices]]).tolist()
                candidates += [(k, node, int(t), lq) for k, t, lq in zip(values, ids, logqs)]  # one read per node
            if self.kind == "beam":        # keep the best W over the whole level, in parent order
                candidates = sorted(sorted(candidates, key=lambda c: -c[0])[:self.beam_width], key=lambda c: c[1])
            new = []
            for key, node, tok, path_logq in candidates:   # per parent in descending key = draw order
                new.append(len(tokens))
                tokens.append(tok); parents.append(node); score.append(key); phi.append(path_logq)
            frontier = new
            if level + 1 < depth and new:
                logits = self.drafter.expand([tokens[i] for i in new], [parents[i] for i in new])
        return self.tree(tokens, parents, WITHOUT_REPLACEMENT, q_rows)
