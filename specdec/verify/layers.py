"""Partial-depth forwards of a decoder-only Hugging Face model: embed -> layers [a, b) -> norm -> LM head.

Early-exit drafting (Kangaroo, arXiv 2404.18911; the ``early_exit`` drafter) runs the target's first ℓ
layers on their own KV cache, and Kangaroo's verifier resumes from layer ℓ. Both need the body of
``LlamaModel.forward`` split at a layer boundary. ``LayerRunner`` calls the model's own modules in
turn (no forked modeling code); it works for every model whose forward is exactly "embed, rotary,
layers, norm" (Llama, Qwen2, Mistral, SmolLM2, ...). At construction a 4-token probe checks that the
split run reproduces the model's own logits, so a model that does more between layers (e.g. Gemma's
embedding scale, per-layer-type rotary) fails with one clear line instead of drafting garbage.

Masks are additive floats in the model dtype (docs/verifier.md §3): 0 where a query may attend,
``finfo.min`` elsewhere; ``attention_mask`` is the one place that builds them (``Target`` uses it too).
Sliding-window layers are not modelled: the mask is full-context, as the target's tree path.

Usage::

    runner = LayerRunner(model)
    hidden = runner.run(runner.embed(ids), 0, 4, positions, mask, cache)   # [1, T, H] after layer 4
    logits = runner.logits(runner.norm(hidden))                           # [T, V] float32
"""

from __future__ import annotations

from typing import Optional

import torch

from specdec.errors import UserError


def attention_mask(ancestors: torch.Tensor, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, T, P + N]`` for T new query rows: the P prefix columns are visible; of the
    N tree columns after them, row i sees column j iff ``ancestors[i, j]`` (bool [T, N]; N = T for a
    whole tree, N > T when earlier tree rows are already cached). A chain's ancestors are ``tril``."""
    T, N = ancestors.shape
    mask = torch.zeros(T, prefix_len + N, dtype=dtype, device=ancestors.device)
    mask[:, prefix_len:].masked_fill_(~ancestors, torch.finfo(dtype).min)
    return mask[None, None]


def causal_ancestors(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [n, n]: the ancestor matrix of a chain (lower triangle)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def keep_rows(cache, start: int, rows: list[int]) -> None:
    """Compact every initialised layer of ``cache`` to ``[:start] + rows`` (rows are absolute indices
    >= start, ascending). Tail-only: only the rows after ``start`` move."""
    n = len(rows)
    if rows != list(range(start, start + n)):
        src = torch.tensor(rows, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys[..., start:start + n, :] = layer.keys[..., src, :]
                layer.values[..., start:start + n, :] = layer.values[..., src, :]
    drop = cache.get_seq_length() - start - n
    if drop:
        cache.crop(-drop)


class LayerRunner:
    """The model's own embedding, rotary embedding, decoder layers, final norm and LM head, callable
    separately. Decoder layer i reads and writes layer i of whatever cache is passed."""

    def __init__(self, model, check: bool = True):
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
        missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, name)]
        if base is None or missing:
            raise UserError(f"{type(model).__name__} has no decoder with {missing or 'embed/layers/norm/rotary'}: "
                            f"partial-depth forwards (early exit) support Llama-style decoder-only models only")
        self.model = model
        self.base = base
        self.layers = base.layers
        self.num_layers = len(base.layers)
        self.lm_head = model.get_output_embeddings()
        self.dtype = model.dtype
        self.device = model.device
        if check:
            self._check()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 [1, T] -> hidden states [1, T, H]."""
        return self.base.embed_tokens(input_ids)

    def run(self, hidden: torch.Tensor, start: int, stop: int, position_ids: torch.Tensor,
            mask: Optional[torch.Tensor], cache) -> torch.Tensor:
        """Decoder layers ``[start, stop)`` on hidden [1, T, H] at position_ids [1, T]; mask is the additive
        [1, 1, T, P + T] mask (None: causal after the P cached entries of layer ``start``)."""
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) outside the model's {self.num_layers} layers")
        T = hidden.shape[1]
        if mask is None and T > 1:  # torch's is_causal aligns top-left, wrong after a prefix: be explicit
            prefix = cache.get_seq_length(start) if cache is not None and len(cache.layers) > start else 0
            mask = attention_mask(causal_ancestors(T, hidden.device), prefix, hidden.dtype)
        rotary = self.base.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                           use_cache=cache is not None, position_embeddings=rotary)
        return hidden

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm: [1, T, H] -> [1, T, H]."""
        return self.base.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on already-normed hidden [1, T, H] -> float32 logits [T, V]."""
        return self.lm_head(hidden)[0].float()

    @torch.inference_mode()
    def _check(self) -> None:
        """The split forward must equal the model's own (catches forwards doing extra work)."""
        ids = torch.tensor([[1, 2, 3, 4]], device=self.device) % self.lm_head.weight.shape[0]
        pos = torch.arange(4, device=self.device)[None]
        try:
            ours = self.logits(self.norm(self.run(self.embed(ids), 0, self.num_layers, pos, None, None)))
        except Exception as err:  # noqa: BLE001 - any failure means the layers cannot be called in turn
            raise UserError(f"{type(self.model).__name__}: its decoder layers cannot be run in turn "
                            f"({type(err).__name__}: {err}); early exit is unsupported for it") from None
        ref = self.model(input_ids=ids).logits[0].float()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        if not torch.allclose(ours, ref, atol=tol * max(1.0, float(ref.abs().max())), rtol=0):
            raise UserError(f"{type(self.model).__name__}: running its layers in turn does not reproduce its "
                            f"forward (it does extra work between layers); early exit is unsupported for it")
