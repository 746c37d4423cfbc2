"""The one owner of the target model and its KV cache: prefill, score a draft tree, commit a path.

Works with any Hugging Face causal LM whose attention accepts a 4D additive float mask (sdpa or
eager; never flash-attention, which ignores tree masks). Implements specs/verifier.md §3-§7:

* mask ``[1, 1, T, P + T]`` in the model dtype: 0 on every prefix column and on a node's own
  ancestors (itself included), ``finfo.min`` elsewhere. A bool mask is never used: with eager
  attention transformers 5.x *adds* it to the scores, which is silently wrong (§11.1).
* ``position_ids = P + depth`` passed explicitly (the default ``arange`` is wrong for trees).
* after acceptance the cache keeps the prefix, the root and the accepted nodes, in that order.
* on CPU, masked SDPA calls of grouped-query-attention models run the kernel's own GQA
  (``TRANSFORMERS_SDPA_FORCE_GQA=1``): otherwise transformers copies K/V of the whole cache per layer
  for every masked (tree) forward but not for one-token steps, a per-step cost growing with context
  that AR never pays (measured on SmolLM2, 12-token tree: -5 % at 256 cached tokens, -10-15 % at 1500;
  logits bit-identical). CUDA's masked kernels lack GQA, so there transformers' default stays. An
  explicit environment value wins.
"""

from __future__ import annotations

import os

import torch
from transformers import DynamicCache

from .tree import DraftTree


class Target:
    """Holds ``model`` and the cache of one generation (cache = committed tokens minus the root)."""

    def __init__(self, model):
        impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if "flash" in impl:
            raise ValueError(f"attention {impl!r} cannot apply tree masks; load the model with sdpa or eager")
        self.model = model
        self.dtype = model.dtype
        self.device = model.device
        if self.device.type == "cpu":
            os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
        self.cache: DynamicCache | None = None

    @property
    def cache_len(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> None:
        """Start a generation: encode ``prompt_ids[:-1]``; the last prompt token is the first root."""
        self.cache = DynamicCache(config=self.model.config)
        if len(prompt_ids) > 1:
            ids = torch.tensor([prompt_ids[:-1]], device=self.device)
            # logits_to_keep=1: the prefill commits nothing, so skip the full-vocabulary head.
            self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def score(self, tree: DraftTree) -> torch.Tensor:
        """One forward over all tree nodes. Returns float32 logits ``[T, V]``; the cache grows by T."""
        P = self.cache_len
        if tree.size == 1:  # the plain one-token step: no mask needed, causal == tree
            out = self.model(input_ids=tree.tokens[None], position_ids=torch.tensor([[P]], device=self.device),
                             past_key_values=self.cache, use_cache=True)
        else:
            out = self.model(input_ids=tree.tokens[None], attention_mask=self.tree_mask(tree, P),
                             position_ids=(P + tree.depth)[None], past_key_values=self.cache, use_cache=True)
        return out.logits[0].float()

    def tree_mask(self, tree: DraftTree, prefix_len: int) -> torch.Tensor:
        """Additive float mask ``[1, 1, T, P + T]`` in the model dtype (prefix visible, tree = ancestors)."""
        T = tree.size
        mask = torch.zeros(T, prefix_len + T, dtype=self.dtype, device=self.device)
        mask[:, prefix_len:].masked_fill_(~tree.ancestors, torch.finfo(self.dtype).min)
        return mask[None, None]

    @torch.inference_mode()
    def commit(self, tree: DraftTree, path: list[int]) -> None:
        """Keep prefix + ``path`` (root-first node indices) in the cache; drop the other tree rows."""
        P = self.cache_len - tree.size
        n_drop = tree.size - len(path)
        if path != list(range(len(path))):
            # Tail-only compaction: move the accepted rows down to P, P+1, ... (advanced indexing on
            # the right copies first, so overlapping source/destination is safe).
            src = torch.tensor(path, device=self.device) + P
            for layer in self.cache.layers:
                layer.keys[..., P:P + len(path), :] = layer.keys[..., src, :]
                layer.values[..., P:P + len(path), :] = layer.values[..., src, :]
        if n_drop:
            self.cache.crop(-n_drop)
