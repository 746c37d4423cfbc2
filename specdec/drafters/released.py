"""The released EAGLE-1/2 heads and Kangaroo adapters, loaded exactly as released (strict, no renamed-away key).

    load_released_eagle("yuhuili/EAGLE-Vicuna-7B-v1.3", model)          # a hub id (downloaded once) ...
    load_released_kangaroo("/cache/kangaroo-vicuna-7b-v1.3", model, 2)  # ... or a local directory

A release is a directory with ``config.json`` and the weights, ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``) or ``model.safetensors``; the ``.bin`` is tried first, as the released
loaders do (``SafeAILab/EAGLE`` ``eagle/model/ea_model.py::EaModel.from_pretrained`` @ ``cb7e0841``). The
weights land in the harness's own heads (``specdec.drafters.heads``), which are built from the target's
module classes; only the key names differ:

* **EAGLE-1/2** (``SafeAILab/EAGLE`` ``eagle/model/cnets1.py::Model`` @ ``cb7e0841``; EAGLE-1's
  ``eagle/model/cnets.py`` @ ``2320d52`` has the same layout): ``fc.{weight,bias}`` (over the embedding
  *then* the feature), ``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
  ``layers.0.post_attention_layernorm.weight`` and ``embed_tokens.weight`` -- 11 tensors, and no input norm
  in layer 0 (the release creates it only for later layers). They go into an ``EagleHead`` of layout
  ``release`` (``layers.0.`` -> ``layer.``).
  ``embed_tokens.weight`` is the release's frozen copy of the target's input embedding: ``Model.__init__``
  reads it from the base model's checkpoint and never trains it; the release saves it only because its head
  is a standalone module. The loader checks that the copy equals the target's embedding (up to a
  half-precision rounding, ``EMBED_RTOL``) and then uses the target's: the same function without a second
  vocabulary-sized matrix. A copy that differs means a head made for another target, and is refused.
  The head's output goes straight into the target's LM head, no norm in between (as ``EagleDrafter`` does).
* **Kangaroo** (``Equationliu/Kangaroo`` ``kangaroo/adapter.py::AdapterModel`` and
  ``kangaroo/kangaroo_model.py::KangarooModel`` @ ``4f0949d``): ``layers.0.input_layernorm.weight``,
  ``layers.0.self_attn.{q,k,v,o}_proj.weight`` and ``norm.weight`` -- 6 tensors, no MLP; they go into a
  ``KangarooAdapter`` (``input_norm.``, ``attn.``, ``norm.``). The checkpoint does not record its exit
  layer: the caller gives it (``KangarooModel``'s ``EARLY_STOP_LAYER`` / ``--exitlayer`` default is 2, the
  layer the Vicuna-7B adapter was trained at; the paper uses 3 for Vicuna-13B).

Strictness: every key of the file is used and every weight of the head comes from the file; an extra or a
missing key is one ``UserError`` line (the releases load with ``strict=False`` in places -- ``KangarooModel``
and EAGLE's main branch -- where a renamed key would silently leave random weights). ``config.json`` is
checked against the target (widths, heads, vocabulary, norm epsilon, activation, RoPE: the releases use
plain RoPE with base ``rope_theta``, default 10000, and Kangaroo's adapter always 10000), with one line
per mismatch. The weights are cast to the target's dtype and device, as the releases cast their heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdec.drafters.heads import EagleHead, KangarooAdapter
from specdec.errors import UserError
from specdec.models import hub_reachable

RELEASE_WEIGHTS = ("pytorch_model.bin", "model.safetensors")  # tried in this order, as the releases do
SETTING = "drafter.release"   # the config key that names a release (conf/drafter/{eagle,kangaroo}.yaml)
EMBED_RTOL = 1e-3             # the embedding copy may differ from the target's by a half-precision rounding
DEFAULT_ROPE_THETA = 10000.0  # the releases' RoPE base when config.json names none

# (our key prefix, the release's key prefix) per head
EAGLE_KEYS = (("fc.", "fc."), ("layer.", "layers.0."))
KANGAROO_KEYS = (("input_norm.", "layers.0.input_layernorm."), ("attn.", "layers.0.self_attn."), ("norm.", "norm."))
EAGLE_EMBED_KEY = "embed_tokens.weight"


def load_released_eagle(source: str, model, setting: str = SETTING) -> EagleHead:
    """A released EAGLE-1/2 head (hub id or directory) as an ``EagleHead(layout="release")`` around ``model``."""
    directory = release_dir(source, setting)
    config, state = read_release(directory, source, setting)
    where = f"{setting}={source!r} (released EAGLE head)"
    if not config.get("bias", True):
        raise UserError(f"{where}: config.json says bias=false (fc without bias); only the EAGLE-1/2 layout "
                        f"with fc.bias is supported")
    check_config(config, model, where, eagle=True)
    head = EagleHead(model, layout="release")
    check_embedding(state.get(EAGLE_EMBED_KEY), head.embed.weight, where)
    load_strict(head, state, EAGLE_KEYS, where, extra_keys={EAGLE_EMBED_KEY})
    return head.eval().requires_grad_(False)


def load_released_kangaroo(source: str, model, exit_layer: int, setting: str = SETTING) -> KangarooAdapter:
    """A released Kangaroo adapter (hub id or directory) as a ``KangarooAdapter`` for ``exit_layer``."""
    directory = release_dir(source, setting)
    config, state = read_release(directory, source, setting)
    where = f"{setting}={source!r} (released Kangaroo adapter)"
    check_config(config, model, where, eagle=False)
    head = KangarooAdapter(model, int(exit_layer))
    load_strict(head, state, KANGAROO_KEYS, where)
    return head.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- files
def release_dir(source: str, setting: str = SETTING, weights=RELEASE_WEIGHTS) -> Path:
    """The local directory of a release: ``source`` itself, or its hub snapshot of ``config.json`` + ``weights``
    (``snapshot_download``; the local cache only when the hub cannot be reached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise UserError(f"{setting}={source!r}: no such directory (a released checkpoint is a directory with "
                        f"config.json and {' or '.join(weights)}, or a hub id)")
    from huggingface_hub import snapshot_download

    online = hub_reachable()
    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", *weights],
                                      local_files_only=not online))
    except (OSError, ValueError) as err:
        if not online:
            raise UserError(f"{setting}={source!r}: the released checkpoint is neither a local directory nor in "
                            f"the local Hugging Face cache, and the hub cannot be reached from this machine; "
                            f"download it where the hub is reachable and pass its directory") from None
        raise UserError(f"{setting}={source!r}: cannot download the released checkpoint: {first_line(err)}") from None


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_release(directory: Path, source: str, setting: str = SETTING, names=RELEASE_WEIGHTS) -> tuple[dict, dict]:
    """(``config.json`` as a dict, the state dict on the CPU) of a release directory; the weights are the first
    of ``names`` present (a pickle, read with ``weights_only``, or safetensors)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{setting}={source!r}: {directory} has no config.json")
    weights = next((directory / name for name in names if (directory / name).is_file()), None)
    if weights is None:
        raise UserError(f"{setting}={source!r}: {directory} has neither {' nor '.join(names)}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise UserError(f"{setting}={source!r}: config.json is not valid JSON: {err}") from None
    try:
        if weights.suffix != ".safetensors":
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(weights), device="cpu")
    except Exception as err:  # a corrupt or foreign file: pickle and safetensors each raise their own
        raise UserError(f"{setting}={source!r}: cannot read {weights.name}: {first_line(err)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{setting}={source!r}: {weights.name} is not a state dict of tensors")
    return config, state


# ---------------------------------------------------------------------------------------------- checks
def target_rope(config) -> tuple[str, float]:
    """(RoPE type, base) of a transformers config (``rope_parameters`` in transformers 5, ``rope_theta`` before)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default"))
    return rope_type, float(params.get("rope_theta", getattr(config, "rope_theta", DEFAULT_ROPE_THETA)))


def check_config(config: dict, model, where: str, eagle: bool) -> None:
    """``config.json`` of a release against the target's config; one line naming the first mismatch."""
    target = model.config
    heads = config.get("num_attention_heads")
    wanted = {"hidden_size": config.get("hidden_size"), "num_attention_heads": heads,
              "num_key_value_heads": config.get("num_key_value_heads", heads),  # the releases' default
              "rms_norm_eps": config.get("rms_norm_eps", 1e-6)}
    if eagle:
        wanted |= {"intermediate_size": config.get("intermediate_size"), "vocab_size": config.get("vocab_size"),
                   "hidden_act": config.get("hidden_act", "silu")}
    for key, value in wanted.items():
        if value != getattr(target, key, None):
            raise UserError(f"{where}: config.json has {key}={value}, the target model has "
                            f"{key}={getattr(target, key, None)}: it was made for another model")
    if config.get("num_hidden_layers", 1) != 1:
        raise UserError(f"{where}: config.json has num_hidden_layers={config['num_hidden_layers']}; "
                        f"the released heads have exactly one layer")
    head_dim = getattr(target, "head_dim", None) or target.hidden_size // target.num_attention_heads
    if head_dim * target.num_attention_heads != target.hidden_size:
        raise UserError(f"{where}: the target's head_dim={head_dim} is not hidden_size/num_attention_heads, "
                        f"which the released attention assumes")
    if config.get("rope_scaling"):
        raise UserError(f"{where}: config.json has rope_scaling={config['rope_scaling']}; only plain RoPE is supported")
    theta = DEFAULT_ROPE_THETA if not eagle else float(config.get("rope_theta", DEFAULT_ROPE_THETA))
    if target_rope(target) != ("default", theta):
        raise UserError(f"{where}: the release uses plain RoPE with base {theta:g}, the target model "
                        f"{'%s RoPE with base %g' % target_rope(target)}")


def check_embedding(copy: torch.Tensor | None, embedding: torch.Tensor, where: str) -> None:
    """The release's ``embed_tokens.weight`` must be the target's input embedding (the head then uses the target's)."""
    if copy is None:
        raise UserError(f"{where}: missing key {EAGLE_EMBED_KEY} (the head's copy of the target's embedding)")
    if copy.shape != embedding.shape:
        raise UserError(f"{where}: {EAGLE_EMBED_KEY} has shape {list(copy.shape)}, the target's embedding "
                        f"{list(embedding.shape)}")
    mine = copy.to(device=embedding.device, dtype=embedding.dtype).float()
    if not torch.allclose(mine, embedding.float(), rtol=EMBED_RTOL, atol=1e-6):
        gap = (mine - embedding.float()).abs().max().item()
        raise UserError(f"{where}: its {EAGLE_EMBED_KEY} differs from the target's input embedding (max "
                        f"|difference| {gap:.3g}): the head was made for another target")


def release_name(key: str, renames: tuple) -> str:
    """Our head's state-dict key under the release's name."""
    for ours, theirs in renames:
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    raise KeyError(key)


def load_strict(head, state: dict, renames: tuple, where: str, extra_keys: frozenset | set = frozenset()) -> None:
    """Load ``state`` (release names) into ``head``: every file key used, every head weight given, shapes equal."""
    ours = head.trainable_state() if hasattr(head, "trainable_state") else head.state_dict()
    names = {release_name(key, renames): key for key in ours}
    missing = sorted(set(names) - set(state))
    extra = sorted(set(state) - set(names) - set(extra_keys))
    if missing or extra:
        raise UserError(f"{where}: the checkpoint's keys are not the release's: "
                        f"missing {missing or 'none'}, unexpected {extra or 'none'}")
    for theirs, key in names.items():
        if state[theirs].shape != ours[key].shape:
            raise UserError(f"{where}: {theirs} has shape {list(state[theirs].shape)}, the head needs "
                            f"{list(ours[key].shape)}")
    result = head.load_state_dict({key: state[theirs] for theirs, key in names.items()}, strict=False)
    assert not result.unexpected_keys and all(k.startswith("embed.") for k in result.missing_keys), result
