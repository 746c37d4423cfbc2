"""Drafters: who drafts for the draft-model methods (conf/drafter/, ``drafter=<key>``), never the method.

    base.py          Drafter (the draft KV cache that follows the committed sequence), HFDrafter (a second
                     causal LM), EarlyExitDrafter (the target's first layers + an optional head)
    eagle.py         EagleDrafter: an EAGLE head over the target's features
    medusa.py        MedusaDrafter / HydraDrafter: Medusa-1 and Hydra heads over the target's features (+ loaders)
    heads.py         the trainable heads (Kangaroo adapter, EAGLE layer) and their checkpoint format
    released.py      the released EAGLE-1/2 heads and Kangaroo adapter, loaded strictly in their own key layout
    tree_builder.py  the dynamic trees' shared pool, selection and auto budget
    vocab.py         FR-Spec's frequency-ranked draft vocabulary (``drafter.vocab: top-<k>``): the LM head cut to
                     the k most frequent tokens, -inf elsewhere

``build_drafter`` turns a ``conf/drafter`` config into a drafter around the target; ``require_drafter`` is
the one clear error a draft-model method gives without one.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from specdec.drafters.base import Drafter, EarlyExitDrafter, HFDrafter
from specdec.drafters.vocab import KINDS as VOCAB_KINDS, draft_vocabulary, parse_vocab
from specdec.errors import UserError

__all__ = ["Drafter", "EarlyExitDrafter", "HFDrafter", "build_drafter", "require_drafter"]


def build_drafter(cfg: Optional[dict], model, tokenizer, vocab_size: int, cache_dir=None,
                  token_counts: Optional[Callable[[], np.ndarray]] = None) -> Optional[Drafter]:
    """The drafter named by ``cfg['kind']``, around the target ``model``, drafting over the vocabulary of
    ``cfg['vocab']`` (``full`` | ``top-<k>``: FR-Spec, specdec/drafters/vocab.py; ``token_counts()`` gives the
    corpus token counts it ranks by, read only for ``top-<k>``)."""
    cfg = cfg or {}
    kind = cfg.get("kind", "none")
    keep = parse_vocab(cfg.get("vocab"))
    if keep is not None and kind not in VOCAB_KINDS:
        raise UserError(f"drafter.vocab=top-{keep} cuts the LM head of drafters {', '.join(VOCAB_KINDS)}; "
                        f"drafter kind {kind!r} must keep drafter.vocab=full")
    drafter = _build(kind, cfg, model, tokenizer, vocab_size, cache_dir)
    if keep is not None:
        drafter.restrict_vocab(draft_vocabulary(keep, model, tokenizer, vocab_size, token_counts))
    return drafter


def _build(kind: str, cfg: dict, model, tokenizer, vocab_size: int, cache_dir) -> Optional[Drafter]:
    if kind == "none":
        return None
    if kind == "early_exit":
        head = None
        if cfg.get("release"):  # a released Kangaroo adapter (specdec/drafters/released.py)
            from specdec.drafters.released import load_released_kangaroo

            if cfg.get("exit_layer") is None:
                raise UserError("drafter.release (a released Kangaroo adapter) needs drafter.exit_layer: the "
                                "checkpoint does not record it (the Vicuna-7B release was trained at layer 2)")
            head = load_released_kangaroo(str(cfg["release"]), model, int(cfg["exit_layer"]))
        elif cfg.get("adapter"):
            from specdec.drafters.heads import load_head

            head = load_head(cfg["adapter"], model)
            if cfg.get("exit_layer") not in (None, head.exit_layer):
                raise UserError(f"drafter exit_layer={cfg['exit_layer']} but adapter {cfg['adapter']} was trained "
                                f"for exit layer {head.exit_layer}")
        exit_layer = head.exit_layer if head is not None else cfg.get("exit_layer")
        if exit_layer is None:
            raise UserError("drafter=early_exit needs exit_layer (or an adapter that names one)")
        return EarlyExitDrafter(model, int(exit_layer), vocab_size, head)
    if kind == "hf":
        from specdec.models import load_model

        if not cfg.get("path"):
            raise UserError("drafter=hf needs drafter.path=<hub id or local dir>")
        draft_model, draft_tok = load_model(cfg["path"], model.device, model.dtype, "sdpa", cache_dir,
                                            setting="drafter.path")
        if draft_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"drafter {cfg['path']!r} does not share the target's tokenizer (vocabularies differ: "
                            f"{len(draft_tok)} vs {len(tokenizer)} tokens); pick a drafter of the same family")
        return HFDrafter(draft_model, vocab_size)
    if kind == "eagle":  # an EAGLE head on the target's features (specdec/drafters/eagle.py)
        from specdec.drafters.eagle import build_eagle_drafter

        return build_eagle_drafter(cfg, model, vocab_size)
    if kind in ("medusa", "hydra"):  # Medusa-1 / Hydra heads on the target's features (specdec/drafters/medusa.py)
        from specdec.drafters.medusa import build_head_drafter

        return build_head_drafter(kind, cfg, model, vocab_size)
    raise UserError(f"unknown drafter kind {kind!r}; use none, hf, early_exit, eagle, medusa or hydra")


def require_drafter(env, method: str) -> Drafter:
    """The drafter from ``env`` or one clear error naming the config to add."""
    if getattr(env, "drafter", None) is None:
        raise UserError(f"method {method!r} drafts with a draft model and this model names none (conf/model/<model>.yaml "
                        f"drafters.draft_model): add drafter=early_exit (self-draft from the target's first layers) or "
                        f"drafter=hf drafter.path=<model sharing the tokenizer>")
    return env.drafter
