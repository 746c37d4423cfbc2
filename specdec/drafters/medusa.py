"""Medusa-1 and Hydra heads: drafters that guess several tokens ahead from the target's last hidden state.

Sources (read, restated, never copied; docs/medusa_hydra.md has the full account):

* Medusa-1 -- Cai et al., ICML 2024, arXiv 2401.10774; ``FasterDecoding/Medusa`` @ ``e2a5d20``
  (``medusa/model/medusa_model.py``: ``ResBlock``, ``MedusaModelABC``) and the initial release ``ab5d60c``
  (``medusa/model/medusa_model.py``, ``medusa/train/train.py``: the layout of ``medusa_lm_head.pt``).
* Hydra / Hydra++ -- Ankner et al., COLM 2024, arXiv 2402.05109; ``zankner/Hydra`` @ ``3f39fbd``
  (``hydra/model/hydra_heads/prefix_mlp_head.py``: ``HydraPrefixMLP``, ``mlp_head.py``: ``HydraMLP``;
  ``hydra/model/hydra_model.py``: ``HydraConfig``). Spec-Bench's Hydra row loads ``ankner/hydra-vicuna-7b-v1.3``,
  the ``prefix-mlp`` build.

``MedusaHeads`` (K heads, each sequentially *independent*): head k maps the target's post-norm last hidden
state h_t through ``num_layers`` residual blocks ``x + SiLU(W x + b)`` (W zero-initialised; the release builds
the blocks by list repetition, so a head applies ONE block ``num_layers`` times) and a vocabulary projection
(no bias) -- its own, initialised from the target's LM head (as released), or the target's own LM head
(``share_lm_head``: this project's knob, so SmolLM2's heads fit the 10 MB a committed head may take; the
release's later ``medusa_model_legacy.py`` also reads the base model's ``lm_head``). Head k guesses token t+2+k.

``HydraHeads`` (K heads, each sequentially *dependent*): head i reads ``[z_t, E(y_1), ..., E(y_{i+1})]`` -- z_t a
summary of the committed prefix, E the target's frozen input embedding, y_1 the root (the token the target
committed last), y_2.. the draft tokens on the path -- and guesses y_{i+2}. ``arch``:

* ``prefix-mlp`` (Hydra++, as released): z_t = one extra decoder layer (the target's own decoder class) + its
  own RMSNorm, run causally over the target's last hidden states of the committed tokens, with its own
  append-only KV cache.
* ``mlp`` (the plain grounded Hydra heads of ``HydraMLP``): z_t = h_t.

Head i: one block ``res(x) + SiLU(W x + b)`` of width (i+2)d -> d (``res`` a Linear with bias), then
``num_layers - 1`` applications of ONE d x d residual block (tied by the release's list repetition), then a
vocabulary projection WITH bias (own, or the target's weight + an own bias under ``share_lm_head``).
Dropout (Hydra++ trains with 0.2) precedes every block and the projection, in training only.

Drafters (``begin`` / ``follow`` / ``expand`` as every drafter, specdec/drafters/base.py; both read the
target's features through ``Context.hidden``, ``wants_hidden``):

* ``MedusaDrafter.follow`` runs all K heads once on the feature of the last committed position and keeps
  ``depth_logits`` [K, V]; a node's children at depth d come from head d, whatever the node's token.
* ``HydraDrafter.follow`` feeds the newly committed features through the prefix layer and returns head 0's
  logits for the root's children; ``expand`` appends nodes, each carrying its parent's input + E(its token),
  and runs head ``depth`` on them (one call per depth present).

Checkpoints: trained here -> ``specdec.drafters.heads.save_head`` (``.safetensors`` + ``.json`` with the
head's own keys from ``meta()``), read back by ``load_trained_heads``. Released -> ``load_released_medusa``
(``FasterDecoding/medusa-vicuna-*-v1.3``: ``{h}.{j}.linear.{weight,bias}``, ``{h}.{L}.weight``) and
``load_released_hydra`` (``ankner/hydra-vicuna-*-v1.3``), both strict on every kept key.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from specdec.drafters.base import Drafter
from specdec.drafters.heads import _decoder, _head_config, head_files
from specdec.drafters.vocab import ReducedHead
from specdec.errors import UserError
from specdec.verify.layers import attention_mask, causal_ancestors

log = logging.getLogger(__name__)

HYDRA_ARCHS = ("prefix-mlp", "mlp")
DIM_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")


# ---------------------------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """``x + SiLU(linear(x))`` with ``linear`` d -> d (bias) zero-initialised in its weight (both releases)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class GroundedBlock(nn.Module):
    """Hydra's first block of head i: ``res_connection(x) + SiLU(linear(x))``, both (i+2)d -> d with bias."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(width, hidden)
        nn.init.zeros_(self.linear.weight)
        self.res_connection = nn.Linear(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_connection(x) + nn.functional.silu(self.linear(x))


def _check_counts(num_heads: int, num_layers: int) -> None:
    if int(num_heads) < 1 or int(num_layers) < 1:
        raise UserError(f"draft heads need num_heads >= 1 and num_layers >= 1, got {num_heads} and {num_layers}")


# ---------------------------------------------------------------------------------------------- Medusa
class MedusaHeads(nn.Module):
    """Medusa-1's K heads (module docstring). ``forward(hidden [..., d]) -> logits [K, ..., V]``."""

    kind = "medusa"

    def __init__(self, model, num_heads: int = 4, num_layers: int = 1, share_lm_head: bool = False):
        super().__init__()
        _check_counts(num_heads, num_layers)
        self.exit_layer = None  # heads read the last layer's (post-norm) features
        self.config = _head_config(model)
        self.num_heads, self.num_layers, self.share_lm_head = int(num_heads), int(num_layers), bool(share_lm_head)
        target_head = model.get_output_embeddings()
        d, V = target_head.weight.shape[1], target_head.weight.shape[0]
        self.blocks = nn.ModuleList(ResBlock(d) for _ in range(self.num_heads))
        self._shared = (target_head,)  # a tuple: the target's frozen LM head is not a submodule (never saved)
        if not self.share_lm_head:
            self.lm_heads = nn.ModuleList(nn.Linear(d, V, bias=False) for _ in range(self.num_heads))
            with torch.no_grad():
                for proj in self.lm_heads:
                    proj.weight.copy_(target_head.weight)  # as released: every projection starts as the target's
        self.to(device=target_head.weight.device, dtype=target_head.weight.dtype)

    @classmethod
    def from_meta(cls, model, meta: dict) -> "MedusaHeads":
        return cls(model, meta["num_heads"], meta["num_layers"], meta["share_lm_head"])

    def meta(self) -> dict:
        return {"num_heads": self.num_heads, "num_layers": self.num_layers, "share_lm_head": self.share_lm_head}

    def head_hidden(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k's blocks on features ``[..., d]`` (one block applied num_layers times: the tied repetition)."""
        x = hidden
        for _ in range(self.num_layers):
            x = self.blocks[k](x)
        return x

    def head_logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k on features ``[..., d]`` -> logits ``[..., V]`` (guessing the token k+2 after the feature's)."""
        return (self._shared[0] if self.share_lm_head else self.lm_heads[k])(self.head_hidden(k, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.share_lm_head:  # one pass over the shared projection for all heads (a 1-row product is memory-bound)
            return self._shared[0](torch.stack([self.head_hidden(k, hidden) for k in range(self.num_heads)]))
        return torch.stack([self.head_logits(k, hidden) for k in range(self.num_heads)])


# ---------------------------------------------------------------------------------------------- Hydra
class HydraHeads(nn.Module):
    """Hydra's K sequentially dependent heads, ``arch`` prefix-mlp (Hydra++) or mlp (module docstring)."""

    kind = "hydra"

    def __init__(self, model, num_heads: int = 4, num_layers: int = 4, arch: str = "prefix-mlp",
                 share_lm_head: bool = False, dropout: float = 0.0):
        super().__init__()
        _check_counts(num_heads, num_layers)
        if arch not in HYDRA_ARCHS:
            raise UserError(f"Hydra head arch {arch!r} is not implemented; use one of {', '.join(HYDRA_ARCHS)}")
        inner = _decoder(model)
        self.exit_layer = None
        self.config = _head_config(model)
        self.num_heads, self.num_layers, self.arch = int(num_heads), int(num_layers), arch
        self.share_lm_head, self.dropout = bool(share_lm_head), float(dropout)
        target_head = model.get_output_embeddings()
        d, V = target_head.weight.shape[1], target_head.weight.shape[0]
        if arch == "prefix-mlp":  # one decoder layer of the target's class + its own final norm (a 1-layer LlamaModel)
            self.prefix_layer = type(inner.layers[0])(self.config, layer_idx=0)
            self.prefix_norm = type(inner.norm)(d, eps=self.config.rms_norm_eps)
            self.rotary = type(inner.rotary_emb)(config=self.config)  # inv_freq: a non-persistent buffer
        self.first = nn.ModuleList(GroundedBlock((i + 2) * d, d) for i in range(self.num_heads))
        if self.num_layers > 1:
            self.deep = nn.ModuleList(ResBlock(d) for _ in range(self.num_heads))
        self._shared = (target_head, inner.embed_tokens)  # frozen target modules, not submodules (never saved)
        if share_lm_head:
            bound = 1 / math.sqrt(d)  # the init nn.Linear gives the released projection's bias
            self.lm_bias = nn.ParameterList(nn.Parameter(torch.empty(V).uniform_(-bound, bound))
                                            for _ in range(self.num_heads))
        else:
            self.lm_heads = nn.ModuleList(nn.Linear(d, V) for _ in range(self.num_heads))
            with torch.no_grad():
                for proj in self.lm_heads:
                    proj.weight.copy_(target_head.weight)  # as released (lm_head_init_weight)
        self.to(device=target_head.weight.device, dtype=target_head.weight.dtype)

    @classmethod
    def from_meta(cls, model, meta: dict) -> "HydraHeads":
        return cls(model, meta["num_heads"], meta["num_layers"], meta["arch"], meta["share_lm_head"])

    def meta(self) -> dict:
        return {"num_heads": self.num_heads, "num_layers": self.num_layers, "arch": self.arch,
                "share_lm_head": self.share_lm_head}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's frozen input embedding of ``ids``."""
        with torch.no_grad():
            return self._shared[1](ids)

    def prefix_states(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
        """z for target features ``[1, n, d]`` at ``position_ids`` [1, n] (``mask``/``cache``: None = a causal run
        from an empty cache); the features themselves under ``arch=mlp``."""
        if self.arch == "mlp":
            return hidden
        out = self.prefix_layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                                position_embeddings=self.rotary(hidden, position_ids))
        return self.prefix_norm(out[0] if isinstance(out, tuple) else out)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout else x

    def head_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Head i on inputs ``[..., (i+2)d]`` = [z, E(y_1), ..., E(y_{i+1})] -> logits ``[..., V]`` for y_{i+2}."""
        if x.shape[-1] != (i + 2) * self.config.hidden_size:
            raise ValueError(f"Hydra head {i} takes {(i + 2)} x hidden_size inputs, got width {x.shape[-1]}")
        h = self.first[i](self._drop(x))
        for _ in range(self.num_layers - 1):  # one d x d block applied num_layers - 1 times (tied, as released)
            h = self.deep[i](self._drop(h))
        h = self._drop(h)
        if self.share_lm_head:
            return self._shared[0](h) + self.lm_bias[i]
        return self.lm_heads[i](h)


# ---------------------------------------------------------------------------------------------- drafters
class _FeatureDrafter(Drafter):
    """Shared bookkeeping of the head drafters: node depths of the current draft tree; no draft KV cache of
    the base kind (the heads read the target's features, Hydra's prefix layer keeps its own cache)."""

    wants_hidden = True

    def __init__(self, model, heads: nn.Module, vocab_size: int):
        self.heads = heads
        super().__init__(vocab_size, model.device, model.dtype)

    @property
    def num_heads(self) -> int:
        return self.heads.num_heads

    def _new_caches(self) -> list:
        return []

    def _forward(self, ids, positions, mask, last_only=False):
        raise RuntimeError(f"drafter {self.kind!r} drafts from the target's features: use follow/expand")

    def _reset(self) -> None:
        super()._reset()
        self.node_depth: list[int] = []

    def begin(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> None:
        self._reset()

    def restrict_vocab(self, ids: torch.Tensor) -> None:
        """Draft only tokens ``ids`` (FR-Spec, specdec/drafters/vocab.py): every head's vocabulary projection --
        the shared target LM head or each head's own (bias kept) -- is cut to those rows, in place (the drafter
        owns its heads; the target's own LM head is never touched)."""
        heads = self.heads
        if heads.share_lm_head:
            heads._shared = (ReducedHead(heads._shared[0], ids),) + tuple(heads._shared[1:])
        else:
            heads.lm_heads = nn.ModuleList(ReducedHead(proj, ids) for proj in heads.lm_heads)

    @staticmethod
    def _features(tokens: Sequence[int], hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is None or hidden.shape[0] != len(tokens) - 1:
            raise RuntimeError("head drafters need the target's features of tokens[:-1] (Context.hidden)")
        if len(tokens) < 2:
            raise UserError("Medusa/Hydra heads need at least 2 committed tokens (they read the feature before the "
                            "root)")
        return hidden

    def _new_depths(self, parents: Sequence[int]) -> list[int]:
        depths = []
        for i, parent in enumerate(parents):
            if not 0 <= parent < len(self.node_depth) + i:
                raise ValueError(f"new node {len(self.node_depth) + i} has parent {parent}: not an earlier node")
            depths.append((self.node_depth + depths)[parent] + 1)
        for depth in depths:
            if depth >= self.num_heads:
                raise UserError(f"drafter={self.kind} has {self.num_heads} heads: it drafts at most {self.num_heads} "
                                f"tokens after the root; use a shallower tree")
        return depths


class MedusaDrafter(_FeatureDrafter):
    kind = "medusa"

    @torch.inference_mode()
    def follow(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """All K heads on the last committed position's feature; keeps ``depth_logits`` float32 [K, V] and
        returns head 0's row (the root's children)."""
        feature = self._features(tokens, hidden)[-1:]
        self.forwards += 1
        self.depth_logits = self._logits(self.heads(feature.to(self.dtype))[:, 0])      # [K, V]
        self.tree_tokens, self.tree_parents, self.node_depth = [int(tokens[-1])], [-1], [0]
        return self.depth_logits[0]

    def top_tokens(self, k: int) -> torch.Tensor:
        """int64 [K, k]: each head's k best tokens, best first (the released ``generate_candidates`` top-k)."""
        return torch.topk(self.depth_logits, k, dim=-1).indices

    @torch.inference_mode()
    def expand(self, tokens: Sequence[int], parents: Sequence[int], want_logits: bool = True):
        """Children logits of new nodes: head ``depth`` of each, whatever its token (sequentially independent)."""
        depths = self._new_depths(parents)
        self.node_depth += depths
        self.tree_tokens += list(map(int, tokens))
        self.tree_parents += list(map(int, parents))
        return self.depth_logits[torch.tensor(depths)] if want_logits else None


class HydraDrafter(_FeatureDrafter):
    kind = "hydra"

    def _reset(self) -> None:
        super()._reset()
        self.prefix_cache = DynamicCache()
        self.rows = 0                              # committed features fed through the prefix layer
        self.z = None                              # its output at the last of them
        self.node_inputs: list[torch.Tensor] = []  # [(depth+2) d] head input of every draft-tree node

    @torch.inference_mode()
    def follow(self, tokens: Sequence[int], hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Feed features ``rows .. len(tokens) - 2`` through the prefix layer (append-only: only committed
        positions ever enter its cache), then head 0 on [z, E(root)]. Returns float32 [V]."""
        hidden = self._features(tokens, hidden)
        L = len(tokens)
        if self.rows > L - 1:
            raise RuntimeError("HydraDrafter.follow: the committed sequence shrank; call begin() for a new generation")
        new = hidden[self.rows:].to(self.dtype)[None]                                       # [1, n, d]
        if self.heads.arch == "mlp":
            self.z = hidden[-1].to(self.dtype)
        elif new.shape[1]:  # (none when follow is called again on the same committed sequence: z is kept)
            positions = torch.arange(self.rows, L - 1, device=self.device)[None]
            mask = None if new.shape[1] == 1 else attention_mask(causal_ancestors(new.shape[1], self.device),
                                                                 self.rows, self.dtype)
            self.z = self.heads.prefix_states(new, positions, mask, self.prefix_cache)[0, -1]
        self.rows = L - 1
        root = torch.tensor([int(tokens[-1])], device=self.device)
        self.node_inputs = [torch.cat([self.z, self.heads.embed(root)[0].to(self.dtype)])]
        self.tree_tokens, self.tree_parents, self.node_depth = [int(tokens[-1])], [-1], [0]
        self.forwards += 1
        return self._logits(self.heads.head_logits(0, self.node_inputs[0][None]))[0]

    @torch.inference_mode()
    def expand(self, tokens: Sequence[int], parents: Sequence[int], want_logits: bool = True):
        """Append nodes (input = parent's input + E(token)); head ``depth`` on each. Returns float32 [n, V]."""
        depths = self._new_depths(parents)
        embedded = self.heads.embed(torch.tensor(list(map(int, tokens)), device=self.device)).to(self.dtype)
        for i, parent in enumerate(parents):
            self.node_inputs.append(torch.cat([self.node_inputs[parent], embedded[i]]))
        n_old = len(self.node_depth)
        self.node_depth += depths
        self.tree_tokens += list(map(int, tokens))
        self.tree_parents += list(map(int, parents))
        if not want_logits:
            return None
        out = torch.empty(len(depths), self.vocab_size, device=self.device)
        for depth in sorted(set(depths)):  # one head call per depth present
            rows = [i for i, d in enumerate(depths) if d == depth]
            inputs = torch.stack([self.node_inputs[n_old + i] for i in rows])
            self.forwards += 1
            out[rows] = self._logits(self.heads.head_logits(depth, inputs))
        return out


# ---------------------------------------------------------------------------------------------- checkpoints
HEAD_CLASSES = {"medusa": MedusaHeads, "hydra": HydraHeads}
DRAFTER_CLASSES = {"medusa": MedusaDrafter, "hydra": HydraDrafter}


def _check_dims(meta: dict, model, name: str) -> None:
    for key in DIM_KEYS:
        if meta.get(key) != getattr(model.config, key):
            raise UserError(f"draft heads {name} were trained for {meta.get('target', '?')} ({key}={meta.get(key)}), "
                            f"not for this model ({key}={getattr(model.config, key)})")


def load_trained_heads(path: str | Path, model, kind: str | None = None) -> nn.Module:
    """Heads saved by ``specdec.drafters.heads.save_head`` (trained here), rebuilt around ``model``; strict."""
    from safetensors.torch import load_file

    weights, meta_file, meta = head_files(path, f"make train-{kind or 'medusa'}")
    if meta.get("kind") not in HEAD_CLASSES or (kind and meta["kind"] != kind):
        raise UserError(f"{meta_file.name} holds a {meta.get('kind')!r} head, not {kind or 'medusa/hydra'} heads")
    _check_dims(meta, model, weights.name)
    try:
        heads = HEAD_CLASSES[meta["kind"]].from_meta(model, meta)
    except KeyError as key:
        raise UserError(f"{meta_file.name} lacks the heads' shape key {key} (num_heads, num_layers, ...)") from None
    state = {k: v.to(model.dtype) for k, v in load_file(str(weights), device=str(model.device)).items()}
    _load_strict(heads, state, weights.name)
    return heads.eval().requires_grad_(False)


def _load_strict(module: nn.Module, state: dict, name: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{name} does not match the heads: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                        f"wrong shape {wrong[:4]}")
    module.load_state_dict(state, strict=True)


def _released_files(source: str, weights: Sequence[str]) -> tuple[dict, dict, str]:
    """(config dict, state dict, weights file name) of a released head repo: a local directory or a hub id
    (``specdec.drafters.released``: the local hub cache, or downloaded when the hub is reachable; else one line)."""
    from specdec.drafters.released import read_release, release_dir

    directory = release_dir(source, weights=weights)
    config, state = read_release(directory, source, names=weights)
    return config, state, next(w for w in weights if (directory / w).is_file())


def _tied(state: dict, keys: list[str], name: str) -> torch.Tensor:
    """The one tensor behind ``keys`` (the release's list-repeated block saves it under every index)."""
    first = state[keys[0]]
    if any(not torch.equal(state[k], first) for k in keys[1:]):
        raise UserError(f"{name}: {keys} should be one tied block (the release's list repetition) but differ")
    return first


def _expect(state: dict, key: str, shape: tuple, name: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{name} lacks {key!r}: not the released head layout")
    if tuple(state[key].shape) != shape:
        raise UserError(f"{name}: {key} has shape {tuple(state[key].shape)}, expected {shape} for this target")
    return state[key]


def load_released_medusa(source: str, model, num_heads: int = 4) -> MedusaHeads:
    """Released Medusa-1 heads (``FasterDecoding/medusa-vicuna-7b-v1.3`` layout: ``config.json`` +
    ``medusa_lm_head.pt``, a ``ModuleList`` state dict ``{h}.{j}.linear.{weight,bias}`` for j < L and
    ``{h}.{L}.weight``). The head count comes from the keys, not the config (the 7B config says 2 for a file of
    5 heads); the first ``num_heads`` are kept (Spec-Bench hard-codes 4) and the rest is logged as dropped.
    Every kept key must be present with the target's shapes, and nothing else may be in the file."""
    config, state, name = _released_files(source, ["medusa_lm_head.pt", "medusa_lm_head.safetensors"])
    L = int(config.get("medusa_num_layers", 1))
    d, V = model.config.hidden_size, model.get_output_embeddings().weight.shape[0]
    pattern = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
    in_file = sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})
    strays = [k for k in state if not pattern.match(k)]
    if strays or in_file != list(range(len(in_file))):
        raise UserError(f"{name} is not a Medusa head state dict (keys {strays[:3] or in_file})")
    if not 1 <= num_heads <= len(in_file):
        raise UserError(f"{name} holds {len(in_file)} heads; asked for num_heads={num_heads}")
    heads = MedusaHeads(model, num_heads, L, share_lm_head=False)
    mine = {}
    for h in range(len(in_file)):
        blocks = [f"{h}.{j}.linear" for j in range(L)]
        for block in blocks:
            _expect(state, f"{block}.weight", (d, d), name)
            _expect(state, f"{block}.bias", (d,), name)
        weight = _tied(state, [f"{b}.weight" for b in blocks], name)
        bias = _tied(state, [f"{b}.bias" for b in blocks], name)
        proj = _expect(state, f"{h}.{L}.weight", (V, d), name)
        extra = [k for k in state if k.startswith(f"{h}.") and k not in {f"{h}.{L}.weight"} |
                 {f"{b}.{p}" for b in blocks for p in ("weight", "bias")}]
        if extra:
            raise UserError(f"{name}: unexpected keys {extra[:3]} for medusa_num_layers={L}")
        if h < num_heads:
            mine.update({f"blocks.{h}.linear.weight": weight, f"blocks.{h}.linear.bias": bias,
                         f"lm_heads.{h}.weight": proj})
    if len(in_file) > num_heads:
        log.info("released Medusa heads %s: kept heads 0..%d of %d (dropped %s)", source, num_heads - 1,
                 len(in_file), list(range(num_heads, len(in_file))))
    _load_strict(heads, {k: v.to(model.dtype) for k, v in mine.items()}, name)
    return heads.eval().requires_grad_(False)


def _hydra_keys(arch: str, i: int, L: int) -> tuple[str, list[str], str]:
    """Released key prefixes of head i: first block, the tied deep block's indices, the projection."""
    if arch == "prefix-mlp":  # Sequential(Dropout, block, [Dropout, block] * (L - 1)); Sequential(Dropout, Linear)
        return f"hydra_mlp.{i}.1", [f"hydra_mlp.{i}.{2 * j + 1}" for j in range(1, L)], f"hydra_lm_head.{i}.1"
    return f"hydra_mlp.{i}.0", [f"hydra_mlp.{i}.{j}" for j in range(1, L)], f"hydra_lm_head.{i}"


PREFIX_SKIPPED = ("prefix_embeding_layer.embed_tokens.weight", "input_embed_fn.weight")  # the target's embedding


def _check_embedding_copy(embedding: torch.Tensor | None, model, name: str) -> None:
    """The release saves a copy of the (frozen) target embedding: it must be this target's, else the heads were
    trained on another base model."""
    if embedding is None:
        return
    own = model.get_input_embeddings().weight.detach()
    if embedding.shape != own.shape or not torch.allclose(embedding.float().cpu(), own.float().cpu(), rtol=1e-2,
                                                          atol=1e-3):
        raise UserError(f"{name} was trained on another base model: its copy of the input embedding "
                        f"({tuple(embedding.shape)}) is not this target's ({tuple(own.shape)})")


def load_released_hydra(source: str, model) -> HydraHeads:
    """Released Hydra heads (``ankner/hydra-vicuna-7b-v1.3`` layout: ``config.json`` with ``hydra_num_heads``,
    ``hydra_num_layers``, ``hydra_head_arch``, ``grounded_heads``, ``hidden_state_offset``; ``hydra_lm_head.pt``,
    a ``HydraPrefixMLP`` / ``HydraMLP`` state dict). Skipped: the prefix layer's unused ``embed_tokens``, the copy
    of the target embedding (``input_embed_fn``: checked equal to the target's) and the rotary ``inv_freq``
    buffer; the tied deep block's indices must hold equal tensors; every other key must match."""
    config, raw, name = _released_files(source, ["hydra_lm_head.pt", "hydra_lm_head.safetensors"])
    arch = config.get("hydra_head_arch", "mlp")
    if arch not in HYDRA_ARCHS or not config.get("grounded_heads", False) or config.get("hidden_state_offset", 0):
        raise UserError(f"released Hydra heads {source!r}: only grounded {' / '.join(HYDRA_ARCHS)} heads on the last "
                        f"layer are implemented (config: arch={arch!r}, grounded_heads={config.get('grounded_heads')}, "
                        f"hidden_state_offset={config.get('hidden_state_offset')})")
    K, L = int(config["hydra_num_heads"]), int(config["hydra_num_layers"])
    _check_embedding_copy(raw.get("input_embed_fn.weight"), model, name)
    state = {k: v for k, v in raw.items() if k not in PREFIX_SKIPPED and not k.endswith("inv_freq")}
    heads = HydraHeads(model, K, L, arch, share_lm_head=False)
    own = heads.state_dict()
    mine, used = {}, set()
    for key in list(state):
        if key.startswith("prefix_embeding_layer.layers.0."):
            mine["prefix_layer." + key.removeprefix("prefix_embeding_layer.layers.0.")] = state[key]
            used.add(key)
        elif key == "prefix_embeding_layer.norm.weight":
            mine["prefix_norm.weight"] = state[key]
            used.add(key)
    for i in range(K):
        first, deep, proj = _hydra_keys(arch, i, L)
        for part in ("linear.weight", "linear.bias", "res_connection.weight", "res_connection.bias"):
            mine[f"first.{i}.{part}"] = _expect(state, f"{first}.{part}", tuple(own[f"first.{i}.{part}"].shape),
                                                name)
            used.add(f"{first}.{part}")
        for part in ("weight", "bias") if deep else ():
            keys = [f"{b}.linear.{part}" for b in deep]
            for key in keys:
                _expect(state, key, tuple(own[f"deep.{i}.linear.{part}"].shape), name)
            mine[f"deep.{i}.linear.{part}"] = _tied(state, keys, name)
            used.update(keys)
        for part in ("weight", "bias"):
            mine[f"lm_heads.{i}.{part}"] = _expect(state, f"{proj}.{part}", tuple(own[f"lm_heads.{i}.{part}"].shape),
                                                   name)
            used.add(f"{proj}.{part}")
    left = sorted(set(state) - used)
    if left:
        raise UserError(f"{name}: unexpected keys {left[:4]} for {K} {arch} heads of {L} layers")
    _load_strict(heads, {k: v.to(model.dtype) for k, v in mine.items()}, name)
    return heads.eval().requires_grad_(False)


def build_head_drafter(kind: str, cfg: dict, model, vocab_size: int) -> Drafter:
    """``conf/drafter/medusa.yaml`` / ``hydra.yaml``: ``release`` (a hub id or directory in the released layout)
    if set, else ``head`` (heads trained here, ``save_head`` format), around ``model``."""
    release = cfg.get("release")
    if release:
        heads = (load_released_medusa(str(release), model, int(cfg.get("num_heads") or 4)) if kind == "medusa"
                 else load_released_hydra(str(release), model))
    elif cfg.get("head"):
        heads = load_trained_heads(cfg["head"], model, kind)
    else:
        raise UserError(f"drafter={kind} needs drafter.head=<checkpoint> (python -m specdec.training head={kind}) or "
                        f"drafter.release=<hub id or dir of released heads>")
    return DRAFTER_CLASSES[kind](model, heads, vocab_size)
