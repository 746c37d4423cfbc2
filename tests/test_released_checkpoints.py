"""Released EAGLE-1/2 heads and Kangaroo adapters (specdec/drafters/released.py) load exactly as released.

Each loader reads a synthetic checkpoint written here in the release's key layout (a tiny random Llama target,
random weights), strictly, and its logits equal a reference forward written below in plain torch from the
released code's math, to 1e-5:

* EAGLE: ``SafeAILab/EAGLE`` ``eagle/model/cnets1.py`` @ ``cb7e0841`` (``Model.forward``: ``fc`` over the
  embedding then the feature; ``LlamaDecoderLayer`` with index 0: no input norm; ``LlamaAttention``: RoPE
  ``rotate_half`` form, scores / sqrt(head_dim), fp32 softmax; ``LlamaMLP``: down(silu(gate) * up)); the
  output goes straight into the target's LM head (``topK_genrate``).
* Kangaroo: ``Equationliu/Kangaroo`` ``kangaroo/adapter.py`` @ ``4f0949d`` (``LlamaDecoderLayer``: input
  norm, attention with RoPE base 10000, residual, no MLP; ``AdapterModel``: final ``norm``), on the
  target's layer-ℓ states (``kangaroo/earlyexit.py``), then the target's LM head.

Also: the committed legacy SmolLM2 EAGLE head still loads (layout ``legacy``) and computes the legacy
function; a ``release``-layout head round-trips through ``save_head``/``load_head``; a hub id without
network is one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from specdec import PROJECT_ROOT
from specdec.drafters import build_drafter
from specdec.drafters.heads import EagleHead, load_head, save_head
from specdec.drafters.released import load_released_eagle, load_released_kangaroo
from specdec.errors import UserError

TOL = 1e-5


# ------------------------------------------------------------------ synthetic releases
def release_config(model, **changes) -> dict:
    """A release ``config.json`` for the tiny target (the fields the released configs carry)."""
    c = model.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
              "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "rms_norm_eps": c.rms_norm_eps,
              "hidden_act": "silu", "vocab_size": c.vocab_size, "max_position_embeddings": 2048}
    return {**config, **changes}


def random_weights(shapes: dict, seed: int) -> dict:
    """Random tensors: norms around 1, matrices and biases with a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.2 * torch.randn(s, generator=gen)) if "norm" in k else
            torch.randn(s, generator=gen) / math.sqrt(s[-1]) for k, s in shapes.items()}


def attention_shapes(model, prefix: str) -> dict:
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    H, q, kv = c.hidden_size, c.num_attention_heads * hd, c.num_key_value_heads * hd
    return {f"{prefix}q_proj.weight": (q, H), f"{prefix}k_proj.weight": (kv, H), f"{prefix}v_proj.weight": (kv, H),
            f"{prefix}o_proj.weight": (H, q)}


def eagle_release_state(model, seed: int = 1) -> dict:
    """The 11 tensors of a released EAGLE-1/2 head (``embed_tokens`` = the target's embedding, as released)."""
    H, I = model.config.hidden_size, model.config.intermediate_size
    shapes = {"fc.weight": (H, 2 * H), "fc.bias": (H,), **attention_shapes(model, "layers.0.self_attn."),
              "layers.0.mlp.gate_proj.weight": (I, H), "layers.0.mlp.up_proj.weight": (I, H),
              "layers.0.mlp.down_proj.weight": (H, I), "layers.0.post_attention_layernorm.weight": (H,)}
    return {**random_weights(shapes, seed), "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone()}


def kangaroo_release_state(model, seed: int = 2) -> dict:
    """The 6 tensors of a released Kangaroo adapter."""
    H = model.config.hidden_size
    shapes = {"layers.0.input_layernorm.weight": (H,), **attention_shapes(model, "layers.0.self_attn."),
              "norm.weight": (H,)}
    return random_weights(shapes, seed)


def write_release(directory, config: dict, state: dict, weights: str = "pytorch_model.bin"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights == "pytorch_model.bin":
        torch.save(state, directory / weights)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / weights))
    return directory


# ------------------------------------------------------------------ reference math (plain torch)
def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def self_attention(x, w: dict, prefix: str, positions, heads: int, kv_heads: int, theta: float):
    """Causal multi-head attention with RoPE over ``x`` [T, H] at ``positions`` [T] (the releases' LlamaAttention)."""
    T, H = x.shape
    hd = H // heads
    q = (x @ w[prefix + "q_proj.weight"].T).view(T, heads, hd).transpose(0, 1)        # [h, T, hd]
    k = (x @ w[prefix + "k_proj.weight"].T).view(T, kv_heads, hd).transpose(0, 1)
    v = (x @ w[prefix + "v_proj.weight"].T).view(T, kv_heads, hd).transpose(0, 1)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores.float(), -1) @ v                                      # [h, T, hd]
    return out.transpose(0, 1).reshape(T, H) @ w[prefix + "o_proj.weight"].T


def eagle_reference(w: dict, config, features, next_ids, theta: float, legacy: bool = False):
    """The EAGLE head's output [T, H] over (features [T, H], next_ids [T]) at positions 0..T-1. ``legacy``:
    this project's first layout (feature first, an input norm ``layers.0.input_layernorm``)."""
    e = F.embedding(next_ids, w["embed_tokens.weight"])
    x = torch.cat((features, e) if legacy else (e, features), -1) @ w["fc.weight"].T + w["fc.bias"]
    eps, positions = config.rms_norm_eps, torch.arange(len(next_ids))
    attn_in = rms_norm(x, w["layers.0.input_layernorm.weight"], eps) if legacy else x
    h = x + self_attention(attn_in, w, "layers.0.self_attn.", positions, config.num_attention_heads,
                           config.num_key_value_heads, theta)
    m = rms_norm(h, w["layers.0.post_attention_layernorm.weight"], eps)
    return h + (F.silu(m @ w["layers.0.mlp.gate_proj.weight"].T) * (m @ w["layers.0.mlp.up_proj.weight"].T)) \
        @ w["layers.0.mlp.down_proj.weight"].T


def kangaroo_reference(w: dict, config, hidden):
    """The Kangaroo adapter's output [T, H] over the layer-ℓ states ``hidden`` [T, H] at positions 0..T-1."""
    eps = config.rms_norm_eps
    y = hidden + self_attention(rms_norm(hidden, w["layers.0.input_layernorm.weight"], eps), w, "layers.0.self_attn.",
                                torch.arange(len(hidden)), config.num_attention_heads, config.num_key_value_heads,
                                10000.0)
    return rms_norm(y, w["norm.weight"], eps)


def target_features(model, tokens: list[int]) -> torch.Tensor:
    """The target's last hidden states after its final norm [T, H] (what EAGLE reads)."""
    with torch.no_grad():
        return model.model(torch.tensor([tokens])).last_hidden_state[0]


TOKENS = [3, 17, 41, 8, 8, 60, 22, 5, 33, 12, 47]


# ------------------------------------------------------------------ EAGLE
@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_released_eagle_head_equals_the_release_math(weights, tmp_path):
    model = tiny_llama(vocab=64, layers=2, seed=3)
    state = eagle_release_state(model)
    source = write_release(tmp_path / "eagle", release_config(model), state, weights)
    head = load_released_eagle(str(source), model)
    assert head.layout == "release" and isinstance(head.layer.input_layernorm, torch.nn.Identity)
    features, next_ids = target_features(model, TOKENS)[:-1], torch.tensor(TOKENS[1:])
    T = len(next_ids)
    with torch.no_grad():
        ours = model.lm_head(head((features[None], next_ids[None]), torch.arange(T)[None])[0])
        ref_out = eagle_reference(state, model.config, features, next_ids, theta=10000.0)
    assert torch.allclose(ours, model.lm_head(ref_out), atol=TOL, rtol=0), (ours - model.lm_head(ref_out)).abs().max()

    # The drafter built from the config: follow's root row and a tree child (reading the root's predicted
    # feature through the head's KV cache) are the reference's last rows.
    drafter = build_drafter({"kind": "eagle", "release": str(source), "head": "ignored"}, model, None, 64)
    hidden = target_features(model, TOKENS)[:-1]
    root = drafter.follow(TOKENS, hidden)
    assert torch.allclose(root, model.lm_head(ref_out[-1]), atol=TOL, rtol=0)
    child = int(root.argmax())
    child_logits = drafter.expand([child], [0])[0]
    with torch.no_grad():
        extended = eagle_reference(state, model.config, torch.cat([features, ref_out[-1:]]),
                                   torch.tensor(TOKENS[1:] + [child]), theta=10000.0)
    assert torch.allclose(child_logits, model.lm_head(extended[-1]), atol=TOL, rtol=0)


def test_released_eagle_loading_is_strict(tmp_path):
    model = tiny_llama(vocab=64, layers=2, seed=3)
    state = eagle_release_state(model)
    # an input norm in layer 0 (the target's own decoder layer, or our legacy layout) is not the release's
    extra = write_release(tmp_path / "extra", release_config(model),
                          {**state, "layers.0.input_layernorm.weight": torch.ones(model.config.hidden_size)})
    with pytest.raises(UserError, match=r"unexpected \['layers.0.input_layernorm.weight'\]") as err:
        load_released_eagle(str(extra), model)
    assert "\n" not in str(err.value)
    without_bias = {k: v for k, v in state.items() if k != "fc.bias"}
    missing = write_release(tmp_path / "missing", release_config(model), without_bias)
    with pytest.raises(UserError, match=r"missing \['fc.bias'\]"):
        load_released_eagle(str(missing), model)


def test_released_eagle_refuses_another_target(tmp_path):
    model = tiny_llama(vocab=64, layers=2, seed=3)
    state = eagle_release_state(model)
    wide = write_release(tmp_path / "wide", release_config(model, hidden_size=48), state)
    with pytest.raises(UserError, match="hidden_size=48") as err:
        load_released_eagle(str(wide), model)
    assert "\n" not in str(err.value)
    # EAGLE-1 configs omit num_key_value_heads: the release then uses num_attention_heads (4), not the target's 2
    mha = release_config(model)
    del mha["num_key_value_heads"]
    with pytest.raises(UserError, match="num_key_value_heads=4"):
        load_released_eagle(str(write_release(tmp_path / "mha", mha, state)), model)
    other = tiny_llama(vocab=64, layers=2, seed=4)  # same dims, another embedding: a head made for another model
    with pytest.raises(UserError, match="another target"):
        load_released_eagle(str(write_release(tmp_path / "eagle", release_config(model), state)), other)


def test_release_layout_head_round_trips_through_save_and_load(tmp_path):
    model = tiny_llama(vocab=64, layers=2, seed=3)
    head = EagleHead(model).eval()
    assert head.layout == "release"
    path = save_head(head, tmp_path / "eagle-release", "tiny", dtype=torch.float32)
    assert json.loads((tmp_path / "eagle-release.json").read_text())["layout"] == "release"
    again = load_head(path, model)
    features, next_ids = target_features(model, TOKENS), torch.tensor(TOKENS)
    args = ((features[None], next_ids[None]), torch.arange(len(TOKENS))[None])
    with torch.no_grad():
        assert again.layout == "release" and torch.equal(again(*args), head(*args))
    legacy = EagleHead(model, layout="legacy")  # a legacy file refuses to load into a release head and back
    legacy_path = save_head(legacy, tmp_path / "eagle-legacy", "tiny", dtype=torch.float32)
    meta = json.loads((tmp_path / "eagle-legacy.json").read_text())
    (tmp_path / "eagle-legacy.json").write_text(json.dumps({**meta, "layout": "release"}))
    with pytest.raises(UserError, match="input_layernorm"):
        load_head(legacy_path, model)


def test_committed_legacy_eagle_head_keeps_its_layout_and_function(smollm2):
    model = smollm2[0]
    stem = PROJECT_ROOT / "specdec/assets/eagle-smollm2-135m"
    assert "layout" not in json.loads(stem.with_suffix(".json").read_text())  # trained before the layouts: legacy
    head = load_head(stem, model)
    assert head.layout == "legacy"
    weights = {k.replace("layer.", "layers.0.", 1): v for k, v in head.trainable_state().items()}
    weights["embed_tokens.weight"] = model.model.embed_tokens.weight
    tokens = TOKENS + [1000, 2000, 3000]
    features, next_ids = target_features(model, tokens)[:-1], torch.tensor(tokens[1:])
    theta = float(model.config.rope_parameters["rope_theta"])
    with torch.no_grad():
        ours = head((features[None], next_ids[None]), torch.arange(len(next_ids))[None])[0]
        ref = eagle_reference(weights, model.config, features, next_ids, theta, legacy=True)
    assert torch.allclose(ours, ref, atol=TOL, rtol=0), (ours - ref).abs().max()


# ------------------------------------------------------------------ Kangaroo
def test_released_kangaroo_adapter_equals_the_release_math(tmp_path):
    model = tiny_llama(vocab=64, layers=3, seed=5)
    state = kangaroo_release_state(model)
    source = write_release(tmp_path / "kangaroo", release_config(model), state)
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 2, "release": str(source), "adapter": "ignored"},
                            model, None, 64)
    assert drafter.exit_layer == 2 and drafter.head.exit_layer == 2
    ours = drafter.teacher_forced(TOKENS)                                   # [T, V]: layers 0-1, adapter, LM head
    with torch.no_grad():
        layer2 = model(torch.tensor([TOKENS]), output_hidden_states=True).hidden_states[2][0]
        ref = model.lm_head(kangaroo_reference(state, model.config, layer2))
    assert torch.allclose(ours, ref, atol=TOL, rtol=0), (ours - ref).abs().max()


def test_released_kangaroo_loading_is_strict_and_checked(tmp_path):
    model = tiny_llama(vocab=64, layers=3, seed=5)
    state = kangaroo_release_state(model)
    extra = write_release(tmp_path / "extra", release_config(model),
                          {**state, "layers.0.mlp.up_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(UserError, match=r"unexpected \['layers.0.mlp.up_proj.weight'\]"):
        load_released_kangaroo(str(extra), model, 2)
    missing = write_release(tmp_path / "missing", release_config(model),
                            {k: v for k, v in state.items() if k != "norm.weight"})
    with pytest.raises(UserError, match=r"missing \['norm.weight'\]"):
        load_released_kangaroo(str(missing), model, 2)
    two_layers = write_release(tmp_path / "two", release_config(model, num_hidden_layers=2), state)
    with pytest.raises(UserError, match="num_hidden_layers=2"):
        load_released_kangaroo(str(two_layers), model, 2)
    with pytest.raises(UserError, match="exit_layer"):
        build_drafter({"kind": "early_exit", "exit_layer": None, "release": str(tmp_path / "extra")}, model, None, 64)


# ------------------------------------------------------------------ sources
def test_hub_id_without_network_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_llama(vocab=64, layers=2, seed=3)
    for load in (lambda s: load_released_eagle(s, model), lambda s: load_released_kangaroo(s, model, 1)):
        with pytest.raises(UserError, match="hub cannot be reached") as err:
            load("yuhuili/EAGLE-Vicuna-7B-v1.3")
        assert "\n" not in str(err.value) and "drafter.release='yuhuili/EAGLE-Vicuna-7B-v1.3'" in str(err.value)
    with pytest.raises(UserError, match="no such directory"):
        load_released_eagle(str(tmp_path / "nowhere" / "eagle"), model)
    with pytest.raises(UserError, match="no config.json"):
        load_released_eagle(str(tmp_path), model)
