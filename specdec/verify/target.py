"""The one owner of the target model and its KV cache: prefill, score a draft tree, commit a path.

Works with any Hugging Face causal LM whose attention accepts a 4D additive float mask (sdpa or
eager; never flash-attention, which ignores tree masks). Implements docs/verifier.md §3-§7:

* mask ``[1, 1, T, P + T]`` in the model dtype: 0 on every prefix column and on a node's own
  ancestors (itself included), ``finfo.min`` elsewhere. A bool mask is never used: with eager
  attention transformers 5.x *adds* it to the scores, which is silently wrong (docs/verifier.md §11.1).
* ``position_ids = P + depth`` passed explicitly (the default ``arange`` is wrong for trees).
* after acceptance the cache keeps the prefix, the root and the accepted nodes, in that order.
* sliding-window cache layers (Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``) keep only their last
  ``window - 1`` tokens, so rows a commit must move can be gone and a 4D tree mask no longer matches the
  cache: ``score`` refuses any forward that would fill a sliding layer past that (``UserError``, one line)
  and ``commit`` refuses a cache whose layers do not hold every committed row. Below the window they are
  exact (tests/test_architectures.py).
* side rows (``DraftTree.side``, docs/verifier.md §10.1) are appended after the tree rows in the same forward
  (mask ``[1, 1, T + S, P + T + S]``); ``score`` returns the tree's logits and leaves the wanted side rows'
  logits in ``side_logits``; ``commit`` drops their K/V with the rejected tree rows.
* the model may sit on any back end of ``specdec.backends`` (eager, oneDNN-prepacked linears, compiled);
  the mask, positions and compaction here are the same on all of them.
* on CPU, masked SDPA calls of grouped-query-attention models run the kernel's own GQA
  (``TRANSFORMERS_SDPA_FORCE_GQA=1``): otherwise transformers copies K/V of the whole cache per layer
  for every masked (tree) forward but not for one-token steps, a per-step cost growing with context
  that AR never pays (measured on SmolLM2, 12-token tree: -5 % at 256 cached tokens, -10-15 % at 1500;
  logits bit-identical). CUDA's masked kernels lack GQA, so there transformers' default stays. An
  explicit environment value wins.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from specdec.backends import backend_of
from specdec.errors import UserError
from specdec.verify.layers import attention_mask
from specdec.verify.tree import DraftTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShallowStates:
    """What partial-depth verification resumes from (``DraftTree.shallow``; Kangaroo, docs/verifier.md §10): states
    the drafter computed with the target's own first ℓ layers for the tree's nodes, in tree order."""

    start_layer: int      # ℓ: verification runs layers [ℓ, L)
    hidden: torch.Tensor  # [1, T, H] the nodes' states entering layer ℓ
    kv: tuple             # per layer < ℓ: (keys, values), each [1, KV heads, T, head dim], appended to the cache


class Target:
    """Holds ``model`` and the cache of one generation (cache = committed tokens minus the root)."""

    def __init__(self, model):
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if "flash" in impl:
            raise ValueError(f"attention {impl!r} cannot apply tree masks; load the model with sdpa or eager")
        self.model = model
        self.dtype = model.dtype
        self.device = model.device
        self.backend = backend_of(model)  # specdec.backends name, recorded in profiles and summary.env
        if self.device.type == "cpu":
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        self.cache: DynamicCache | None = None
        # Feature-based drafters (EAGLE heads, docs/verifier.md §10): when ``keep_hidden`` is set, prefill and
        # score leave the last layer's hidden states (the final norm's output, one row per input token) in
        # ``hidden`` [n, H], captured by a forward hook -- no other layer's states are materialised.
        self.keep_hidden = False
        self.hidden: torch.Tensor | None = None
        # Logits of the last scored tree's wanted side rows, float32 [K, V] in ``tree.side.wanted`` order; None
        # when it had no side rows (docs/verifier.md §10.1).
        self.side_logits: torch.Tensor | None = None
        self._runner = None  # layers.LayerRunner, built on the first partial-depth verification (score_from)

    @property
    def cache_len(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    @property
    def window_room(self) -> int | None:
        """Most tokens the cache may hold (smallest sliding window - 1 over its layers), None if unbounded."""
        windows = [layer.sliding_window for layer in (self.cache.layers if self.cache is not None else [])
                   if getattr(layer, "is_sliding", False) and getattr(layer, "sliding_window", None)]
        return min(windows) - 1 if windows else None

    def check_room(self, new_tokens: int) -> None:
        """Refuse a forward that would push a sliding-window layer past its window (rows would be lost)."""
        room = self.window_room
        if room is not None and self.cache_len + new_tokens > room:
            raise UserError(f"the target's sliding-window attention keeps {room} tokens, but the cache would hold "
                            f"{self.cache_len + new_tokens}: tree verification and KV compaction need every row; "
                            f"use shorter prompts / max_new_tokens or a model without sliding-window layers")

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> None:
        """Start a generation: encode ``prompt_ids[:-1]``; the last prompt token is the first root."""
        self.cache = DynamicCache(config=self.model.config)
        if len(prompt_ids) > 1:
            self.check_room(len(prompt_ids) - 1)
            ids = torch.tensor([prompt_ids[:-1]], device=self.device)
            # logits_to_keep=1: the prefill commits nothing, so skip the full-vocabulary head.
            with self._tap_hidden():
                self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        else:
            self.hidden = (torch.zeros(0, self.model.config.hidden_size, device=self.device, dtype=self.dtype)
                           if self.keep_hidden else None)

    def place(self, tree: DraftTree) -> DraftTree:
        """``tree`` with its index tensors on the model's device (``DraftTree.to``: the same object when they are
        there already). The decode loop places every proposed tree once, so the forward, the acceptance rule and
        the commit all read device tensors; proposers should build trees on ``MethodEnv.device`` to skip the copy."""
        return tree.to(self.device)

    @torch.inference_mode()
    def score(self, tree: DraftTree) -> torch.Tensor:
        """One forward over all tree nodes. Returns float32 logits ``[T, V]``; the cache grows by T (by T + S with
        S side rows, whose logits go to ``side_logits``). The inputs are made on the model's device from the
        (placed) tree: positions ``P + depth``, the mask from its ancestor matrix; no host copy."""
        tree = self.place(tree)
        P = self.cache_len
        self.check_room(tree.forward_rows)
        self.side_logits = None
        if tree.side is not None:
            if tree.shallow is not None:
                raise UserError("a tree cannot carry both side rows and shallow states: partial-depth "
                                "verification (Kangaroo) does not support side rows")
            return self._score_with_side(tree, P)
        if tree.shallow is not None:  # Kangaroo: resume at layer ℓ from the drafter's states (docs/verifier.md §10)
            return self.score_from(tree, tree.shallow)
        mask = None if tree.size == 1 else self.tree_mask(tree, P)  # the plain one-token step: causal == tree
        with self._tap_hidden():
            out = self.model(input_ids=tree.tokens[None], attention_mask=mask, position_ids=(P + tree.depth)[None],
                             past_key_values=self.cache, use_cache=True)
        return out.logits[0].float()

    def _score_with_side(self, tree: DraftTree, P: int) -> torch.Tensor:
        """``score`` for a tree with side rows: T tree rows then S side rows in one forward (docs/verifier.md
        §10.1). Tree rows see the prefix and their ancestors; side rows the prefix and what ``side.sees`` names.
        The LM head runs on the tree rows and the wanted side rows only (``logits_to_keep``). Returns the tree's
        float32 logits [T, V] and leaves the side rows' in ``side_logits`` [K, V]; the cache grows by T + S."""
        side, T = tree.side, tree.size
        visible = torch.zeros(T + side.size, T + side.size, dtype=torch.bool, device=self.device)
        visible[:T, :T] = tree.ancestors
        visible[T:] = side.sees
        keep = torch.cat([torch.arange(T, device=self.device), side.wanted + T])
        with self._tap_hidden():
            out = self.model(input_ids=torch.cat([tree.tokens, side.tokens])[None],
                             attention_mask=attention_mask(visible, P, self.dtype),
                             position_ids=(P + torch.cat([tree.depth, side.offsets]))[None],
                             past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        if self.hidden is not None:
            self.hidden = self.hidden[:T]
        logits = out.logits[0].float()
        self.side_logits = logits[T:]
        return logits[:T]

    @torch.inference_mode()
    def score_from(self, tree: DraftTree, shallow: "ShallowStates") -> torch.Tensor:
        """Partial-depth verification (Kangaroo, arXiv 2404.18911): append the drafter's K/V of layers
        [0, ℓ) for the tree nodes, run only layers [ℓ, L) + norm + LM head on their layer-ℓ states.
        Same cache contract and return value as ``score``: every layer grows by T rows, logits ``[T, V]``."""
        from specdec.verify.layers import LayerRunner

        if self._runner is None:
            self._runner = LayerRunner(self.model)  # probes once that the layers can be run in turn
        runner, P = self._runner, self.cache_len
        if len(shallow.kv) != shallow.start_layer or shallow.hidden.shape[1] != tree.size:
            raise ValueError(f"shallow states for {shallow.hidden.shape[1]} nodes / {len(shallow.kv)} layers do not "
                             f"match a {tree.size}-node tree entering layer {shallow.start_layer}")
        for layer, (keys, values) in enumerate(shallow.kv):  # layers [0, ℓ): rows the drafter already computed
            self.cache.update(keys, values, layer)
        with self._tap_hidden():
            hidden = runner.run(shallow.hidden, shallow.start_layer, runner.num_layers, (P + tree.depth)[None],
                                self.tree_mask(tree, P), self.cache)                     # [1, T, H]
            return runner.logits(runner.norm(hidden))

    @contextmanager
    def _tap_hidden(self):
        """While ``keep_hidden``: store the final norm's output of the enclosed forward in ``hidden`` [n, H]."""
        self.hidden = None
        if not self.keep_hidden:
            yield
            return
        norm = getattr(self.model.get_decoder(), "norm", None)
        if norm is None:
            raise UserError(f"{type(self.model).__name__} has no final norm `model.norm`: feature-based drafters "
                            f"(EAGLE heads) need the last hidden states")
        captured = []
        handle = norm.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            yield
        finally:
            handle.remove()
        self.hidden = captured[-1][0]

    def tree_mask(self, tree: DraftTree, prefix_len: int) -> torch.Tensor:
        """Additive float mask ``[1, 1, T, P + T]`` in the model dtype (prefix visible, tree = ancestors)."""
        return attention_mask(tree.ancestors, prefix_len, self.dtype)

    @torch.inference_mode()
    def commit(self, tree: DraftTree, path: list[int]) -> None:
        """Keep prefix + ``path`` (root-first node indices) in the cache; drop the other tree rows and every
        side row (they sit after the tree rows)."""
        P = self.cache_len - tree.forward_rows
        n_drop = tree.forward_rows - len(path)
        if any(layer.keys.shape[-2] != self.cache_len for layer in self.cache.layers):
            raise UserError("a KV-cache layer does not hold every committed row (sliding window exceeded?): "
                            "the accepted path cannot be compacted")
        if path != list(range(len(path))):
            # Tail-only compaction: move the accepted rows down to P, P+1, ... (advanced indexing on
            # the right copies first, so overlapping source/destination is safe).
            src = self.place(tree).path_index(path) + P  # read off the ancestor matrix on the device
            for layer in self.cache.layers:
                layer.keys[..., P:P + len(path), :] = layer.keys[..., src, :]
                layer.values[..., P:P + len(path), :] = layer.values[..., src, :]
        if n_drop:
            self.cache.crop(-n_drop)


def warm(target, sizes=None) -> float:
    """Run untimed verify forwards of chain trees of ``sizes`` tokens (root included; a proposer's ``tree_sizes()``,
    default ``specdec.verify.proposer.WARM_SIZES``; size 1, the AR baseline's step, is always added) so ``compile``
    specialises before anything is timed (it compiles / allocates); returns seconds.

    Every size meets the three cache layouts of a generation, on which ``compile`` specialises the strides
    (seen: 1-2 minute recompiles inside timed steps): the transposed view a prefill leaves, the contiguous
    cache an appended step leaves, and the view a rejected tree's crop leaves. Leaves the target without a
    cache. For ``compile`` the first calls take long (logged)."""
    from specdec.verify.proposer import WARM_SIZES

    start = time.perf_counter()
    sizes = sorted({1, *map(int, WARM_SIZES if sizes is None else sizes)})
    vocab = target.model.get_output_embeddings().weight.shape[0]
    ids = [(10 + i) % vocab for i in range(16 + 2 * max(sizes))]
    for n in sizes:
        target.prefill(ids[:17])
        for _ in range(2):  # after the prefill, after an append; after a crop, after an append
            target.score(DraftTree.chain(ids[16], ids[17:16 + n], device=target.device))
            target.score(DraftTree.chain(ids[16 + n], ids[17 + n:16 + 2 * n], device=target.device))
            target.cache.crop(-n)
    target.cache = None
    seconds = time.perf_counter() - start
    log.info("backend %s warm-up (%s tokens per forward): %.1f s", backend_of(target.model), sizes, seconds)
    return seconds
