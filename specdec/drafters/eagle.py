"""The EAGLE drafter: an EAGLE head (``specdec.drafters.heads.EagleHead``) autoregressing on the target's features
(Li et al. 2024, EAGLE / EAGLE-2; docs/dynamic_trees.md §1, §5b).

    python run.py method=eagle2 drafter=eagle           # conf/drafter/eagle.yaml: the head trained here
    python run.py method=eagle2 model=vicuna-7b drafter.release=yuhuili/EAGLE-Vicuna-7B-v1.3   # a released head

Head row j reads the pair (f_j, x_{j+1}) -- the target's last hidden state (after its final norm) at
position j and the embedding of the next token -- at position j, and predicts f_{j+1}; the target's
frozen LM head turns a predicted feature into draft logits (as ``specdec.training.train`` trains it).

Rows of committed tokens are *stable*: they use the target's true features, which the decode loop
hands over in ``Context.hidden`` (the target keeps its final norm's output when a proposer sets
``wants_hidden``; docs/verifier.md §10). Draft-tree rows use the head's own predicted feature of the
parent node. After a step, the tree rows are dropped and the newly committed tokens are re-fed with
the target's features (EAGLE's released code does the same), so row j always holds the true (f_j,
x_{j+1}); the root's row of the last step is already stable (its feature was the target's).

API as every drafter (specdec/drafters/base.py) plus the features: ``begin(tokens, hidden)``,
``follow(tokens, hidden) -> root logits [V]``, ``expand(tokens, parents) -> logits [n, V]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import DynamicCache

from specdec import PROJECT_ROOT
from specdec.drafters.base import Drafter
from specdec.errors import UserError
from specdec.verify.layers import attention_mask, causal_ancestors, keep_rows


class EagleDrafter(Drafter):
    kind = "eagle"
    wants_hidden = True

    def __init__(self, model, head, vocab_size: int):
        if getattr(head, "kind", None) != "eagle":
            raise UserError(f"drafter=eagle needs an EAGLE head checkpoint, got a {getattr(head, 'kind', '?')!r} head")
        self.head = head
        self.lm_head = model.get_output_embeddings()
        super().__init__(vocab_size, model.device, model.dtype)

    def _new_caches(self) -> list:
        return [DynamicCache()]

    def _reset(self) -> None:
        super()._reset()
        self.rows = 0            # stable head rows in the cache (row j = (f_j, x_{j+1}))
        self.node_features = None  # [N, H] predicted feature of every draft-tree node (root first)

    # ------------------------------------------------------------------ public API
    def begin(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> None:
        """A new generation; the prompt's rows are fed by the first ``follow`` (they need no root)."""
        self._reset()

    @torch.inference_mode()
    def follow(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Drop last step's tree rows, feed rows ``self.rows .. len(tokens) - 2`` with the target's features
        ``hidden`` [len(tokens) - 1, H]; the last fed row is the root's. Returns its logits float32 [V]."""
        L = len(tokens)
        if hidden is None or hidden.shape[0] != L - 1:
            raise RuntimeError("EagleDrafter.follow needs the target's features of tokens[:-1] (Context.hidden)")
        if L < 2:
            raise UserError("the EAGLE drafter needs a prompt of at least 2 tokens (row 0 reads the first token's feature)")
        # Keep the stable rows (last step's root row included: its feature was the target's); drop draft nodes.
        self.rows = min(self.rows, L - 2)
        if self.caches[0].get_seq_length() > self.rows:
            keep_rows(self.caches[0], self.rows, [])
        new = torch.arange(self.rows, L - 1, device=self.device)                    # [n] row = feature index
        ids = torch.tensor([list(tokens[self.rows + 1:])], device=self.device)        # [1, n]: x_{j+1}
        mask = attention_mask(causal_ancestors(len(new), self.device), self.rows, self.dtype)
        self._feed = hidden[self.rows:].to(self.dtype)[None]                          # [1, n, H]: f_j
        self.forwards += 1
        logits = self._logits(self._forward(ids, new[None], mask))
        self.rows, self.cached = L - 1, list(tokens[:-1])
        self.tree_tokens, self.tree_parents = [int(tokens[-1])], [-1]
        self.tree_anc = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        self.tree_start = L - 2                     # rows before the root's
        self.node_features = self._out[-1:]         # [1, H]
        return logits[-1]

    @torch.inference_mode()
    def expand(self, tokens: Sequence[int], parents: Sequence[int], want_logits: bool = True):
        """Draft nodes read their parent's predicted feature. Returns logits float32 [n, V] (or None)."""
        self._feed = self.node_features[torch.tensor(list(parents), device=self.device)][None]   # [1, n, H]
        logits = super().expand(tokens, parents, want_logits)
        self.node_features = torch.cat([self.node_features, self._out])
        return logits

    # ------------------------------------------------------------------ back end
    def _forward(self, ids, positions, mask, last_only=False):
        """Head over (``self._feed`` [1, n, H], ids [1, n]) -> logits [n, V]; keeps the predicted features."""
        self._out = self.head((self._feed, ids), positions, mask, self.caches[0])[0]     # [n, H]
        return self._out if last_only else self.lm_head(self._out)


def build_eagle_drafter(cfg: dict, model, vocab_size: int) -> EagleDrafter:
    """``conf/drafter/eagle.yaml``: a released EAGLE-1/2 head (``release``: hub id or directory,
    ``specdec.drafters.released``) or else a head trained here (``head``: ``specdec.drafters.heads.save_head``
    format), around ``model``."""
    from specdec.drafters.heads import head_file, load_head

    if cfg.get("release"):
        from specdec.drafters.released import load_released_eagle

        return EagleDrafter(model, load_released_eagle(str(cfg["release"]), model), vocab_size)
    if not cfg.get("head"):
        raise UserError("drafter=eagle needs drafter.head=<checkpoint .safetensors> (train one: python -m "
                        "specdec.training head=eagle) or drafter.release=<released EAGLE head: hub id or directory>")
    path = Path(cfg["head"])
    if not path.is_absolute() and not head_file(path, ".json").is_file():  # repo-relative, run from anywhere
        path = PROJECT_ROOT / path
    return EagleDrafter(model, load_head(path, model), vocab_size)
