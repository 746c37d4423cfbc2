"""Dynamic draft trees (issue 12): the shared builder's invariants, the released budgets (EAGLE-2's
total_token counts the root), DySpec's best-first order, greedy equality with AR on SmolLM2 for every
policy x drafter, exact sampling through sampled and top-ranked trees, the EAGLE head's feature path,
the auto budget (choice, calibration, profile check) and stats vs learned state."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

import pytest
import torch

from conftest import assert_same_distribution, run_generation, tiny_llama
from specdec.verify.acceptance import make_rule
from specdec.drafters import EarlyExitDrafter, build_drafter
from specdec.drafters.eagle import EagleDrafter
from specdec.errors import UserError
from specdec.drafters.heads import EagleHead
from specdec.models import vocab_size
from specdec import EMBEDDED_MODEL, PROJECT_ROOT
from specdec.verify.proposer import Context, MethodEnv, StepResult, build_proposer
from specdec.verify.tree import DETERMINISTIC, WITHOUT_REPLACEMENT
from specdec.drafters.tree_builder import AutoBudget, Pool, run_settings, select

# Small knobs: the released defaults (60 tokens per verify) take minutes per prompt on a shared CPU.
# eagle2's budget counts the root (the release's total_token); opt_tree's nodes and dyspec's budget do not.
SMALL = {"eagle2": {"budget": 12, "depth": 3, "top_k": 4},
         "opt_tree": {"nodes": 6, "max_depth": 5},
         "dyspec": {"budget": 12, "max_depth": 5}}


def env_for(model, drafter, temperature=0.0, top_k=0, seed=0) -> MethodEnv:
    return MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=None, model=model, seed=seed,
                     drafter=drafter, temperature=temperature, top_k=top_k)


def with_profile(env, profile, max_budget: int = 64) -> MethodEnv:
    """``env`` with the run's auto-budget settings (conf/auto_budget/)."""
    return dataclasses.replace(env, auto_budget={"latency_profile": str(profile), "max_budget": max_budget})


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
    tokens_per_verify = {"eagle2": 12, "opt_tree": 7, "dyspec": 13}[name]      # root included
    assert tree.size == tokens_per_verify and tree.kind == DETERMINISTIC
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
    assert trees[True].size == 40                              # the rerank fills the budget (root included) from 52
    assert torch.bincount(trees[False].depth).tolist() == [1] + [k] * (depth + 1)


# ---------------------------------------------------------------------------------------------- greedy == AR
@pytest.fixture(scope="module")
def drafters(smollm2):
    model, _, _ = smollm2
    torch.manual_seed(0)
    return {"early_exit": EarlyExitDrafter(model, 2, vocab_size(model)),
            "eagle_random": EagleDrafter(model, EagleHead(model).eval().requires_grad_(False), vocab_size(model))}


@pytest.mark.full
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


def profile_json(tmp_path, per_token: float, name: str = "profile", **meta):
    """A hand-made latency profile: t(n) = 10 + per_token * (n - 1) ms, plus ``meta`` fields (dtype, threads, ...)."""
    ns = [1, 2, 4, 8, 16, 32, 64, 128]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**meta, "n": ns, "median_ms": [10.0 + per_token * (n - 1) for n in ns]}))
    return str(path)


def chain_pool(values):
    """A chain root -> 1 -> 2 -> ... whose node i has the cumulative value ``values[i - 1]`` (decreasing)."""
    return hand_pool([math.log(v) for v in values], list(range(len(values))))


CHAIN = [0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01]


def test_auto_budget_choose_on_a_synthetic_pool(tmp_path):
    """Flat verify cost -> every eligible node (up to max_budget); steep cost -> root only; only eligible nodes
    count; each choice lands in the ``chosen`` histogram."""
    pool = chain_pool(CHAIN)
    flat = AutoBudget(profile_json(tmp_path, 0.0, "flat"), 8)
    assert flat.choose(pool) == 8
    assert AutoBudget(profile_json(tmp_path, 0.0, "flat"), 5).choose(pool) == 5            # capped
    pool.eligible = {1, 2, 3}
    assert flat.choose(pool) == 3
    pool.eligible = None
    assert AutoBudget(profile_json(tmp_path, 50.0, "steep"), 8).choose(pool) == 0         # a node costs > it gains
    assert flat.chosen == {8: 1, 3: 1}
    with pytest.raises(UserError, match="latency profile"):
        AutoBudget(str(tmp_path / "missing.json"), 8)


def test_auto_budget_calibration_moves_the_choice(tmp_path):
    """observe() learns c = (1 + accepted drafts) / (1 + summed values) and the mean draft time; rejected trees
    shrink N to the root, trees accepted beyond their values grow it, a slow drafter makes bigger trees pay;
    reset() forgets all that, reset_stats() only the histogram of choices."""
    pool = chain_pool(CHAIN)
    profile = profile_json(tmp_path, 2.0)
    auto = AutoBudget(profile, 8)
    n_prior = auto.choose(pool)
    assert auto.calibration == 1.0 and n_prior == 3
    top3, chain = pool.tree(select(pool, 3)), pool.tree(select(pool, 8))
    for _ in range(20):
        auto.observe(top3, 0, 0.0)                                       # every draft rejected
    assert math.isclose(auto.calibration, 1 / (1 + 20 * sum(CHAIN[:3])))
    assert auto.choose(pool) == 0
    auto.reset()
    assert auto.calibration == 1.0 and auto.choose(pool) == n_prior
    for _ in range(20):
        auto.observe(chain, 8, 0.0)                                      # the whole chain accepted every time
    assert math.isclose(auto.calibration, (1 + 20 * 8) / (1 + 20 * sum(CHAIN)))
    assert auto.choose(pool) > n_prior
    assert auto.chosen == {3: 2, 0: 1, 4: 1}
    calibration = auto.calibration
    auto.reset_stats()
    assert auto.chosen == {} and auto.calibration == calibration and auto.steps == 20
    slow = AutoBudget(profile, 8)
    top6 = pool.tree(select(pool, 6))
    slow.observe(top6, 3, 0.04)                                          # c stays ~1; 40 ms of drafting per step
    assert math.isclose(slow.calibration, 1.0, abs_tol=1e-6) and slow.choose(pool) > n_prior


def test_observe_records_the_calibration_table(tiny_drafter):
    """The proposer bins every verified node by its value and counts the accepted ones (the path's nodes)."""
    model, drafter = tiny_drafter
    p = proposer("eagle2", env_for(model, drafter))
    ctx = Context(tokens=[3, 17, 42, 8, 11], prompt_len=5, remaining=32)
    p.begin(ctx)
    tree = p.propose(ctx)
    path = tree.path_to(max(range(1, tree.size), key=lambda v: int(tree.depth[v])))     # root ... deepest node
    p.observe(StepResult(tree, torch.zeros(tree.size, 64), path, [0] * len(path)))
    bins = [min(int(math.exp(v) * 10), 9) for v in tree.meta["logvalue"][1:]]
    stats = p.stats()
    assert stats["calibration_nodes"] == [bins.count(b) for b in range(10)]
    assert stats["calibration_accepted"] == [sum(bins[v - 1] == b for v in path[1:]) for b in range(10)]
    assert stats["tokens_per_verify"] == tree.size == SMALL["eagle2"]["budget"]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reset_stats_zeroes_the_stats_and_keeps_learned_state(name, tiny_drafter, tmp_path):
    """Warm-up then ``reset_stats()`` (what the runner does when warm-up state is kept): every counter
    ``stats()`` reports is zero, the auto budget's calibration is kept; ``reset(scope)`` never touches stats."""
    model, drafter = tiny_drafter
    profile = profile_json(tmp_path, 0.01)                               # cheap nodes: N > 0 on a weak drafter
    p = proposer(name, with_profile(env_for(model, drafter), profile, 12), budget="auto")
    prompt = [3, 17, 42, 8, 11]
    run_generation(model, p, prompt, 16)
    stats = p.stats()
    assert stats["tokens_per_verify"] > 1 and stats["proposer_ms_per_step"] > 0 and stats["draft_forwards"] > 0
    assert sum(stats["calibration_nodes"]) > 0 and stats["auto_budget_chosen"]
    for scope in ("turn", "question"):
        p.reset(scope)
    assert p.stats() == stats
    learned = (p.auto.accepted, p.auto.predicted, p.auto.draft_seconds, p.auto.steps)
    assert learned[-1] > 0
    p.reset_stats()
    zeroed = p.stats()
    assert zeroed["tokens_per_verify"] == zeroed["pool_nodes_per_step"] == zeroed["proposer_ms_per_step"] == 0
    assert zeroed["draft_forwards"] == 0 and zeroed["auto_budget_chosen"] == {}
    assert not any(zeroed["calibration_nodes"]) and not any(zeroed["calibration_accepted"])
    assert (p.auto.accepted, p.auto.predicted, p.auto.draft_seconds, p.auto.steps) == learned
    assert zeroed["auto_calibration"] == stats["auto_calibration"]
    run_generation(model, p, prompt, 16)
    stats = p.stats()
    p.reset("run")                                                       # forgets the calibration, not the stats
    assert p.auto.calibration == 1.0 and p.auto.steps == 0
    assert {k: v for k, v in p.stats().items() if k != "auto_calibration"} == \
           {k: v for k, v in stats.items() if k != "auto_calibration"}


def test_auto_budget_refuses_a_profile_of_other_settings(tmp_path, tiny_drafter):
    """A profile measured with another dtype, thread count, back end, device or model is refused in one line
    naming the fields; a matching one (model named as the profile and the run each record it) is accepted."""
    model, drafter = tiny_drafter
    run = run_settings(model.device, model)
    assert run["dtype"] == "float32" and run["backend"] == "eager" and run["threads"] == torch.get_num_threads()
    run["model"] = "/home/u/.cache/specdec/models/SmolLM2-135M-Instruct.Q4_1"   # where load_model reads the GGUF
    same = {k: run[k] for k in ("device", "dtype", "backend", "threads")}
    embedded = EMBEDDED_MODEL
    AutoBudget(profile_json(tmp_path, 1.0, "ok", model=embedded, **same), 8, run)
    for field, other in (("dtype", "bfloat16"), ("threads", run["threads"] + 1), ("backend", "onednn"),
                         ("device", "cuda"), ("model", "HuggingFaceTB/SmolLM2-360M-Instruct")):
        path = profile_json(tmp_path, 1.0, field, **{"model": embedded, **same, field: other})
        with pytest.raises(UserError) as err:
            AutoBudget(path, 8, run)
        message = str(err.value)
        assert "\n" not in message and f"{field} {other} (profile) vs {run[field]} (run)" in message
    with pytest.raises(UserError, match=r"dtype float16 \(profile\) vs float32 \(run\); threads"):
        AutoBudget(profile_json(tmp_path, 1.0, "two", **{**same, "dtype": "float16", "threads": 999}), 8, run)
    # through the method: the proposer reads the run's settings from its MethodEnv
    env = env_for(model, drafter)
    onednn = profile_json(tmp_path, 1.0, "b", **{**same, "backend": "onednn"})
    with pytest.raises(UserError, match="backend onednn"):
        proposer("eagle2", with_profile(env, onednn), budget="auto")
    assert proposer("eagle2", with_profile(env, profile_json(tmp_path, 1.0, "m", **same)), budget="auto").auto


def test_auto_budget_lossless_and_recorded(tmp_path, drafters, smollm2, task_prompts, ar_outputs):
    model, _, stops = smollm2
    p = proposer("eagle2", with_profile(env_for(model, drafters["early_exit"]), profile_json(tmp_path, 0.5), 24),
                 budget="auto")
    gen = run_generation(model, p, task_prompts["summarization"], 24, stops)
    assert gen.output_ids == ar_outputs["summarization"][:24]
    chosen = p.stats()["auto_budget_chosen"]                 # eagle2: tokens per verify (root included), as budget
    drafted = sum(24 - sum(gen.accept_lengths[:i]) > 1 for i in range(gen.steps))  # the last token: root only
    assert sum(chosen.values()) == drafted and all(1 <= int(n) <= 24 for n in chosen)
    assert max(gen.tree_sizes) <= max(map(int, chosen))


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

    def reset_stats(self):
        pass


class LoggingPathDrafter(PathDrafter):
    """Records every drafter forward: the draft paths (after the prompt) it was fed, one list per forward."""

    def __init__(self, *args, prompt_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_len, self.forwards = prompt_len, []

    def expand(self, tokens, parents):
        out = super().expand(tokens, parents)
        self.forwards.append([self.paths[-len(tokens) + i][self.prompt_len:] for i in range(len(tokens))])
        return out


def method_yaml(name: str) -> dict:
    """A method's knobs as conf/method/<name>.yaml sets them (without the Hydra keys)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "method" / f"{name}.yaml"))
    return {k: v for k, v in cfg.items() if k != "defaults"}


@pytest.mark.parametrize("name,tokens", [("eagle2", 60), ("opt_tree", 51), ("dyspec", 60)])
def test_default_budgets_match_the_releases(name, tokens):
    """With the YAML defaults and a large enough pool, a verify forward carries: EAGLE-2 total_token = 60 tokens
    (59 drafts + root, SafeAILab/EAGLE cnets1.py keeps total_tokens - 1 drafts), OPT-Tree --nodes 50 drafts + root,
    DySpec 59 drafts + root (matched to EAGLE-2)."""
    drafter = PathDrafter(64, seed=5, sharpness=1.0)
    env = MethodEnv(vocab_size=64, device=torch.device("cpu"), tokenizer=None, drafter=drafter)
    p = build_proposer(method_yaml(name), env)
    ctx = Context(tokens=[1, 2, 3], prompt_len=3, remaining=64)
    p.begin(ctx)
    tree = p.propose(ctx)
    assert tree.size == tokens
    assert p.stats()["budget_counts"] == ("tokens per verify (root included)" if name == "eagle2"
                                          else "draft nodes (root excluded)")


def brute_force_best_first(drafter: PathDrafter, prompt, max_depth: int) -> list[tuple]:
    """Every draft path of depth <= max_depth, by decreasing value (sum of the draft's log q along the path)."""
    values, frontier = {}, [()]
    for _ in range(max_depth):
        nxt = []
        for path in frontier:
            logq = torch.log_softmax(drafter.logits(tuple(prompt) + path).float(), -1).tolist()
            for tok, lq in enumerate(logq):
                values[path + (tok,)] = values.get(path, 0.0) + lq
                nxt.append(path + (tok,))
        frontier = nxt
    return sorted(values, key=lambda path: -values[path])


def test_dyspec_default_is_pure_best_first():
    """band 0 (default): one drafter forward per popped node, the nodes expanded in exactly the order of a
    brute-force best-first search, and the tree = the top-budget paths by value. band > 0 batches forwards
    and still returns a connected tree of budget drafts. Runs are labelled as a reconstruction."""
    prompt, budget, depth = [1, 2], 20, 3
    drafter = LoggingPathDrafter(5, seed=7, sharpness=2.0, prompt_len=len(prompt))
    env = MethodEnv(vocab_size=5, device=torch.device("cpu"), tokenizer=None, drafter=drafter)
    p = build_proposer({"name": "dyspec", "proposer": "dyspec", "budget": budget, "max_depth": depth}, env)
    ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=32)
    p.begin(ctx)
    tree = p.propose(ctx)
    order = brute_force_best_first(drafter, prompt, depth)
    tokens = tree.tokens.tolist()
    kept = {tuple(tokens[v] for v in tree.path_to(n)[1:]) for n in range(1, tree.size)}
    assert kept == set(order[:budget])
    expected = [path for path in order[:budget - 1] if len(path) < depth]  # the last pop is never expanded
    assert drafter.forwards == [[path] for path in expected]
    stats = p.stats()
    assert "(reconstruction)" in stats["label"] and stats["expansion"] == "best-first"

    banded = LoggingPathDrafter(5, seed=7, sharpness=2.0, prompt_len=len(prompt))
    env = MethodEnv(vocab_size=5, device=torch.device("cpu"), tokenizer=None, drafter=banded)
    p = build_proposer({"name": "dyspec", "proposer": "dyspec", "budget": budget, "max_depth": depth, "band": 0.9}, env)
    p.begin(ctx)
    tree = p.propose(ctx)
    assert tree.size == budget + 1 and max(map(len, banded.forwards)) > 1 and len(banded.forwards) < len(expected)


def two_token_histogram(p, draft, target, prompt, trials, temperature=1.0, top_k=0):
    """Counts [V, V] of the first two committed tokens, the tree REDRAWN every trial (sampled trees are
    exact only marginally over their draws), and the exact law p(x1) p(x2 | x1)."""
    from specdec.verify.acceptance import processed_probs

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
    knobs = {"dyspec": {"budget": 5, "max_depth": 3},
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
