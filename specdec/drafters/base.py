"""Drafters: who drafts, as opposed to what the draft tree looks like (the method's tree policy).

A drafter owns a draft model -- a second Hugging Face LM (``hf``) or the target's own first ℓ decoder
layers (``early_exit``, optionally with a trained head such as Kangaroo's adapter) -- and its KV cache.
It is chosen by config (``conf/drafter/``, ``python run.py method=spectr drafter=early_exit``), never by
the method, and reaches the method through ``MethodEnv.drafter``. Its API, per verify step::

    root_logits = drafter.follow(ctx.tokens, ctx.hidden)  # [V]: cache := committed prefix; tree := [root]
    logits = drafter.expand(tokens, parents)              # [n, V]: add n nodes, one batched tree forward

Draft-tree node 0 is the root (the last committed token); ``expand`` numbers new nodes after the
existing ones, and ``parents`` index that numbering (a parent precedes its children). Logits are raw
float32 over the *target's* vocabulary; methods turn them into draft probabilities with the target's
own processors (``acceptance.processed_probs``) so q and p are comparable (docs/spectr_multidraft.md §0).

Cache invariant (as the target's, tree.py): after ``follow(tokens)`` the cache holds exactly
``tokens[:-1]`` followed by the root's row. ``follow`` keeps the rows of last step's draft nodes that
were committed (compaction: a row copy, far cheaper than a forward) and re-feeds committed tokens the
draft tree did not hold (the bonus token, or everything after ``begin``) in the same forward as the
root. Matching is by tokens, so the method may reorder its DraftTree freely.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from specdec.drafters.vocab import ReducedHead
from specdec.errors import UserError
from specdec.verify.layers import LayerRunner, attention_mask, causal_ancestors, keep_rows


class Drafter(ABC):
    """Base: a draft tree over a KV cache that follows the committed sequence. Subclasses implement
    ``_forward`` (one forward of new rows after the cached ones) and ``_new_caches``."""

    kind = "base"
    wants_hidden = False  # True: begin/follow need the target's last-layer features (EAGLE heads, eagle.py)

    def __init__(self, vocab_size: int, device: torch.device, dtype: torch.dtype):
        self.vocab_size = vocab_size  # the target's logit rows; draft logits are cut / padded to it
        self.device = device
        self.dtype = dtype
        self.forwards = 0             # draft forwards so far (stats)
        self._reset()

    # ------------------------------------------------------------------ public API
    def begin(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> None:
        """A new generation: encode ``tokens[:-1]`` (the prompt without its last token). ``hidden`` (the
        target's features of ``tokens[:-1]``) is read only by drafters that set ``wants_hidden``."""
        self._reset()
        if len(tokens) > 1:
            self._forward_chain(list(tokens[:-1]), want_logits=False)

    @torch.inference_mode()
    def follow(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Bring the cache to ``tokens[:-1]`` and forward the root ``tokens[-1]``. Returns float32 [V]."""
        tokens = list(tokens)
        self._keep_committed(tokens)
        logits = self._forward_chain(tokens[len(self.cached):], want_logits=True)
        self.cached = tokens[:-1]
        self.tree_tokens, self.tree_parents = [tokens[-1]], [-1]
        self.tree_anc = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        self.tree_start = len(self.cached)
        return logits[-1]

    @torch.inference_mode()
    def expand(self, tokens: Sequence[int], parents: Sequence[int], want_logits: bool = True) -> Optional[torch.Tensor]:
        """Append nodes (``tokens[i]`` a child of node ``parents[i]``) and forward them in one batch.
        Returns raw logits float32 [n, V] after each new node, or None (``want_logits=False``: only the
        caches and the drafter's states are wanted, e.g. Kangaroo's last draft)."""
        if not self.tree_tokens:
            raise RuntimeError("Drafter.expand before follow()")
        n_old, n = len(self.tree_tokens), len(tokens)
        anc = torch.zeros(n_old + n, n_old + n, dtype=torch.bool, device=self.device)
        anc[:n_old, :n_old] = self.tree_anc
        for i, parent in enumerate(parents):
            if not 0 <= parent < n_old + i:
                raise ValueError(f"new node {n_old + i} has parent {parent}: not an earlier node")
            anc[n_old + i] = anc[parent]
            anc[n_old + i, n_old + i] = True
        self.tree_tokens += list(map(int, tokens))
        self.tree_parents += list(map(int, parents))
        self.tree_anc = anc
        depth = anc[n_old:].sum(-1) - 1                                           # [n]: root depth 0
        ids = torch.tensor([list(map(int, tokens))], device=self.device)           # [1, n]
        positions = (self.tree_start + depth)[None]                               # [1, n]
        mask = attention_mask(anc[n_old:], self.tree_start, self.dtype)           # [1, 1, n, P + n_old + n]
        self.forwards += 1
        out = self._forward(ids, positions, mask, last_only=not want_logits)
        return self._logits(out) if want_logits else None

    @torch.inference_mode()
    def teacher_forced(self, tokens: Sequence[int]) -> torch.Tensor:
        """Raw draft logits float32 [n, V] after each of ``tokens`` in one forward from an empty cache: q along
        a known text (``analysis.token_acceptance``). Ends any generation in progress (the cache is reset)."""
        if self.wants_hidden:
            raise UserError(f"drafter {self.kind!r} reads the target's features: teacher forcing it is not wired")
        self._reset()
        logits = self._forward_chain(list(tokens), want_logits=True)
        self._reset()
        return logits

    def stats(self) -> dict:
        return {"drafter": self.kind, "draft_forwards": self.forwards}

    def reset_stats(self) -> None:
        """Zero the forward count (the runner does so before the first timed question)."""
        self.forwards = 0

    def restrict_vocab(self, ids: torch.Tensor) -> None:
        """Draft only tokens ``ids`` (FR-Spec, specdec/drafters/vocab.py): the LM head ``self.lm_head`` is cut to
        those rows and every other logit is -inf. Drafters without such a head refuse."""
        if not hasattr(self, "lm_head"):
            raise UserError(f"drafter={self.kind} has no LM head this harness can cut: drafter.vocab must be full")
        self.lm_head = ReducedHead(self.lm_head, ids)

    # ------------------------------------------------------------------ cache bookkeeping
    def _reset(self) -> None:
        self.caches = self._new_caches()
        self.cached: list[int] = []     # committed tokens whose rows open the cache, in order
        self.tree_tokens: list[int] = []
        self.tree_parents: list[int] = []
        self.tree_anc = None            # bool [N, N] ancestors of the current draft tree (root = 0)
        self.tree_start = 0             # cache row of the root

    def _keep_committed(self, tokens: list[int]) -> None:
        """Compact the cache to the longest prefix of ``tokens[:-1]`` it holds: committed rows, then the
        root and the draft nodes on the committed path (walked by token)."""
        cut = 0
        limit = min(len(self.cached), len(tokens) - 1)
        while cut < limit and self.cached[cut] == tokens[cut]:
            cut += 1
        rows = []
        if cut == len(self.cached) and self.tree_tokens and len(tokens) - 1 > cut and tokens[cut] == self.tree_tokens[0]:
            node, rows = 0, [self.tree_start]
            children: dict[tuple[int, int], int] = {}
            for i, (tok, parent) in enumerate(zip(self.tree_tokens[1:], self.tree_parents[1:]), start=1):
                children.setdefault((parent, tok), i)
            for tok in tokens[cut + 1:-1]:
                node = children.get((node, tok))
                if node is None:
                    break
                rows.append(self.tree_start + node)
        if self.caches[0].get_seq_length() > cut or rows:
            for cache in self.caches:
                keep_rows(cache, cut, rows)
        self.cached = list(tokens[:cut + len(rows)])
        self.tree_tokens = []

    def _forward_chain(self, tokens: list[int], want_logits: bool) -> Optional[torch.Tensor]:
        """Forward committed tokens after the cached rows (a chain: causal mask)."""
        P, n = len(self.cached), len(tokens)
        ids = torch.tensor([tokens], device=self.device)                           # [1, n]
        positions = torch.arange(P, P + n, device=self.device)[None]              # [1, n]
        mask = None if n == 1 else attention_mask(causal_ancestors(n, self.device), P, self.dtype)
        self.forwards += 1
        hidden = self._forward(ids, positions, mask, last_only=not want_logits)
        self.cached = self.cached + tokens
        return self._logits(hidden) if want_logits else None

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Cut or pad draft logits [n, V_draft] to the target's vocabulary (padding = -inf: never drafted)."""
        logits = logits.float()
        V = logits.shape[-1]
        if V > self.vocab_size:
            return logits[:, :self.vocab_size]
        if V < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - V), value=float("-inf"))
        return logits

    # ------------------------------------------------------------------ back end
    @abstractmethod
    def _new_caches(self) -> list:
        """Fresh KV caches for a new generation (one per cached part: layers, head)."""

    @abstractmethod
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Optional[torch.Tensor],
                 last_only: bool = False) -> torch.Tensor:
        """ids [1, n] at positions [1, n] after the cached rows, additive mask [1, 1, n, C + n] or None.
        Returns logits [n, V_draft]; ``last_only``: the caller discards the output, so a back end may skip
        its LM head (it must still update every cache)."""


class HFDrafter(Drafter):
    """A separate Hugging Face causal LM sharing the target's tokenizer (e.g. ``double7/vicuna-68m``)."""

    kind = "hf"

    def __init__(self, model, vocab_size: int):
        self.model = model
        super().__init__(vocab_size, model.device, model.dtype)

    def _new_caches(self) -> list:
        return [DynamicCache()]

    def _forward(self, ids, positions, mask, last_only=False):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.caches[0],
                         use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits[0]


class EarlyExitDrafter(Drafter):
    """The target's own first ``exit_layer`` decoder layers, then ``head`` (a module replacing the final
    norm, e.g. Kangaroo's adapter: ``head(hidden [1, T, H], position_ids [1, T], mask, cache) -> [1, T, H]``)
    or the final norm, then the target's LM head. Self-drafting: no second model in memory; the shallow
    layers and the head each have their own KV cache."""

    kind = "early_exit"

    def __init__(self, model, exit_layer: int, vocab_size: int, head=None):
        self.runner = LayerRunner(model)
        if not 1 <= exit_layer < self.runner.num_layers:
            raise UserError(f"drafter exit_layer={exit_layer} must be in [1, {self.runner.num_layers - 1}] "
                            f"for this {self.runner.num_layers}-layer model")
        self.exit_layer = exit_layer
        self.head = head
        self.lm_head = self.runner.lm_head  # the target's (restrict_vocab may cut it)
        super().__init__(vocab_size, model.device, model.dtype)

    def _new_caches(self) -> list:
        return [DynamicCache()] + ([DynamicCache()] if self.head is not None else [])

    def _forward(self, ids, positions, mask, last_only=False):
        hidden = self.runner.run(self.runner.embed(ids), 0, self.exit_layer, positions, mask, self.caches[0])
        self.exit_states = hidden  # [1, n, H] these rows' layer-ℓ states (Kangaroo's verifier resumes from them)
        if self.head is not None:  # the head runs even when the output is discarded: its cache needs the rows
            if mask is None and ids.shape[1] > 1:  # the head needs an explicit mask after its cache prefix
                mask = attention_mask(causal_ancestors(ids.shape[1], self.device), self.caches[1].get_seq_length(),
                                      self.dtype)
            hidden = self.head(hidden, positions, mask, self.caches[1])
        if last_only:
            return hidden[0, -1:]  # the caller discards the output: skip the norm and the LM head
        return self.lm_head(hidden if self.head is not None else self.runner.norm(hidden))[0]
