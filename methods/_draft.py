"""Shared base of the draft-model methods (sps, specinfer, spectr, rsd): a tree policy over
``env.drafter`` (specdec/drafters/base.py). The policy never touches a KV cache; the drafter never
decides a tree's shape.

Under sampling, draft probabilities q are the softmax of the draft logits after the target's own
temperature / top-k / top-p processors (``processed_probs``), and the tree stores exactly the q its
children were drawn from (docs/spectr_multidraft.md §10, "wrong q"). Under greedy (temperature 0) every
method drafts deterministically from the raw draft logits and the tree kind is ``deterministic``.
"""

from __future__ import annotations

import torch

from specdec.verify.acceptance import processed_probs
from specdec.drafters import require_drafter
from specdec.verify.proposer import Context, MethodEnv, Proposer
from specdec.verify.tree import DETERMINISTIC, DraftTree


DRAFT_STREAM = 0x5EED_D4AF7  # offset of the draft draws' seed from the acceptance rule's (same Context.seed)


class DraftModelProposer(Proposer):
    """Owns the sampling settings and a seeded generator for draft draws; subclasses build the tree."""

    needs_drafter = True

    def __init__(self, env: MethodEnv, name: str):
        super().__init__(env)
        self.drafter = require_drafter(env, name)
        self.wants_hidden = self.drafter.wants_hidden  # EAGLE heads read the target's features (Context.hidden)
        self.greedy = env.temperature is None or env.temperature <= 0
        self.generator = torch.Generator().manual_seed(env.seed)

    def begin(self, ctx: Context) -> None:
        # draft draws are seeded per (question, turn), apart from the acceptance rule's stream: a resumed
        # run draws exactly as an uninterrupted one
        self.generator.manual_seed(DRAFT_STREAM + ctx.seed)
        self.drafter.begin(ctx.tokens, ctx.hidden)

    def reset_stats(self) -> None:
        self.drafter.reset_stats()

    def follow(self, ctx: Context) -> torch.Tensor:
        """The drafter brought to the committed sequence; its raw logits [V] after the root."""
        return self.drafter.follow(ctx.tokens, ctx.hidden)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [n, V] -> q [n, V] (float32, CPU) under the run's sampling processors."""
        return processed_probs(logits.cpu(), self.env.temperature, self.env.top_k, self.env.top_p)

    def depth(self, ctx: Context, length: int) -> int:
        """Draft depth clipped to the budget: the step also commits a bonus token."""
        return max(0, min(length, ctx.remaining - 1))

    def tree(self, tokens: list[int], parents: list[int], kind: str, q_rows: dict[int, torch.Tensor],
             multiplicity: list[int] | None = None, shallow=None) -> DraftTree:
        """A DraftTree with q at the nodes that have children (zero rows elsewhere); ``kind`` only under sampling.
        Tokens and parents go to the device in one copy (``DraftTree.from_lists``); q and the multiplicities stay
        on the host, where the sampling rules read them. ``shallow``: Kangaroo's partial-depth states."""
        draft_probs = None
        if not self.greedy:
            draft_probs = torch.zeros(len(tokens), self.env.vocab_size)
            for node, q in q_rows.items():
                draft_probs[node] = q
        host_multiplicity = None if multiplicity is None or self.greedy else torch.tensor(multiplicity)
        return DraftTree.from_lists(tokens, parents, self.env.device, kind=DETERMINISTIC if self.greedy else kind,
                                    draft_probs=draft_probs, multiplicity=host_multiplicity, shallow=shallow)

    def stats(self) -> dict:
        return self.drafter.stats()
