"""SpS: speculative sampling with one draft chain (Leviathan et al., arXiv 2211.17192; Chen et al.,
arXiv 2302.01318). Spec-Bench's SpS row is HF assisted generation with ``double7/vicuna-68m``.

    python run.py method=sps drafter=early_exit            # self-draft on the CPU
    python run.py method=sps model=vicuna-7b drafter=vicuna-68m

Each step the drafter extends the root autoregressively by ``gamma`` tokens, each drawn from q (the
draft distribution after the target's processors) and q stored with the chain; the verifier applies
the single-draft rule (``chain_sampled``: accept x w.p. min(1, p(x)/q(x)), else a residual sample).
Under greedy the chain is the draft's argmax chain (``deterministic``). The chain is clipped to the
budget. ``gamma`` stays constant: the transformers ``heuristic`` schedule (+2 / -1) is not modelled.
"""

from __future__ import annotations

import torch

from methods._draft import DraftModelProposer
from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, register
from specdec.verify.tree import CHAIN_SAMPLED, DraftTree


@register("sps")
class SpS(DraftModelProposer):
    def __init__(self, env: MethodEnv, gamma: int = 5):
        super().__init__(env, "sps")
        if gamma < 1:
            raise SettingError(f"gamma must be >= 1, got {gamma}")
        self.gamma = gamma

    def tree_sizes(self) -> tuple[int, ...]:
        return (1, self.gamma + 1)

    def propose(self, ctx: Context) -> DraftTree:
        depth = self.depth(ctx, self.gamma)
        if depth == 0:
            return DraftTree.root_only(ctx.root, self.env.device)
        logits = self.follow(ctx)  # [V] after the root
        tokens, q_rows = [ctx.root], {}
        for i in range(depth):
            if self.greedy:
                x = int(logits.argmax())
            else:
                q_rows[i] = self.probs(logits[None])[0]                  # [V]
                x = int(torch.multinomial(q_rows[i], 1, generator=self.generator))
            tokens.append(x)
            if i + 1 < depth:                                        # the leaf's q is never needed
                logits = self.drafter.expand([x], [i])[0]
        return self.tree(tokens, list(range(-1, depth)), CHAIN_SAMPLED, q_rows)
