"""SpecInfer: k i.i.d. draft sequences merged into a token tree, verified by multi-step speculative
sampling (Miao et al., arXiv 2305.09781; docs/spectr_multidraft.md §2).

    python run.py method=specinfer drafter=early_exit temperature=1

The k drafts of length L are drawn level by level, in one batched drafter forward per level: a trie
node that m drafts pass through draws m i.i.d. next tokens from q(. | node); equal draws share one
child whose multiplicity counts them (a draft's next token is independent of the others' given its
path, so this is exactly k independent sequences). The verifier's ``iid`` rule processes a node of
multiplicity m as m draws. Under greedy the k drafts are the draft's k most likely first tokens, each
continued by its argmax chain (a deterministic tree: the temperature-0 draws would all coincide).
SpecInfer's own expansion config (e.g. <1,1,3,1,1,1,1,1>) is not modelled; k and L are the knobs of
the SpecTr paper's comparison.
"""

from __future__ import annotations

import torch

from methods._draft import DraftModelProposer
from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, register, sizes_up_to
from specdec.verify.tree import IID, DraftTree


@register("specinfer")
class SpecInfer(DraftModelProposer):
    tree_kind = IID  # the verifier's rule for these i.i.d. tries (spectr.py: K-SEQ)

    def __init__(self, env: MethodEnv, k: int = 4, length: int = 4):
        super().__init__(env, self.key)
        if k < 1 or length < 1:
            raise SettingError(f"k and length must be >= 1, got k={k}, length={length}")
        self.k, self.length = k, length

    def tree_sizes(self) -> tuple[int, ...]:
        return sizes_up_to(self.k * self.length + 1)  # k draws of length L merged into a trie

    def children(self, logits: torch.Tensor, draws: int, level: int) -> tuple[list[int], list[int], torch.Tensor | None]:
        """Children of one node from its draft logits [V]: (tokens, multiplicities, q or None)."""
        if self.greedy:
            if level == 0:
                return logits.topk(draws).indices.tolist(), [1] * draws, None
            return [int(logits.argmax())], [draws], None
        q = self.probs(logits[None])[0]                                   # [V]
        drawn = torch.multinomial(q, draws, replacement=True, generator=self.generator).tolist()
        tokens = list(dict.fromkeys(drawn))                               # first-draw order
        return tokens, [drawn.count(t) for t in tokens], q

    def propose(self, ctx: Context) -> DraftTree:
        depth = self.depth(ctx, self.length)
        if depth == 0:
            return DraftTree.root_only(ctx.root, self.env.device)
        tokens, parents, mult, q_rows = [ctx.root], [-1], [self.k], {}
        frontier, logits = [0], self.follow(ctx)[None]  # logits [len(frontier), V]
        for level in range(depth):
            new = []
            for node, row in zip(frontier, logits):
                kids, counts, q = self.children(row, mult[node], level)
                if q is not None:
                    q_rows[node] = q
                for tok, m in zip(kids, counts):
                    new.append(len(tokens))
                    tokens.append(tok); parents.append(node); mult.append(m)
            frontier = new
            if level + 1 < depth:
                logits = self.drafter.expand([tokens[i] for i in new], [parents[i] for i in new])
        return self.tree(tokens, parents, self.tree_kind, q_rows, mult)
