"""Small trainable draft heads built from the target's own module classes (no forked modeling code).

* ``KangarooAdapter`` (Liu et al., arXiv 2404.18911; ``Equationliu/Kangaroo`` ``kangaroo/adapter.py``):
  RMSNorm -> one self-attention block (the target's attention class, head layout and RoPE; its own
  one-layer KV cache) -> residual add -> final RMSNorm; no MLP. It maps the layer-ℓ hidden states of
  the target to the final (post-norm) space, where the target's frozen LM head gives draft logits.
* ``EagleHead`` (Li et al. 2024, EAGLE; ``SafeAILab/EAGLE`` ``eagle/model/cnets1.py::Model`` @ ``cb7e0841``,
  ``eagle/model/cnets.py`` @ ``2320d52`` for EAGLE-1): ``fc`` over the pair (feature_t, embed(token_{t+1}))
  -> one decoder layer of the target's own decoder class -> the predicted feature_{t+1}; the target's
  frozen LM head gives its logits. Features are the target's last hidden states after its final norm
  (what EAGLE regresses). Two layouts (``layout``, saved in the head's .json):

  - ``release`` (default): the released architecture exactly -- ``fc(cat(embedding, feature))``, embedding
    first, and the decoder layer without its input norm (the release builds ``input_layernorm`` only for
    layers after the first; here the target's layer gets ``nn.Identity`` in its place, so the released
    checkpoints of ``specdec.drafters.released`` load strictly and compute the same function).
  - ``legacy``: the head this project trained first -- ``fc(cat(feature, embedding))`` and the target's
    decoder layer unchanged (with its input norm). The committed ``specdec/assets/eagle-smollm2-135m`` head
    has this layout (its .json predates the key, and a missing key means ``legacy``).

Both share one call signature so a drafter can use either as a "head" on top of the target's layers:
``head(hidden [1, T, H], position_ids [1, T], attention_mask, cache) -> hidden [1, T, H]``, where
``attention_mask`` is an additive float mask ``[1, 1, T, P + T]`` (prefix + tree, as
``Target.tree_mask``) or ``None`` for a plain causal run without a cache prefix (training), and
``cache`` a ``DynamicCache`` (one layer) or ``None``. ``EagleHead`` takes ``(features, token_ids)``
as its ``hidden``; see its ``forward``.

Checkpoints: ``save_head(head, path)`` writes ``path.safetensors`` (trainable weights only) and
``path.json`` (kind, target name, exit layer, dims); ``load_head(path, model)`` rebuilds the head
around the given target model and checks the dims. ``path`` may name either file or their common stem;
only those known extensions are stripped (``head_stem``), so dotted model names such as
``kangaroo-qwen2.5-0.5b-l2`` stay whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from specdec import PROJECT_ROOT
from specdec.errors import UserError

HEAD_SUFFIXES = (".safetensors", ".json", ".md")  # the files of one head: weights, config, card


def _decoder(model):
    """The target's decoder stack (``model.model`` for Llama/Qwen2/Mistral/Gemma-style LMs)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UserError(f"{type(model).__name__} has no `model.layers` + `model.rotary_emb`: draft heads need a "
                        f"Llama-style decoder (Llama, Qwen2, Mistral, Gemma, ...)")
    return inner


def _head_config(model):
    """A copy of the target config for a one-layer module (``layer_idx=0`` caches in layer slot 0)."""
    config = type(model.config).from_dict(model.config.to_dict())
    config._attn_implementation = getattr(model.config, "_attn_implementation", None) or "sdpa"
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    return config


class KangarooAdapter(nn.Module):
    """Kangaroo's adapter: ``norm(h + attn(input_norm(h)))`` with the target's attention and norm classes."""

    kind = "kangaroo"

    def __init__(self, model, exit_layer: int):
        super().__init__()
        inner = _decoder(model)
        self.exit_layer = exit_layer
        self.config = _head_config(model)
        layer0 = inner.layers[0]
        norm_cls, eps = type(inner.norm), self.config.rms_norm_eps
        self.input_norm = norm_cls(self.config.hidden_size, eps=eps)
        self.attn = type(layer0.self_attn)(self.config, layer_idx=0)
        self.norm = norm_cls(self.config.hidden_size, eps=eps)
        self.rotary = type(inner.rotary_emb)(config=self.config)  # inv_freq is a non-persistent buffer
        self.to(device=model.device, dtype=model.dtype)

    @classmethod
    def from_meta(cls, model, meta: dict) -> "KangarooAdapter":
        return cls(model, meta["exit_layer"])

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask=None, cache=None):
        """hidden ``[1, T, H]`` (layer-ℓ states), position_ids ``[1, T]`` -> final-space states ``[1, T, H]``."""
        position_embeddings = self.rotary(hidden, position_ids)
        attn_out, _ = self.attn(self.input_norm(hidden), position_embeddings=position_embeddings,
                                attention_mask=attention_mask, past_key_values=cache)
        return self.norm(hidden + attn_out)


EAGLE_LAYOUTS = ("release", "legacy")


class EagleHead(nn.Module):
    """EAGLE's draft head: ``decoder_layer(fc(pair(feature, embed(next token))))`` -> next feature, in one of
    ``EAGLE_LAYOUTS`` (module docstring)."""

    kind = "eagle"

    def __init__(self, model, exit_layer: int | None = None, layout: str = "release"):
        super().__init__()
        if layout not in EAGLE_LAYOUTS:
            raise UserError(f"EAGLE head layout {layout!r} is unknown; use one of {', '.join(EAGLE_LAYOUTS)}")
        inner = _decoder(model)
        self.exit_layer = None  # EAGLE drafts from the last layer's features
        self.layout = layout
        self.config = _head_config(model)
        H = self.config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.layer = type(inner.layers[0])(self.config, layer_idx=0)
        if layout == "release":  # the release's first (only) layer has no input norm
            self.layer.input_layernorm = nn.Identity()
        self.rotary = type(inner.rotary_emb)(config=self.config)
        self.embed = inner.embed_tokens  # frozen, shared with the target (not saved)
        self.to(device=model.device, dtype=model.dtype)

    @classmethod
    def from_meta(cls, model, meta: dict) -> "EagleHead":
        return cls(model, meta["exit_layer"], meta.get("layout", "legacy"))  # no key: saved before layouts

    def meta(self) -> dict:
        return {"layout": self.layout}

    def trainable_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}

    def forward(self, hidden, position_ids: torch.Tensor, attention_mask=None, cache=None):
        """hidden = (features ``[1, T, H]``, next token ids ``[1, T]``) -> predicted next features ``[1, T, H]``."""
        features, next_ids = hidden
        embedded = self.embed(next_ids).to(features.dtype)
        pair = (embedded, features) if self.layout == "release" else (features, embedded)
        x = self.fc(torch.cat(pair, dim=-1))
        out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                         position_embeddings=self.rotary(x, position_ids))
        return out[0] if isinstance(out, tuple) else out


HEADS = {"kangaroo": KangarooAdapter, "eagle": EagleHead}


def head_state(head: nn.Module) -> dict:
    """The weights a checkpoint holds (the EAGLE head shares the target's frozen embedding)."""
    return head.trainable_state() if hasattr(head, "trainable_state") else head.state_dict()


def head_stem(path: str | Path) -> Path:
    """``path`` without a head file's extension (``HEAD_SUFFIXES``), else unchanged. Never
    ``with_suffix("")``/``Path.stem``: they cut a dotted name (``kangaroo-qwen2.5-0.5b-l2`` -> ``kangaroo-qwen2.5-0``)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(path.suffix)) if path.suffix in HEAD_SUFFIXES else path


def head_file(path: str | Path, suffix: str) -> Path:
    """The head file ``<stem><suffix>`` (``suffix`` one of ``HEAD_SUFFIXES``) for a stem or any of its files."""
    stem = head_stem(path)
    return stem.with_name(stem.name + suffix)


def save_head(head: nn.Module, path: str | Path, target_name: str, extra: dict | None = None,
              dtype: torch.dtype = torch.float16) -> Path:
    """Write ``<path>.safetensors`` (``dtype``: fp16 keeps SmolLM2's 4.2M-parameter EAGLE head under the
    10 MB a committed head may take) + ``<path>.json``; returns the .safetensors path."""
    from safetensors.torch import save_file

    path = head_stem(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head_state(head).items()}
    save_file(state, str(head_file(path, ".safetensors")))
    meta = {"kind": head.kind, "target": target_name, "exit_layer": head.exit_layer,
            "hidden_size": head.config.hidden_size, "num_attention_heads": head.config.num_attention_heads,
            "num_key_value_heads": head.config.num_key_value_heads, "vocab_size": head.config.vocab_size,
            "dtype": str(dtype).removeprefix("torch."), **(head.meta() if hasattr(head, "meta") else {}),
            **(extra or {})}
    head_file(path, ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return head_file(path, ".safetensors")


def head_files(path: str | Path, train: str = "python -m specdec.training") -> tuple[Path, Path, dict]:
    """(weights, meta file, meta) of a saved head; ``path`` is a stem or one of its files, relative to the repo root
    unless found as given. A missing head is one line naming how to make it (``train``) or load a release."""
    path = head_stem(path)
    if not path.is_absolute() and not head_file(path, ".json").exists():
        path = PROJECT_ROOT / path  # config paths are relative to the repo root
    weights, meta_file = head_file(path, ".safetensors"), head_file(path, ".json")
    if not weights.is_file() or not meta_file.is_file():
        raise UserError(f"draft head {path} not found (need {weights.name} and {meta_file.name}): train one with "
                        f"`{train}`, or set drafter.release=<a released checkpoint's hub id or dir>")
    return weights, meta_file, json.loads(meta_file.read_text())


def load_head(path: str | Path, model) -> nn.Module:
    """Rebuild a saved head around ``model`` (the target it was trained for; dims are checked)."""
    from safetensors.torch import load_file

    weights, meta_file, meta = head_files(path)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if meta[key] != getattr(model.config, key):
            raise UserError(f"draft head {weights.name} was trained for {meta['target']} ({key}={meta[key]}), "
                            f"not for this model ({key}={getattr(model.config, key)})")
    head = HEADS[meta["kind"]].from_meta(model, meta)
    state = {k: v.to(model.dtype) for k, v in load_file(str(weights), device=str(model.device)).items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("embed.") for k in missing):
        raise UserError(f"draft head {weights.name} does not match {meta['kind']}: missing {missing}, unexpected {unexpected}")
    return head.eval().requires_grad_(False)
