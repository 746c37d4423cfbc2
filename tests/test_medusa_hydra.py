"""Medusa-1 and Hydra (issue 22): the released tree's constants, the heads' shapes and sizes, the released-layout
loaders (strict, logits equal to a reference forward written from the released code), the fills (Medusa: head
d-1's rank-r token; Hydra: each parent's own row), oracle heads accepted to full depth through the real loop,
Hydra's append-only prefix cache, greedy = AR on SmolLM2 with random heads, exact sampling on a tiny vocabulary,
the training command (loss down, accept rate up, checkpoint round trip) and bad input as one line."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
from torch.nn.functional import silu

from conftest import (LOSSLESS_NEW_TOKENS, assert_same_distribution, first_two_tokens_histogram, method_env,
                      run_generation, tiny_llama)
from methods.medusa import tree_paths
from methods.recycle import Template
from specdec.drafters import build_drafter
from specdec.drafters.heads import save_head
from specdec.drafters.medusa import (HydraDrafter, HydraHeads, MedusaDrafter, MedusaHeads, load_released_hydra,
                                     load_released_medusa, load_trained_heads)
from specdec.errors import UserError
from specdec.models import vocab_size
from specdec.training.train import parse_args, train
from specdec.verify.proposer import Proposer, build_proposer
from specdec.verify.tree import DETERMINISTIC

DRAFTERS = {"medusa": MedusaDrafter, "hydra": HydraDrafter}


def random_heads(model, kind: str, seed: int = 0, **knobs):
    """Heads with every weight random (the released inits zero the blocks' weights: a random head drafts more)."""
    torch.manual_seed(seed)
    heads = MedusaHeads(model, **knobs) if kind == "medusa" else HydraHeads(model, **knobs)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    return heads.eval().requires_grad_(False)


def proposer_for(model, kind: str, heads, tree_nodes=None, temperature: float = 0.0, drafter=None):
    env = dataclasses.replace(method_env(model), temperature=temperature,
                              drafter=drafter or DRAFTERS[kind](model, heads, vocab_size(model)))
    p = build_proposer({"name": kind, "proposer": kind, "tree_nodes": tree_nodes}, env)
    p.reset("run")
    return p


def features(model, tokens: list[int]) -> torch.Tensor:
    """The target's post-norm last hidden states of ``tokens`` [n, H] (what ``Context.hidden`` holds)."""
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]


# ---------------------------------------------------------------------------------------------- the tree
def test_mc_sim_7b_63_as_released():
    """63 entries, 10/28/23/2 nodes per depth, 42 leaves, the BFS parents and ranks of generate_medusa_buffers;
    every prefix of the written order is ancestor-closed."""
    paths = tree_paths("mc_sim_7b_63")
    t = Template.from_paths(paths)
    assert t.size == 64 and len(set(paths)) == 63
    assert [sum(1 for p in paths if len(p) == d) for d in (1, 2, 3, 4)] == [10, 28, 23, 2]
    assert sum(1 for c in t.children[1:] if not c) == 42
    runs = lambda spec: [x for value, n in spec for x in [value] * n]  # noqa: E731
    assert t.parent_list == runs([(-1, 1), (0, 10), (1, 10), (2, 7), (3, 3), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1),
                                  (9, 1), (10, 1), (11, 10), (12, 3), (13, 2), (14, 1), (15, 1), (16, 1), (17, 1),
                                  (18, 1), (21, 2), (28, 1), (39, 2)])
    assert t.ranks.tolist()[1:] == [*range(10), *range(10), *range(7), *range(3), 0, 1, *[0] * 6, *range(10),
                                    *range(3), 0, 1, *[0] * 5, 0, 1, 0, 0, 1]
    for n in range(1, 64):
        head = set(paths[:n])
        assert all(p[:d] in head for p in head for d in range(1, len(p)))
    assert tree_paths("mc_sim_7b_63", 15)[-1] == (0, 0, 1)


# ---------------------------------------------------------------------------------------------- heads
def test_head_shapes_and_sizes():
    model = tiny_llama()
    d, V, n = 32, 64, 5
    h = torch.randn(n, d)
    own = MedusaHeads(model, num_heads=4, num_layers=2)
    assert own(h).shape == (4, n, V)
    assert sum(p.numel() for p in own.parameters()) == 4 * (d * d + d + V * d)   # 2 layers = one tied block
    shared = MedusaHeads(model, num_heads=3, share_lm_head=True)
    assert set(shared.state_dict()) == {f"blocks.{k}.linear.{p}" for k in range(3) for p in ("weight", "bias")}
    torch.testing.assert_close(shared.head_logits(0, h), model.lm_head(h + silu(shared.blocks[0].linear.bias)))
    hydra = HydraHeads(model, num_heads=3, num_layers=4, arch="prefix-mlp")
    for i in range(3):
        assert hydra.head_logits(i, torch.randn(n, (i + 2) * d)).shape == (n, V)
    with pytest.raises(ValueError, match="takes 3 x hidden_size"):
        hydra.head_logits(1, torch.randn(n, 2 * d))
    blocks = sum(2 * ((i + 2) * d * d + d) for i in range(3)) + 3 * (d * d + d)  # first blocks + 1 tied deep block each
    prefix = sum(p.numel() for name, p in hydra.named_parameters() if name.startswith("prefix"))
    assert prefix > 0 and sum(p.numel() for p in hydra.parameters()) == blocks + prefix + 3 * (V * d + V)
    plain = HydraHeads(model, num_heads=2, num_layers=1, arch="mlp", share_lm_head=True)
    assert not any(k.startswith("prefix") for k in plain.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == 2 * (2 * d * d + d) + 2 * (3 * d * d + d) + 2 * V
    z = torch.randn(1, n, d)
    assert plain.prefix_states(z, torch.arange(n)[None]) is z
    with pytest.raises(UserError, match="not implemented"):
        HydraHeads(model, arch="cross-attn")


# ---------------------------------------------------------------------------------------------- released layouts
def write_released(tmp_path, config: dict, state: dict, weights: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / weights)
    return tmp_path


def released_medusa_state(heads: int, layers: int, d: int, V: int, seed: int = 0) -> dict:
    """A ``medusa_lm_head.pt`` state dict as the release's ModuleList saves it (one block object per head,
    listed under every repetition index)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for h in range(heads):
        weight, bias = torch.randn(d, d, generator=g) * 0.2, torch.randn(d, generator=g) * 0.2
        for j in range(layers):
            state[f"{h}.{j}.linear.weight"], state[f"{h}.{j}.linear.bias"] = weight, bias
        state[f"{h}.{layers}.weight"] = torch.randn(V, d, generator=g)
    return state


def medusa_reference(state: dict, h: torch.Tensor, head: int, layers: int) -> torch.Tensor:
    """Released forward (medusa_model.py: Sequential(*[ResBlock] * L, Linear(bias=False))) in plain tensor math."""
    x = h
    for j in range(layers):
        x = x + silu(x @ state[f"{head}.{j}.linear.weight"].T + state[f"{head}.{j}.linear.bias"])
    return x @ state[f"{head}.{layers}.weight"].T


@pytest.mark.parametrize("layers", [1, 2])
def test_released_medusa_loader_matches_the_released_forward(layers, tmp_path, caplog):
    model = tiny_llama()
    state = released_medusa_state(5, layers, 32, 64)
    # the 7B release's config.json says 2 heads for a file of 5: the keys decide
    source = write_released(tmp_path, {"medusa_num_heads": 2, "medusa_num_layers": layers}, state, "medusa_lm_head.pt")
    with caplog.at_level(logging.INFO, logger="specdec.drafters.medusa"):
        heads = load_released_medusa(str(source), model)
    assert heads.num_heads == 4 and "dropped [4]" in caplog.text
    h = torch.randn(7, 32)
    with torch.no_grad():
        out = heads(h)
    for k in range(4):
        torch.testing.assert_close(out[k], medusa_reference(state, h, k, layers), atol=1e-5, rtol=1e-5)


def test_released_medusa_safetensors_variant(tmp_path):
    """The hub's later ``medusa_lm_head.safetensors`` variant of the same state dict loads the same heads."""
    from safetensors.torch import save_file

    model = tiny_llama()
    state = released_medusa_state(5, 1, 32, 64, seed=3)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_layers": 1}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "medusa_lm_head.safetensors"))
    h = torch.randn(3, 32)
    with torch.no_grad():
        out = load_released_medusa(str(tmp_path), model, num_heads=5)(h)
    torch.testing.assert_close(out[4], medusa_reference(state, h, 4, 1), atol=1e-5, rtol=1e-5)


def test_released_medusa_loader_is_strict(tmp_path, monkeypatch):
    model = tiny_llama()
    good = released_medusa_state(5, 1, 32, 64)
    cases = {"lacks": {k: v for k, v in good.items() if k != "2.0.linear.bias"},
             "has shape": {**good, "3.1.weight": torch.zeros(60, 32)},
             "not a Medusa head state dict": {**good, "extra.weight": torch.zeros(1)}}
    for i, (message, state) in enumerate(cases.items()):
        source = write_released(tmp_path / str(i), {"medusa_num_layers": 1}, state, "medusa_lm_head.pt")
        with pytest.raises(UserError, match=message):
            load_released_medusa(str(source), model)
    tied = released_medusa_state(4, 2, 32, 64)
    tied["1.1.linear.weight"] = tied["1.1.linear.weight"] + 1  # the list-repeated block must be one tensor
    with pytest.raises(UserError, match="tied"):
        load_released_medusa(str(write_released(tmp_path / "t", {"medusa_num_layers": 2}, tied, "medusa_lm_head.pt")),
                             model)
    with pytest.raises(UserError, match="holds 5 heads"):
        load_released_medusa(str(write_released(tmp_path / "ok", {}, good, "medusa_lm_head.pt")), model, num_heads=6)
    # no network: a hub id that is not cached is one clear line
    monkeypatch.setattr("specdec.drafters.released.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="drafter.release=.*not in the local Hugging Face cache|drafter.release=.*nor in the local Hugging Face cache") as err:
        load_released_medusa("FasterDecoding/medusa-vicuna-7b-v1.3", model)
    assert "\n" not in str(err.value)


def released_hydra_state(model, arch: str, K: int, L: int, seed: int = 0) -> dict:
    """A ``hydra_lm_head.pt`` state dict laid out as HydraPrefixMLP / HydraMLP save it: the prefix LlamaModel
    (with its unused embed_tokens and the rotary inv_freq of the 4.33-era layer), the copy of the target
    embedding, list-repeated (tied) deep blocks under every index, projections with bias."""
    from transformers import LlamaModel

    g = torch.Generator().manual_seed(seed)
    d, V = model.config.hidden_size, model.config.vocab_size
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    state = {"input_embed_fn.weight": model.model.embed_tokens.weight.detach().clone()}
    if arch == "prefix-mlp":
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = 1
        for k, v in LlamaModel(cfg).state_dict().items():
            state[f"prefix_embeding_layer.{k}"] = (1 + rnd(*v.shape)) if "norm" in k else rnd(*v.shape)
        state["prefix_embeding_layer.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    first, deep, proj = ((lambda i: f"hydra_mlp.{i}.1", lambda i, j: f"hydra_mlp.{i}.{2 * j + 1}",
                          lambda i: f"hydra_lm_head.{i}.1") if arch == "prefix-mlp" else
                         (lambda i: f"hydra_mlp.{i}.0", lambda i, j: f"hydra_mlp.{i}.{j}",
                          lambda i: f"hydra_lm_head.{i}"))
    for i in range(K):
        for part in ("linear", "res_connection"):
            state[f"{first(i)}.{part}.weight"], state[f"{first(i)}.{part}.bias"] = rnd(d, (i + 2) * d), rnd(d)
        weight, bias = rnd(d, d), rnd(d)
        for j in range(1, L):
            state[f"{deep(i, j)}.linear.weight"], state[f"{deep(i, j)}.linear.bias"] = weight, bias
        state[f"{proj(i)}.weight"], state[f"{proj(i)}.bias"] = rnd(V, d) * 5, rnd(V)
    return state


def hydra_reference(model, state: dict, arch: str, L: int, hidden: torch.Tensor, path: list[int]) -> list:
    """Released forward: z = the 1-layer LlamaModel on the features (last position) or the feature itself; head i
    on cat(z, E(path[0..i])): res_connection(x) + SiLU(linear(x)), then the tied block L-1 times, then Linear."""
    from transformers import LlamaModel

    if arch == "prefix-mlp":
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = 1
        prefix = LlamaModel(cfg)
        prefix.load_state_dict({k.removeprefix("prefix_embeding_layer."): v for k, v in state.items()
                                if k.startswith("prefix_embeding_layer.") and "inv_freq" not in k})
        with torch.no_grad():
            z = prefix(inputs_embeds=hidden[None]).last_hidden_state[0, -1]
        first, deep, proj = "hydra_mlp.{}.1", "hydra_mlp.{}.3", "hydra_lm_head.{}.1"
    else:
        z, first, deep, proj = hidden[-1], "hydra_mlp.{}.0", "hydra_mlp.{}.1", "hydra_lm_head.{}"
    E = state["input_embed_fn.weight"]
    out = []
    for i in range(len(path)):
        x = torch.cat([z] + [E[t] for t in path[:i + 1]])
        w = lambda name, part: state[f"{name.format(i)}.{part}"]  # noqa: E731
        h = x @ w(first, "res_connection.weight").T + w(first, "res_connection.bias") + \
            silu(x @ w(first, "linear.weight").T + w(first, "linear.bias"))
        for _ in range(L - 1):
            h = h + silu(h @ w(deep, "linear.weight").T + w(deep, "linear.bias"))
        out.append(h @ w(proj, "weight").T + w(proj, "bias"))
    return out


@pytest.mark.parametrize("arch", ["prefix-mlp", "mlp"])
def test_released_hydra_loader_matches_the_released_forward(arch, tmp_path):
    """Loaded strictly, the drafter's incremental path (prefix cache fed over two follows, then a chain of
    expands) gives the released forward's logits to 1e-5."""
    model = tiny_llama()
    K, L = 3, 4
    state = released_hydra_state(model, arch, K, L)
    config = {"hydra_num_heads": K, "hydra_num_layers": L, "hydra_head_arch": arch, "grounded_heads": True,
              "hidden_state_offset": 0}
    heads = load_released_hydra(str(write_released(tmp_path, config, state, "hydra_lm_head.pt")), model)
    drafter = HydraDrafter(model, heads, 64)
    tokens = [5, 9, 3, 17, 40, 2, 33, 8, 11, 60]
    hidden = features(model, tokens)
    drafter.begin(tokens[:6])
    drafter.follow(tokens[:6], hidden[:5])                        # the prefix cache holds 5 committed rows
    drafter.follow(tokens, hidden[:9])                            # 4 more rows, appended
    root_logits = drafter.follow(tokens, hidden[:9])              # again on the same sequence: nothing new to feed
    path = [tokens[-1], 7, 21]                                    # root, then two draft tokens
    chain = drafter.expand(path[1:], [0, 1])
    ref = hydra_reference(model, state, arch, L, hidden[:9], path)
    torch.testing.assert_close(root_logits, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chain, torch.stack(ref[1:]), atol=1e-5, rtol=1e-5)


def test_released_hydra_loader_is_strict(tmp_path):
    model = tiny_llama()
    config = {"hydra_num_heads": 2, "hydra_num_layers": 4, "hydra_head_arch": "prefix-mlp", "grounded_heads": True,
              "hidden_state_offset": 0}
    good = released_hydra_state(model, "prefix-mlp", 2, 4)
    bad = {"one tied block": {**good, "hydra_mlp.1.5.linear.bias": good["hydra_mlp.1.5.linear.bias"] + 1},
           "lacks": {k: v for k, v in good.items() if k != "hydra_lm_head.0.1.bias"},
           "unexpected keys": {**good, "hydra_mlp.2.1.linear.weight": torch.zeros(32, 128)},
           "another base model": {**good, "input_embed_fn.weight": good["input_embed_fn.weight"] + 1}}
    for i, (message, state) in enumerate(bad.items()):
        with pytest.raises(UserError, match=message):
            load_released_hydra(str(write_released(tmp_path / str(i), config, state, "hydra_lm_head.pt")), model)
    for field, value in (("hydra_head_arch", "cross-attn"), ("grounded_heads", False), ("hidden_state_offset", 1)):
        source = write_released(tmp_path / field, {**config, field: value}, good, "hydra_lm_head.pt")
        with pytest.raises(UserError, match="only grounded"):
            load_released_hydra(str(source), model)


# ---------------------------------------------------------------------------------------------- the fills
def first_tree(model, kind: str, heads):
    """(proposer, tokens, the target's features of tokens[:-1], its first tree) of ``kind`` over ``heads``."""
    from specdec.verify.proposer import Context

    p = proposer_for(model, kind, heads)
    tokens = list(range(3, 15))
    hidden = features(model, tokens[:-1])
    ctx = Context(tokens=tokens, prompt_len=len(tokens), remaining=50, hidden=hidden)
    p.begin(ctx)
    return p, tokens, hidden, p.propose(ctx)


def test_medusa_fill_is_the_released_buffer_fill():
    """Node tokens = candidates[tree_indices] with candidates = [root, head 0's top 10, ..., head 3's top 10] and
    tree_indices = rank + 10 (depth - 1) + 1 (generate_medusa_buffers / generate_candidates)."""
    model = tiny_llama()
    p, tokens, ctx_hidden, tree = first_tree(model, "medusa", random_heads(model, "medusa", num_heads=4))
    with torch.no_grad():
        head_logits = p.drafter.heads(ctx_hidden[-1:])[:, 0]                       # [4, V]
    candidates = torch.cat([torch.tensor([tokens[-1]]), torch.topk(head_logits, 10).indices.reshape(-1)])
    paths = sorted(tree_paths("mc_sim_7b_63"), key=lambda q: (len(q), q))
    tree_indices = [0] + [q[-1] + 10 * (len(q) - 1) + 1 for q in paths]
    assert tree.tokens.tolist() == candidates[tree_indices].tolist() and tree.kind == DETERMINISTIC
    assert tree.parent_list == Template.from_paths(paths).parent_list


def test_hydra_fill_reads_each_parents_own_row():
    """Every node's token is the rank-r best of head d-1 on its own path (recomputed node by node)."""
    model = tiny_llama()
    heads = random_heads(model, "hydra", num_heads=3, num_layers=2, arch="prefix-mlp")
    p, tokens, hidden, tree = first_tree(model, "hydra", heads)
    with torch.no_grad():
        z = heads.prefix_states(hidden[None], torch.arange(len(hidden))[None])[0, -1]
    template = p.templates[3]
    got = tree.tokens.tolist()
    for node in range(1, tree.size):
        path = tree.path_to(node)                                   # root .. node
        x = torch.cat([z] + [heads.embed(torch.tensor([got[i]]))[0] for i in path[:-1]])
        with torch.no_grad():
            row = heads.head_logits(len(path) - 2, x[None])[0]
        assert got[node] == torch.topk(row, 10).indices[template.ranks[node]].item(), node
    assert len({tuple(got[i] for i in tree.path_to(n)) for n in range(tree.size)}) == tree.size
    assert p.stats()["tree_entries_dropped"] == 2 and tree.size == 62       # the 2 depth-4 entries need a 4th head


class OracleMedusa(MedusaDrafter):
    """Heads that know the greedy continuation ``future``: head k's best token is future[len(tokens) + k]."""

    def __init__(self, model, heads, future):
        super().__init__(model, heads, vocab_size(model))
        self.future = future

    def follow(self, tokens, hidden=None):
        super().follow(tokens, hidden)
        self.depth_logits = self.depth_logits.clone()
        for k in range(self.num_heads):
            if len(tokens) + k < len(self.future):
                self.depth_logits[k, self.future[len(tokens) + k]] = 1e4
        return self.depth_logits[0]


class OracleHydra(HydraDrafter):
    """Heads that know ``future``: a node whose path follows it gets the next token of ``future`` as best child."""

    def __init__(self, model, heads, future):
        super().__init__(model, heads, vocab_size(model))
        self.future = future

    def boost(self, logits: torch.Tensor, nodes: list[int]) -> torch.Tensor:
        logits = logits.clone()
        for row, node in enumerate(nodes):
            path = [node]
            while path[-1] != 0:
                path.append(self.tree_parents[path[-1]])
            toks = [self.tree_tokens[i] for i in reversed(path)]
            start = self.start - 1                                    # the root's position in future
            if toks == self.future[start:start + len(toks)] and start + len(toks) < len(self.future):
                logits[row, self.future[start + len(toks)]] = 1e4
        return logits

    def follow(self, tokens, hidden=None):
        self.start = len(tokens)
        return self.boost(super().follow(tokens, hidden)[None], [0])[0]

    def expand(self, tokens, parents, want_logits=True):
        n_old = len(self.tree_tokens)
        logits = super().expand(tokens, parents, want_logits)
        return self.boost(logits, list(range(n_old, n_old + len(tokens))))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_right_heads_are_accepted_to_full_depth(kind):
    """Through the real loop, heads that guess right make every step commit depth + 1 tokens: the fill puts each
    head's guess at the nodes its offset (token k+2 after the feature) belongs to, and greedy equals AR."""
    model = tiny_llama(vocab=64, layers=2)
    prompt = list(range(3, 20))
    ar = run_generation(model, Proposer(method_env(model)), prompt, 41).output_ids
    knobs = {"num_heads": 4} if kind == "medusa" else {"num_heads": 4, "num_layers": 2, "arch": "prefix-mlp"}
    oracle = (OracleMedusa if kind == "medusa" else OracleHydra)(model, random_heads(model, kind, **knobs), prompt + ar)
    gen = run_generation(model, proposer_for(model, kind, None, drafter=oracle), prompt, 41)
    assert gen.output_ids == ar
    assert gen.accept_lengths[:8] == [5] * 8 and sum(gen.accept_lengths) == 41


def test_hydra_prefix_cache_holds_the_committed_rows_only():
    """After every follow the prefix layer's cache holds exactly len(tokens) - 1 rows (append-only: tree rows
    never enter it), and drafting stays lossless."""
    model = tiny_llama(vocab=64, layers=2)
    prompt = list(range(3, 20))
    ar = run_generation(model, Proposer(method_env(model)), prompt, 30).output_ids
    heads = random_heads(model, "hydra", num_heads=3, num_layers=2, arch="prefix-mlp")
    drafter = HydraDrafter(model, heads, vocab_size(model))
    seen, follow = [], drafter.follow

    def recording_follow(tokens, hidden=None):
        out = follow(tokens, hidden)
        seen.append((drafter.prefix_cache.get_seq_length(), len(tokens) - 1))
        return out

    drafter.follow = recording_follow
    gen = run_generation(model, proposer_for(model, "hydra", None, drafter=drafter), prompt, 30)
    assert gen.output_ids == ar and len(seen) == sum(size > 1 for size in gen.tree_sizes) > 20
    assert all(cached == committed for cached, committed in seen) and max(gen.accept_lengths) > 1


# ---------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2_HEADS = {"medusa": {"num_heads": 4, "share_lm_head": True},
                 "hydra": {"num_heads": 2, "num_layers": 4, "arch": "mlp", "share_lm_head": True},
                 "hydra_prefix": {"num_heads": 3, "num_layers": 2, "arch": "prefix-mlp", "share_lm_head": True}}


@pytest.mark.parametrize("heads_name", list(SMOLLM2_HEADS))
def test_greedy_identical_to_ar_on_smollm2(heads_name, smollm2, task_prompts, ar_outputs):
    """Random heads (losslessness does not depend on head quality), the CPU-sized tree, a real prompt."""
    model, _, stops = smollm2
    kind = heads_name.split("_")[0]
    p = proposer_for(model, kind, random_heads(model, kind, **SMOLLM2_HEADS[heads_name]), tree_nodes=15)
    gen = run_generation(model, p, task_prompts["summarization"], 24, stops)
    assert gen.output_ids == ar_outputs["summarization"][:24], heads_name
    assert max(gen.tree_sizes) == p.templates[p.max_depth].size > 1


@pytest.mark.full
@pytest.mark.parametrize("heads_name", list(SMOLLM2_HEADS))
def test_greedy_identical_to_ar_on_two_prompts(heads_name, smollm2, task_prompts, ar_outputs):
    model, _, stops = smollm2
    kind = heads_name.split("_")[0]
    p = proposer_for(model, kind, random_heads(model, kind, **SMOLLM2_HEADS[heads_name]), tree_nodes=15)
    for task in ("summarization", "math_reasoning"):
        p.reset("question")
        assert run_generation(model, p, task_prompts[task], LOSSLESS_NEW_TOKENS, stops).output_ids == ar_outputs[task]


@pytest.mark.full
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_greedy_identical_to_ar_on_every_task_with_the_released_tree(kind, smollm2, task_prompts, ar_outputs):
    model, _, stops = smollm2
    knobs = {"num_heads": 4, "share_lm_head": True} if kind == "medusa" else \
        {"num_heads": 4, "num_layers": 4, "arch": "prefix-mlp", "share_lm_head": True}
    p = proposer_for(model, kind, random_heads(model, kind, **knobs))
    for task, prompt in task_prompts.items():  # 24 tokens: a 64-token verify costs ~3 AR steps on this CPU
        p.reset("question")
        assert run_generation(model, p, prompt, 24, stops).output_ids == ar_outputs[task][:24], task


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_exact_sampling_on_a_tiny_vocabulary(kind):
    """The drafts are top-ranked (no random draw): the shared sample-and-follow rule decides, and the first two
    committed tokens follow the target's law p(x1) p(x2 | x1) (chi-square + total variation)."""
    model = tiny_llama(vocab=6, layers=2, seed=3)
    knobs = {"num_heads": 3} if kind == "medusa" else {"num_heads": 3, "num_layers": 2, "arch": "prefix-mlp"}
    p = proposer_for(model, kind, random_heads(model, kind, seed=1, **knobs), tree_nodes=8, temperature=1.0)
    begin = p.begin

    def begin_with_features(ctx):  # the histogram helper's Context carries no features: give it the target's
        ctx.hidden = features(model, ctx.tokens[:-1])
        begin(ctx)

    p.begin = begin_with_features
    counts, exact, accepted, tree = first_two_tokens_histogram(model, p, [1, 4, 2, 5], trials=20000, seed=2)
    assert tree.kind == DETERMINISTIC and tree.size == 9
    assert accepted > 2000  # drafts were accepted: the rule's descent is exercised
    assert_same_distribution(counts, exact)


def test_one_sampled_run_on_smollm2(smollm2, task_prompts):
    model, _, stops = smollm2
    p = proposer_for(model, "medusa", random_heads(model, "medusa", num_heads=4, share_lm_head=True), tree_nodes=15,
                     temperature=1.0)
    gen = run_generation(model, p, task_prompts["qa"], 16, stops, temperature=1.0, seed=5)
    assert 1 <= gen.new_tokens <= 16 and sum(gen.accept_lengths) == gen.new_tokens and max(gen.tree_sizes) == 16


# ---------------------------------------------------------------------------------------------- training
def target_text(model, n: int, length: int, seed: int = 0) -> list[tuple]:
    """Conversations the target itself wrote (greedy from random 3-token openings): Medusa-1's labels then
    agree with the target, so its held-out accept rate can rise. Positions after the opening are 'assistant'.
    The last 2 repeat the first 2 (held out: the test checks fitting, not generalisation)."""
    g = torch.Generator().manual_seed(seed)
    convs = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (3,), generator=g)
        with torch.no_grad():
            ids = model.generate(ids[None], max_new_tokens=length - 3, do_sample=False, min_new_tokens=length - 3,
                                 pad_token_id=0)[0]
        assistant = torch.ones(length, dtype=torch.bool)
        assistant[:3] = False
        convs.append((ids, assistant))
    return convs + convs[:2]


@pytest.mark.parametrize("kind,knobs", [("medusa", ["lm_head=own", "lr=1e-2"]),
                                        ("hydra", ["hydra_arch=prefix-mlp", "num_heads=3", "dropout=0.1", "lr=3e-3"]),
                                        ("hydra", ["hydra_arch=mlp", "num_heads=2", "lm_head=own", "lr=3e-3"])])
def test_tiny_training_lowers_the_loss_and_round_trips(kind, knobs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(vocab=64, layers=2, seed=1)
    with torch.no_grad():
        model.lm_head.weight *= 30   # a peaked target (a random one is near uniform: nothing to learn)
    cfg = parse_args([f"head={kind}", "records=10", "heldout=2", "epochs=4", "warmup=4", "eval_every=20",
                      "ckpt_every=20", f"out_dir={tmp_path / 'run'}", f"save={tmp_path / kind}", "wandb=disabled",
                      *knobs])
    summary = train(cfg, model=model, label="tiny", convs=target_text(model, 10, 40))
    first, last = summary["history"][0], summary["history"][-1]
    assert summary["steps"] == 40 and last["loss"] < first["loss"] - 0.5, summary["history"]
    assert last["accept_rate"] > first["accept_rate"] + 0.05, summary["history"]
    assert len(last["accept_rate_per_head"]) == int(dict(k.split("=") for k in knobs).get("num_heads", 4))
    assert "Per head" in (tmp_path / f"{kind}.md").read_text()
    meta = json.loads((tmp_path / f"{kind}.json").read_text())
    assert meta["kind"] == kind and meta["num_heads"] == len(last["accept_rate_per_head"])
    # the checkpoint round-trips (fp16 on disk) and builds the drafter from the config keys
    loaded = load_trained_heads(tmp_path / kind, model, kind)
    trained = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["head"]
    assert set(loaded.state_dict()) == set(trained)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, trained[key].half().float())
    drafter = build_drafter({"kind": kind, "head": str(tmp_path / f"{kind}.safetensors")}, model, None, 64)
    assert isinstance(drafter, DRAFTERS[kind]) and drafter.num_heads == meta["num_heads"]


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_training_reads_what_drafting_reads(kind, monkeypatch):
    """The training terms of head k at position t (teacher-forced) are the logits the drafter gives the depth-k
    node of the chain x_{t+2}.. after root x_{t+1}, and their target is the target's prediction at t+1+k."""
    import specdec.training.train as train_module

    model = tiny_llama(vocab=64, layers=2)
    knobs = {"num_heads": 3} if kind == "medusa" else {"num_heads": 3, "num_layers": 2, "arch": "prefix-mlp"}
    heads = random_heads(model, kind, **knobs)
    ids = torch.tensor([5, 9, 3, 17, 40, 2, 33, 8, 11, 60, 7, 21])
    final = features(model, ids.tolist())
    seen, real = [], train_module.soft_ce_and_accept
    monkeypatch.setattr(train_module, "soft_ce_and_accept", lambda q, p: seen.append((q, p)) or real(q, p))
    item = {"ids": ids, "assistant": torch.ones(len(ids), dtype=torch.bool), "final": final}
    with torch.no_grad():
        train_module.multi_head_terms(heads, model.lm_head, item, "cpu", torch.float32)
        target_logits = model(ids[None]).logits[0]
    drafter = DRAFTERS[kind](model, heads, 64)
    t = 4
    drafter.begin(ids[:t + 2].tolist())
    drafted = [drafter.follow(ids[:t + 2].tolist(), final[:t + 1])]
    drafted += list(drafter.expand(ids[t + 2:t + 4].tolist(), [0, 1]))     # the chain x_{t+2}, x_{t+3}
    for k in range(3):
        draft_logits, target = seen[k]
        torch.testing.assert_close(draft_logits[t], drafted[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(target[t], target_logits[t + 1 + k], atol=1e-4, rtol=1e-4)


def test_trained_heads_refuse_another_target_or_kind(tmp_path):
    model = tiny_llama()
    save_head(MedusaHeads(model, num_heads=2), tmp_path / "m", "tiny")
    with pytest.raises(UserError, match="not hydra heads"):
        load_trained_heads(tmp_path / "m", model, "hydra")      # a medusa file asked for as hydra
    with pytest.raises(UserError, match="hidden_size"):
        load_trained_heads(tmp_path / "m", _wider(), "medusa")
    with pytest.raises(UserError, match="not found"):
        build_drafter({"kind": "medusa", "head": str(tmp_path / "none")}, model, None, 64)


def _wider():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_settings_are_one_line(tmp_path):
    model = tiny_llama()
    env = method_env(model)
    medusa_drafter = MedusaDrafter(model, MedusaHeads(model, num_heads=2), 64)
    with pytest.raises(UserError, match="use drafter=hydra"):
        build_proposer({"name": "hydra", "proposer": "hydra"}, dataclasses.replace(env, drafter=medusa_drafter))
    with pytest.raises(UserError, match="drafts with a draft model"):
        build_proposer({"name": "medusa", "proposer": "medusa"}, env)
    with pytest.raises(UserError, match="tree_nodes must be"):
        build_proposer({"name": "medusa", "proposer": "medusa", "tree_nodes": 64},
                       dataclasses.replace(env, drafter=medusa_drafter))
    with pytest.raises(UserError, match="unknown"):
        build_proposer({"name": "medusa", "proposer": "medusa", "tree": "nope"},
                       dataclasses.replace(env, drafter=medusa_drafter))
    with pytest.raises(UserError, match="lm_head"):
        parse_args(["head=medusa", "lm_head=tied"])
    medusa_drafter.follow([1, 2, 3], features(model, [1, 2]))
    assert medusa_drafter.expand([4], [0]).shape == (1, 64)     # a depth-1 node: head 1 gives its children
    with pytest.raises(UserError, match="at most 2 tokens"):  # a generic tree policy deeper than the heads
        medusa_drafter.expand([5], [1])


def test_configs_compose_with_their_drafters():
    from hydra import compose, initialize_config_dir
    from specdec import PROJECT_ROOT

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        for method in ("medusa", "medusa_cpu", "hydra", "hydra_cpu"):
            kind = method.removesuffix("_cpu")
            cfg = compose("config", overrides=[f"method={method}"])
            assert (cfg.method.name, cfg.method.proposer, cfg.drafter.kind) == (method, kind, kind)
            assert cfg.drafter.head == f"specdec/assets/{kind}-smollm2-135m" and cfg.drafter.release is None
