"""Dynamic draft trees (issue 12; specs/dynamic_trees.md): the shared builder's invariants, greedy
equality with AR on SmolLM2 for every policy x drafter, exact sampling through sampled and top-ranked
trees, the EAGLE head's feature path, and the auto budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_same_distribution, run_generation, tiny_llama
from specdec.acceptance import make_rule
from specdec.drafter import EarlyExitDrafter, build_drafter
from specdec.eagle import EagleDrafter
from specdec.errors import UserError
from specdec.heads import EagleHead
from specdec.models import vocab_size
from specdec.proposer import Context, MethodEnv, build_proposer
from specdec.tree import DETERMINISTIC, WITHOUT_REPLACEMENT
from specdec.tree_builder import AutoBudget, Pool, select

# Small knobs: the released defaults (N = 60) take minutes per prompt on a shared CPU.
SMALL = {"eagle2": {"budget": 12, "depth": 3, "top_k": 4},
         "opt_tree": {"nodes": 6, "max_depth": 5},
         "dyspec": {"budget": 12, "threshold": 0.3, "max_depth": 5}}


def env_for(model, drafter, temperature=0.0, top_k=0, seed=0) -> MethodEnv:
    return MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=None, model=model, seed=seed,
                     drafter=drafter, temperature=temperature, top_k=top_k)


def proposer(name, env, **knobs):
    p = build_proposer({"name": name, "proposer": name, **SMALL[name], **knobs}, env)
    p.reset("run")
    return p


# ---------------------------------------------------------------------------------------------- builder
def hand_pool(values, parents):
    """A pool from hand-made log-values (node i+1 has parent parents[i]); tokens = node ids."""
    pool = Pool.start(None, root=0)
    for i, (value, parent) in enumerate(zip(values, parents), start=1):
        pool.add(i, parent, value)
    return pool


def test_select_budget_ties_and_closure():
    # 1 -> {2, 3}, 2 -> 4; node 4 carries a (hand-made) value above its parent's: the closure must pull
    # in 2 and then drop the lowest-value leaf to stay within the budget.
    pool = hand_pool([-1.0, -3.0, -2.0, -0.5], [0, 1, 1, 2])
    assert select(pool, 2) == [1, 2]           # top-2 = {4, 1}; closure adds 2; the only leaf, 4, goes
    assert select(pool, 3) == [1, 2, 4]        # top-3 = {4, 1, 3}; closure adds 2; leaf 3 < leaf 4 goes
    # ties: equal values -> earlier recorded first; a child tied with its parent never outranks it
    pool = hand_pool([-1.0, -1.0, -1.0, -1.0], [0, 1, 0, 2])
    assert select(pool, 2) == [1, 2]
    assert select(pool, 3) == [1, 2, 3]
    for budget in range(6):
        keep = select(pool, budget)
        assert len(keep) == min(budget, 4) and all(pool.parents[v] == 0 or pool.parents[v] in keep for v in keep)


def test_tree_is_bfs_parents_first_siblings_in_recording_order():
    pool = hand_pool([-1.0, -0.5, -2.0, -0.7, -0.9], [0, 0, 1, 2, 1])
    tree = pool.tree(select(pool, 5))
    assert tree.tokens.tolist() == [0, 1, 2, 3, 5, 4]      # depth 1: 1, 2; depth 2: 1's kids 3, 5, then 2's kid 4
    assert all(0 <= p < i for i, p in enumerate(tree.parent_list[1:], start=1))
    assert tree.meta["logvalue"] == [0.0, -1.0, -0.5, -2.0, -0.9, -0.7]


@pytest.fixture(scope="module")
def tiny_drafter():
    model = tiny_llama(vocab=64, layers=2, seed=1)
    return model, EarlyExitDrafter(model, 1, vocab_size(model))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_policy_trees_budget_and_values(name, tiny_drafter):
    """Budget respected, parents first, distinct siblings, and every value = the sum of the drafter's own
    log-probs along the path (recomputed by a fresh chain forward per node)."""
    model, drafter = tiny_drafter
    p = proposer(name, env_for(model, drafter))
    prompt = [3, 17, 42, 8, 11]
    ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=32)
    p.begin(ctx)
    tree = p.propose(ctx)
    budget = SMALL[name].get("budget", SMALL[name].get("nodes"))
    assert 1 < tree.size <= budget + 1 and tree.kind == DETERMINISTIC
    tokens, values = tree.tokens.tolist(), tree.meta["logvalue"]
    for node in range(1, tree.size):
        assert 0 <= tree.parent_list[node] < node
        siblings = [tokens[c] for c in tree.children[tree.parent_list[node]]]
        assert len(set(siblings)) == len(siblings)
        path = [tokens[v] for v in tree.path_to(node)][1:]
        fresh = EarlyExitDrafter(model, 1, vocab_size(model))
        fresh.begin(prompt)
        logits = fresh.follow(prompt)[None]
        if len(path) > 1:
            logits = torch.cat([logits, fresh.expand(path[:-1], list(range(len(path) - 1)))])
        recomputed = torch.log_softmax(logits, -1)[torch.arange(len(path)), path].sum()
        assert math.isclose(values[node], float(recomputed), abs_tol=1e-4), (node, values[node], float(recomputed))


def test_eagle2_rerank_off_keeps_frontier_nodes_only(tiny_drafter):
    model, drafter = tiny_drafter
    ctx = Context(tokens=[5, 9, 2], prompt_len=3, remaining=32)
    trees = {}
    for rerank in (True, False):
        p = proposer("eagle2", env_for(model, drafter), rerank=rerank, budget=40)
        p.begin(ctx)
        trees[rerank] = p.propose(ctx)
    k, depth = SMALL["eagle2"]["top_k"], SMALL["eagle2"]["depth"]
    assert trees[False].size - 1 == k * (depth + 1)            # k frontier nodes per depth
    assert trees[True].size - 1 == 40                          # the rerank fills the budget from k + D k^2 = 52
    assert torch.bincount(trees[False].depth).tolist() == [1] + [k] * (depth + 1)


# ---------------------------------------------------------------------------------------------- greedy == AR
@pytest.fixture(scope="module")
def drafters(smollm2):
    model, _, _ = smollm2
    torch.manual_seed(0)
    return {"early_exit": EarlyExitDrafter(model, 2, vocab_size(model)),
            "eagle_random": EagleDrafter(model, EagleHead(model).eval().requires_grad_(False), vocab_size(model))}


@pytest.mark.parametrize("drafter", ["early_exit", "eagle_random"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_greedy_identical_to_ar(name, drafter, drafters, smollm2, task_prompts, ar_outputs):
    model, _, stops = smollm2
    p = proposer(name, env_for(model, drafters[drafter]))
    for task in ("mt_bench", "math_reasoning"):
        gen = run_generation(model, p, task_prompts[task], 24, stops)
        assert gen.output_ids == ar_outputs[task][:24], (name, drafter, task)
    stats = p.stats()
    assert stats["tokens_per_verify"] > 1 and sum(stats["calibration_nodes"]) > 0
    assert stats["label"] == (f"{p.paper} tree policy (drafter: early_exit)" if drafter == "early_exit" else p.paper)


def profile_json(tmp_path, per_token: float):
    ns = [1, 2, 4, 8, 16, 32, 64, 128]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"n": ns, "median_ms": [10.0 + per_token * (n - 1) for n in ns]}))
    return str(path)


def test_auto_budget_choice(tmp_path):
    """N maximises (1 + c * top-N value sum) / (t_draft + t(N + 1)); steep cost -> small N, flat -> large N."""
    pool = hand_pool([math.log(v) for v in (0.9, 0.5, 0.1, 0.01)], [0, 1, 2, 3])
    gains = [0, 0.9, 1.4, 1.5, 1.51]                             # top-N value sums, N = 0..4
    chosen = {}
    for per_token in (0.1, 1.0, 3.0, 8.0):
        auto = AutoBudget(profile_json(tmp_path, per_token), 8)
        ts = [10.0 + per_token * n for n in range(5)]            # t(N + 1) in ms
        chosen[per_token] = auto.choose(pool)
        assert chosen[per_token] == int(np.argmax([(1 + g) / t for g, t in zip(gains, ts)]))
        assert auto.choose(pool) == chosen[per_token] and auto.chosen == {chosen[per_token]: 2}
    assert chosen[0.1] == 3 and chosen[8.0] == 1                 # cheap wide forwards -> a bigger tree
    with pytest.raises(UserError, match="latency profile"):
        AutoBudget(str(tmp_path / "missing.json"), 8)


def test_auto_budget_lossless_and_recorded(tmp_path, drafters, smollm2, task_prompts, ar_outputs):
    model, _, stops = smollm2
    p = proposer("eagle2", env_for(model, drafters["early_exit"]), budget="auto",
                 latency_profile=profile_json(tmp_path, 0.5), auto_max_budget=24)
    gen = run_generation(model, p, task_prompts["summarization"], 24, stops)
    assert gen.output_ids == ar_outputs["summarization"][:24]
    chosen = p.stats()["auto_budget_chosen"]
    drafted = sum(24 - sum(gen.accept_lengths[:i]) > 1 for i in range(gen.steps))  # the last token: root only
    assert sum(chosen.values()) == drafted and all(0 <= int(n) <= 24 for n in chosen)
    assert max(gen.tree_sizes) - 1 <= max(map(int, chosen))


# ---------------------------------------------------------------------------------------------- sampling
class PathDrafter:
    """A drafter whose logits are a fixed random function of the token path (no model): fast exact tests."""

    kind = "path"
    wants_hidden = False

    def __init__(self, vocab: int, seed: int, sharpness: float = 2.0):
        self.vocab, self.seed, self.sharpness = vocab, seed, sharpness
        self.tree_tokens: list[int] = []
        self.memo: dict[tuple, torch.Tensor] = {}

    def logits(self, path) -> torch.Tensor:
        path = tuple(path)
        if path not in self.memo:
            g = torch.Generator().manual_seed(hash((self.seed, path)) % (2 ** 31))
            self.memo[path] = self.sharpness * torch.randn(self.vocab, generator=g)
        return self.memo[path]

    def begin(self, tokens, hidden=None):
        pass

    def follow(self, tokens, hidden=None):
        self.paths = [tuple(tokens)]
        self.tree_tokens = [tokens[-1]]
        return self.logits(self.paths[0])

    def expand(self, tokens, parents):
        rows = []
        for tok, parent in zip(tokens, parents):
            self.paths.append(self.paths[parent] + (int(tok),))
            self.tree_tokens.append(int(tok))
            rows.append(self.logits(self.paths[-1]))
        return torch.stack(rows)

    def stats(self):
        return {}


def two_token_histogram(p, draft, target, prompt, trials, temperature=1.0, top_k=0):
    """Counts [V, V] of the first two committed tokens, the tree REDRAWN every trial (sampled trees are
    exact only marginally over their draws), and the exact law p(x1) p(x2 | x1)."""
    from specdec.acceptance import processed_probs

    V = draft.vocab
    rule = make_rule(temperature, top_k, generator=torch.Generator().manual_seed(1))
    memo = {}

    def prob(path) -> np.ndarray:  # float64 [V], summing to 1 for numpy
        if path not in memo:
            p = processed_probs(target.logits(path)[None], temperature, top_k)[0].double().numpy()
            memo[path] = p / p.sum()
        return memo[path]

    rng = np.random.default_rng(0)
    counts, kinds = np.zeros((V, V)), set()
    for _ in range(trials):
        ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=8)
        tree = p.propose(ctx)
        kinds.add(tree.kind)
        tokens = tree.tokens.tolist()
        logits = torch.stack([target.logits(tuple(prompt) + tuple(tokens[v] for v in tree.path_to(n)[1:]))
                              for n in range(tree.size)])
        path, bonus = rule(tree, logits)
        committed = tree.tokens[path[1:]].tolist() + [bonus]
        if len(committed) == 1:
            committed.append(int(rng.choice(V, p=prob(tuple(prompt) + (committed[0],)))))
        counts[committed[0], committed[1]] += 1
    p1 = prob(tuple(prompt))
    exact = np.stack([p1[x] * prob(tuple(prompt) + (x,)) for x in range(V)])
    return counts, exact / exact.sum(), kinds


@pytest.mark.parametrize("name,top_k,kind", [("dyspec", 0, WITHOUT_REPLACEMENT), ("dyspec", 3, WITHOUT_REPLACEMENT),
                                             ("eagle2", 0, DETERMINISTIC), ("opt_tree", 0, DETERMINISTIC)])
def test_sampling_is_exact_through_the_tree(name, top_k, kind):
    V = 4
    draft, target = PathDrafter(V, seed=1, sharpness=1.5), PathDrafter(V, seed=2, sharpness=1.5)
    env = MethodEnv(vocab_size=V, device=torch.device("cpu"), tokenizer=None, drafter=draft, seed=3,
                    temperature=1.0, top_k=top_k)
    knobs = {"dyspec": {"budget": 5, "threshold": 0.5, "max_depth": 3},
             "eagle2": {"budget": 5, "depth": 2, "top_k": 2}, "opt_tree": {"nodes": 3, "max_depth": 3}}[name]
    p = build_proposer({"name": name, "proposer": name, **knobs}, env)
    p.reset("run")
    trials = 6000 if name == "dyspec" else 4000
    counts, exact, kinds = two_token_histogram(p, draft, target, [1, 2], trials=trials, top_k=top_k)
    assert kinds == {kind}
    support = exact > 0                                          # top-k leaves cells impossible
    assert counts[~support].sum() == 0
    assert_same_distribution(counts[support], exact[support], max_tv=0.04)


# ---------------------------------------------------------------------------------------------- EAGLE path
def test_eagle_feature_path_equals_recomputation(drafters, smollm2, task_prompts):
    """After a tree-verified generation, the loop's features equal the target's own last hidden states
    of the whole sequence, and the head's cached rows give the same root logits as a fresh head pass."""
    model, _, stops = smollm2
    drafter = drafters["eagle_random"]
    p = proposer("eagle2", env_for(model, drafter))
    seen = {}
    p.end = lambda ctx: seen.update(tokens=list(ctx.tokens), hidden=ctx.hidden)
    run_generation(model, p, task_prompts["qa"], 20, stops)
    tokens, hidden = seen["tokens"], seen["hidden"]
    with torch.no_grad():
        ids = torch.tensor([tokens[:-1]])
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]          # [L-1, H]
        assert hidden.shape == ref.shape
        torch.testing.assert_close(hidden, ref, atol=2e-4, rtol=1e-4)
        root_logits = drafter.follow(tokens, hidden)
        head = drafter.head
        fresh = head((ref[None], torch.tensor([tokens[1:]])), torch.arange(len(tokens) - 1)[None], None, None)[0]
        torch.testing.assert_close(root_logits, drafter.lm_head(fresh[-1:])[0].float(), atol=2e-3, rtol=1e-3)


def test_eagle_drafter_missing_checkpoint_is_one_clear_error(smollm2, tmp_path):
    model, tok, _ = smollm2
    with pytest.raises(UserError, match="not found"):
        build_drafter({"kind": "eagle", "head": str(tmp_path / "none.safetensors")}, model, tok, vocab_size(model))
