"""Kangaroo: lossless self-speculative decoding via double early exiting (Liu et al., arXiv 2404.18911;
released code ``Equationliu/Kangaroo`` @ 4f0949d, greedy chain drafts only).

    python run.py method=kangaroo                              # drafter=kangaroo: layer 2 + the trained adapter
    python run.py method=kangaroo method.reuse_shallow=false   # verify with the full model
    python run.py method=kangaroo drafter=early_exit drafter.exit_layer=4   # untrained exit (no adapter)

A tree policy over the ``early_exit`` drafter (the target's first ℓ layers + Kangaroo's adapter + the
frozen LM head; specdec/drafters/base.py, specdec/drafters/heads.py); it never touches a KV cache.

* First exit: every draft comes from the drafter (layer ℓ -> adapter -> LM head).
* Second exit: drafting stops after the first draft whose confidence (top probability of the draft
  softmax that produced it) is below η (``threshold``), or after γ = ``max_steps`` drafts (released
  ``--steps 6``, README ``--threshold 0.6``); that last draft is still verified.
* ``reuse_shallow: true``: the tree carries the nodes' layer-ℓ states and their K/V of layers < ℓ, all
  computed while drafting (``specdec.verify.target.ShallowStates``); the verifier runs layers [ℓ, L) only.
  The last draft therefore also goes through the shallow layers and the adapter (its state and the
  adapter's cache row are needed), but not through the LM head (``want_logits=False``).
  ``false``: the verifier runs the full model (correct, pays the shallow layers twice).
* Tree variant (``draft_mode: tree``; paper only, not released, so a reconstruction): at each depth the
  top-``tree_topk`` drafts of the current node become its children and the chain continues from the
  top-1 child, with the same second exit.
* Sampling (beyond the release): ``sampling_rule: chain_sampled`` draws each chain draft from q (the
  draft softmax after the target's processors) and verifies with the single-draft rule;
  ``deterministic`` keeps argmax drafts (sample-and-follow). Trees always use ``deterministic``.
"""

from __future__ import annotations

import torch

from methods._draft import DraftModelProposer
from specdec.errors import SettingError
from specdec.drafters import EarlyExitDrafter
from specdec.verify.proposer import Context, MethodEnv, register, sizes_up_to
from specdec.verify.target import ShallowStates
from specdec.verify.tree import CHAIN_SAMPLED, DETERMINISTIC, DraftTree


@register("kangaroo")
class Kangaroo(DraftModelProposer):
    def __init__(self, env: MethodEnv, max_steps: int = 6, threshold: float = 0.6, reuse_shallow: bool = True,
                 draft_mode: str = "chain", tree_topk: int = 3, sampling_rule: str = CHAIN_SAMPLED):
        super().__init__(env, "kangaroo")
        if not isinstance(self.drafter, EarlyExitDrafter):
            raise SettingError("kangaroo drafts with the target's own first layers: use drafter=kangaroo or early_exit")
        if max_steps < 1 or not 0.0 <= threshold <= 1.0 or tree_topk < 1:
            raise SettingError(f"need max_steps >= 1, 0 <= threshold <= 1, tree_topk >= 1 "
                             f"(got {max_steps}, {threshold}, {tree_topk})")
        if draft_mode not in ("chain", "tree") or sampling_rule not in (CHAIN_SAMPLED, DETERMINISTIC):
            raise SettingError(f"draft_mode must be chain|tree and sampling_rule {CHAIN_SAMPLED}|{DETERMINISTIC}")
        self.max_steps, self.threshold, self.reuse_shallow = max_steps, threshold, reuse_shallow
        self.topk = tree_topk if draft_mode == "tree" else 1
        self.sampled = not self.greedy and draft_mode == "chain" and sampling_rule == CHAIN_SAMPLED
        self.exit_layer = self.drafter.exit_layer
        self._counts = {"steps": 0, "early_exits": 0, "drafts": 0}

    def reset_stats(self) -> None:
        """Zero the step / early-exit / draft counters (and the drafter's); Kangaroo learns nothing across steps."""
        super().reset_stats()
        self._counts = dict.fromkeys(self._counts, 0)

    def propose(self, ctx: Context) -> DraftTree:
        depth = self.depth(ctx, self.max_steps)
        if depth == 0:
            return DraftTree.root_only(ctx.root, self.env.device)
        logits = self.follow(ctx)                    # [V] draft logits after the root
        states = [self.drafter.exit_states[:, -1:]]  # [1, 1, H] per forwarded node
        tokens, parents, q_rows, node = [ctx.root], [-1], {}, 0
        for d in range(depth):
            confidence, kids = self._children(logits, node, q_rows)
            first = len(tokens)
            tokens += kids
            parents += [node] * len(kids)
            early = confidence < self.threshold
            last = early or d + 1 == depth
            if last and not self.reuse_shallow:
                break
            out = self.drafter.expand(kids, [node] * len(kids), want_logits=not last)  # [k, V]; the kids' shallow pass
            states.append(self.drafter.exit_states)                         # [1, k, H]
            if last:
                break
            node, logits = first, out[0]
        self._counts["steps"] += 1
        self._counts["early_exits"] += int(early and d + 1 < depth)
        self._counts["drafts"] += len(tokens) - 1
        return self.tree(tokens, parents, CHAIN_SAMPLED if self.sampled else DETERMINISTIC, q_rows,
                         shallow=self._shallow(states) if self.reuse_shallow else None)

    def _children(self, logits: torch.Tensor, node: int, q_rows: dict) -> tuple[float, list[int]]:
        """(confidence, draft tokens under ``node``): the top draft probability (the second exit's test) and a
        draw from q (chain_sampled) or the top-k of the raw draft logits, read from the device together."""
        confidence = torch.softmax(logits, -1).max()
        if self.sampled:
            q_rows[node] = self.probs(logits[None])[0]                      # [V]
            return float(confidence), [int(torch.multinomial(q_rows[node], 1, generator=self.generator))]
        top = logits.topk(self.topk).indices
        values = torch.cat([confidence.view(1).double(), top.double()]).tolist()  # one read (ids exact in float64)
        return values[0], [int(v) for v in values[1:]]

    def _shallow(self, states: list[torch.Tensor]) -> ShallowStates:
        """The tree nodes' layer-ℓ states and their K/V rows of layers < ℓ from the drafter's cache (the
        tree's node order is the drafter's: root at row ``tree_start``, then the nodes as expanded)."""
        hidden = torch.cat(states, dim=1)                                    # [1, T, H]
        start, end = self.drafter.tree_start, self.drafter.tree_start + hidden.shape[1]
        kv = tuple((layer.keys[..., start:end, :], layer.values[..., start:end, :])
                   for layer in self.drafter.caches[0].layers[:self.exit_layer])
        return ShallowStates(self.exit_layer, hidden, kv)

    def tree_sizes(self) -> tuple[int, ...]:
        return sizes_up_to(1 + self.max_steps * self.topk)  # the second exit stops drafting early

    def stats(self) -> dict:
        c = self._counts
        return {**super().stats(), "exit_layer": self.exit_layer, "reuse_shallow": self.reuse_shallow,
                "verify": f"layers [{self.exit_layer}, L) on the drafter's states" if self.reuse_shallow else "full model",
                "adapter": self.drafter.head is not None, "early_exit_share": c["early_exits"] / max(1, c["steps"]),
                "drafts_per_step": c["drafts"] / max(1, c["steps"])}
