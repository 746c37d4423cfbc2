"""Token Recycling (methods/recycle.py): template constants, breadth-first fill, table update,
reset policies, knob validation, greedy equality with AR on SmolLM2, sampling exactness on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from conftest import LOSSLESS_NEW_TOKENS, method_env, run_generation, tiny_llama
from methods.recycle import (CHILDREN_2_2_2, TokenRecycling, expand_children, last_occurrence,
                             load_template, nested_subset)
from specdec.errors import UserError
from specdec.verify.proposer import Context, MethodEnv, StepResult, build_proposer
from specdec.verify.target import Target
from specdec.verify.tree import DraftTree

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: oversubscribed intra-op threads make the model tests ~7x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_env(vocab: int = 40) -> MethodEnv:
    return MethodEnv(vocab_size=vocab, device=torch.device("cpu"), tokenizer=None)


def random_table(tr: TokenRecycling, seed: int = 0) -> None:
    """Fill the table with rows of distinct random ids (as top-k rows are)."""
    g = torch.Generator().manual_seed(seed)
    V = tr.table.shape[0]
    rows = torch.stack([torch.randperm(V, generator=g)[: tr.k] for _ in range(V)])
    tr.table.copy_(rows.to(tr.table.dtype))


# ---------------------------------------------------------------------------- template
def test_template_2_2_2_constants():
    tpl = load_template("2.2.2", None, "bfs", k=8)
    depth = tpl.depth.tolist()
    assert tpl.size == 81 and max(depth) == 6
    assert [depth.count(d) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    assert tpl.bounds == [1, 9, 30, 55, 70, 78, 81]
    leaves = [i for i in range(tpl.size) if not tpl.children[i]]
    assert len(leaves) == 40
    assert [sum(depth[i] == d for i in leaves) for d in range(1, 7)] == [0, 7, 15, 9, 6, 3]
    assert tpl.max_rank == 7
    assert all(0 <= p < i for i, p in enumerate(tpl.parent_list[1:], start=1))
    assert depth == sorted(depth)  # BFS: the level fill needs non-decreasing depth
    paths = tpl.leaf_paths()
    assert paths.shape == (40, 7) and (paths[:, 0] == 0).all()
    assert ((paths == -1).sum(1) == 7 - 1 - torch.tensor([depth[i] for i in leaves])).all()
    # node order = (depth, lexicographic rank path), e.g. node 9 is "00", node 17 is "10"
    assert tpl.paths[1:9] == [(r,) for r in range(8)]
    assert tpl.paths[9] == (0, 0) and tpl.paths[17] == (1, 0) and tpl.paths[80] == (0, 0, 0, 1, 0, 0)
    # siblings carry ranks 0..n-1, as the children table says
    for parent, n in CHILDREN_2_2_2.items():
        kids = [tpl.paths[c] for c in tpl.children[tpl.paths.index(parent)]]
        assert kids == [parent + (r,) for r in range(n)]


def test_nested_subsets():
    paths = expand_children(CHILDREN_2_2_2)
    deep = nested_subset(paths, 12, "rank_sum")
    assert deep == [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0),
                    (1,), (0, 1), (1, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    assert nested_subset(paths, 8, "bfs") == [(r,) for r in range(8)]
    for order in ("bfs", "rank_sum"):
        for n in range(1, 81):
            kept = set(nested_subset(paths, n, order))
            assert len(kept) == n and all(p[:-1] in kept or len(p) == 1 for p in kept), (order, n)
    sizes = {n: load_template("2.2.2", n, "rank_sum", 8).size for n in (8, 16, 32, 80)}
    assert sizes == {8: 9, 16: 17, 32: 33, 80: 81}
    assert load_template("2.2.2", 6, "rank_sum", 8).bounds == [1, 2, 3, 4, 5, 6, 7]  # a chain of 6
    with pytest.raises(ValueError, match="tree_nodes"):
        load_template("2.2.2", 81, "bfs", 8)
    with pytest.raises(ValueError, match="tree_order"):
        load_template("2.2.2", 8, "dfs", 8)


def test_k_smaller_than_template_rank_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rank 7.*k=7"):
        TokenRecycling(toy_env(), k=7)
    assert TokenRecycling(toy_env(), k=4, tree_nodes=6, tree_order="rank_sum").template.max_rank == 0
    wide = tmp_path / "wide.txt"
    wide.write_text("0 9\n")
    with pytest.raises(ValueError, match="rank 9"):
        TokenRecycling(toy_env(), k=8, tree=str(wide))
    with pytest.raises(UserError, match="rank 7"):  # the same error, as the run's config check reports it
        build_proposer({"name": "recycle", "proposer": "recycle", "k": 4}, toy_env())


def test_template_files(tmp_path):
    full = load_template("2.2.2", None, "bfs", 8)
    as_list = tmp_path / "t.json"
    as_list.write_text(json.dumps([list(p) for p in full.paths[1:] if p not in ((0,), (0, 0))]))  # prefixes re-added
    adj = {str(i): kids for i, kids in enumerate(full.children)}  # SAM-Decoding's tree_adj format
    as_adj = tmp_path / "adj.json"
    as_adj.write_text(json.dumps({"tree_adj": adj}))
    as_text = tmp_path / "t.txt"
    as_text.write_text("# leaf paths\n" + "\n".join(" ".join(map(str, full.paths[i])) for i in range(81)
                                                     if not full.children[i]))
    for f in (as_list, as_adj, as_text):
        assert load_template(str(f), None, "bfs", 8).paths == full.paths, f.name
    with pytest.raises(ValueError, match="neither a template name"):
        load_template("no_such_tree", None, "bfs", 8)


# ---------------------------------------------------------------------------- fill
def reference_fill(table: torch.Tensor, paths: list[tuple[int, ...]], root: int) -> list[int]:
    """Per node, straight from the definition: token(path) = A[token(path[:-1]), path[-1]]."""
    def token(path):
        return root if not path else int(table[token(path[:-1]), path[-1]])
    return [token(p) for p in paths]


@pytest.mark.parametrize("dtype", ["int64", "int32"])
@pytest.mark.parametrize("nodes,order", [(None, "bfs"), (16, "rank_sum"), (24, "bfs")])
def test_breadth_first_fill_matches_reference(dtype, nodes, order):
    tr = TokenRecycling(toy_env(40), table_dtype=dtype, tree_nodes=nodes, tree_order=order)
    random_table(tr, seed=3)
    for root in (0, 7, 39):
        tree = tr.propose(Context(tokens=[5, root], prompt_len=2, remaining=10))
        assert tree.tokens.dtype == torch.long
        assert tree.tokens.tolist() == reference_fill(tr.table, tr.template.paths, root)
        assert torch.equal(tree.parents, tr.template.parents)


def test_cached_tree_buffers_equal_fresh_ones():
    """propose() hands over precomputed depth/ancestors; they must equal what DraftTree would build."""
    tr = TokenRecycling(toy_env(40), dedup_siblings=True)
    random_table(tr, seed=1)
    tr.table[11, 3] = tr.table[11, 1]  # root 11: children of rank 1 and 3 repeat -> the pruned path
    for root in (11, 12):
        tree = tr.propose(Context(tokens=[root], prompt_len=1, remaining=10))
        fresh = DraftTree(tree.tokens.clone(), tree.parents.clone())
        assert torch.equal(tree.depth, fresh.depth) and torch.equal(tree.ancestors, fresh.ancestors)
        assert tree.children == fresh.children and tree.parent_list == fresh.parent_list


def test_duplicate_siblings_are_pruned_with_their_subtree():
    tr = TokenRecycling(toy_env(40), dedup_siblings=True)
    tree = tr.propose(Context(tokens=[9], prompt_len=1, remaining=10))  # cold table: every row is 8 x token 0
    assert tree.tokens.tolist() == [9, 0, 0, 0, 0, 0, 0] and tree.parents.tolist() == [-1, 0, 1, 2, 3, 4, 5]
    random_table(tr, seed=2)
    tr.table[9, 3] = tr.table[9, 1]  # root's rank-3 child repeats its rank-1 child
    tree = tr.propose(Context(tokens=[9], prompt_len=1, remaining=10))
    removed = {i for i, p in enumerate(tr.template.paths) if p[:1] == (3,)}
    assert len(removed) == 5 and tree.size == 76  # "3" has children "30", "31"; "30" -> "300" -> "3000"
    kept = [i for i in range(81) if i not in removed]
    assert tree.tokens.tolist() == [reference_fill(tr.table, tr.template.paths, 9)[i] for i in kept]
    raw = TokenRecycling(toy_env(40))  # default: the released behaviour
    raw.table.copy_(tr.table)
    assert raw.propose(Context(tokens=[9], prompt_len=1, remaining=10)).size == 81


# ---------------------------------------------------------------------------- update
def step_of(tree: DraftTree, logits: torch.Tensor, path: list[int], final: bool = False) -> StepResult:
    return StepResult(tree, logits, path, committed=[0] * len(path), final=final)


def test_last_occurrence():
    assert last_occurrence(torch.tensor([4, 2, 4, 7, 2])).tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("update", ["all", "accepted"])
def test_update_overwrites_rows(update):
    V, k = 12, 3
    tr = TokenRecycling(toy_env(V), k=k, tree_nodes=3, tree_order="rank_sum", update=update)  # chain root -> 0 -> 00 -> 000
    tr.table.fill_(11)  # stale content that must be overwritten, not merged
    tree = DraftTree(torch.tensor([5, 6, 5, 8]), torch.tensor([-1, 0, 1, 2]))
    logits = torch.full((4, V), -10.0)
    wanted = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9], 3: [0, 10, 1]}  # top-3 per node, best first
    for node, ids in wanted.items():
        logits[node, ids] = torch.tensor([3.0, 2.0, 1.0])
    tr.observe(step_of(tree, logits, path=[0, 1]))
    table = tr.table.tolist()
    if update == "all":
        # token 5 sits at nodes 0 and 2: node 2 (the last index) wins
        assert table[5] == wanted[2] and table[6] == wanted[1] and table[8] == wanted[3]
    else:
        assert table[5] == wanted[0] and table[6] == wanted[1] and table[8] == [11] * k
    untouched = [t for t in range(V) if t not in (5, 6, 8)]
    assert all(table[t] == [11] * k for t in untouched)


EOS = 7


@pytest.mark.parametrize("tokens,committed,released", [
    ([3, 4, 5], [4, 5, EOS], True),     # the EOS is the bonus: the released loop updates, then stops
    ([3, 4, EOS], [4, EOS], False),     # the EOS among the accepted drafts: it stops before the update
    ([3, 4, 5], [4, 5], True),          # length: 1 token past max_new_tokens (released: generated - 1 > max fails)
    ([3, 4, 5], [4], False),            # length: 2 tokens past: the released loop breaks first
    ([3, 4, 5], [4, 5, 6], True),       # length reached exactly
])
def test_final_step_update_follows_the_released_loop(tokens, committed, released):
    tree = DraftTree(torch.tensor(tokens), torch.tensor([-1, 0, 1]))  # both drafts accepted: path [0, 1, 2]
    logits = torch.arange(30.0).reshape(3, 10)                          # every row's top-2: [9, 8]
    for final_update in ("released", "skip"):
        tr = TokenRecycling(toy_env(10), k=2, tree_nodes=2, tree_order="rank_sum", final_update=final_update)
        tr.stop_ids = frozenset({EOS})
        tr.observe(StepResult(tree, logits, [0, 1, 2], committed, final=True))
        assert bool(tr.table.any()) == (released and final_update == "released"), final_update
        tr.observe(StepResult(tree, logits, [0, 1, 2], committed, final=False))  # mid-generation: always
        assert all(tr.table[t].tolist() == [9, 8] for t in tokens)


def test_update_from_prefill_writes_prompt_rows():
    model = tiny_llama(vocab=32)
    env = method_env(model)
    tr = TokenRecycling(env, k=8, update_from_prefill=True)
    prompt = [3, 9, 3, 17, 5]
    tr.begin(Context(tokens=list(prompt), prompt_len=5, remaining=4))
    with torch.no_grad():
        logits = model(torch.tensor([prompt[:-1]])).logits[0]  # [4, V]
    top = torch.topk(logits, 8, dim=-1).indices
    assert tr.table[3].tolist() == top[2].tolist()  # token 3 at positions 0 and 2: position 2 wins
    assert tr.table[9].tolist() == top[1].tolist() and tr.table[17].tolist() == top[3].tolist()
    assert not tr.table[5].any()  # the root's logits are not part of the prefill
    off = TokenRecycling(env, k=8)
    off.begin(Context(tokens=list(prompt), prompt_len=5, remaining=4))
    assert not off.table.any()


# ---------------------------------------------------------------------------- reset policies
@pytest.mark.parametrize("policy,cleared_by", [("never", {"run"}), ("question", {"run", "question"}),
                                               ("turn", {"run", "question", "turn"})])
def test_reset_policies(policy, cleared_by):
    tr = TokenRecycling(toy_env(), reset=policy)
    for scope in ("turn", "question", "run"):
        tr.table.fill_(1)
        tr.reset(scope)
        assert bool((tr.table == 0).all()) == (scope in cleared_by), scope


def test_hot_start_carries_the_table_across_generations():
    model = tiny_llama(vocab=64)
    prompt = [1, 5, 9, 13, 17, 21]
    results = {}
    for policy in ("never", "turn"):
        tr = TokenRecycling(method_env(model), reset=policy, tree_nodes=32, tree_order="rank_sum")
        first = run_generation(model, tr, prompt, 24)  # run_generation calls reset("turn") first
        second = run_generation(model, tr, prompt, 24)
        assert first.output_ids == second.output_ids
        results[policy] = (first.steps, second.steps)
    # reset=turn starts cold every time: both runs take the same steps; the hot table needs fewer
    assert results["turn"][0] == results["turn"][1] == results["never"][0]
    assert results["never"][1] < results["never"][0]


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["recycle", "recycle_cpu"])
def test_method_yaml_builds(name):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml"))
    assert cfg["name"] == name and cfg["proposer"] == "recycle"
    tr = build_proposer(cfg, toy_env(49152))
    stats = tr.stats()
    assert stats["table_bytes"] == 49152 * 8 * tr.table.element_size() and stats["k"] == 8
    assert stats["vocab_size"] == 49152


def test_table_dtype_halves_memory():
    assert TokenRecycling(toy_env(1000), table_dtype="int32").stats()["table_bytes"] == 1000 * 8 * 4
    assert TokenRecycling(toy_env(1000)).stats()["table_bytes"] == 1000 * 8 * 8


@pytest.mark.full
# ---------------------------------------------------------------------------- end to end
def test_greedy_equals_ar_on_every_task(smollm2, task_prompts, ar_outputs):
    """Both shipped configs, each with one hot table across its prompts (the paper's setting). The tasks
    alternate between the full 2.2.2 tree and recycle_cpu so the test stays affordable on 2 CPU cores."""
    model, tok, stops = smollm2
    env = method_env(model, tok)
    proposers = [build_proposer(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")), env)
                 for name in ("recycle", "recycle_cpu")]
    steps = tokens = 0
    for i, (task, ids) in enumerate(task_prompts.items()):
        gen = run_generation(model, proposers[i % 2], ids, LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task
        assert sum(gen.accept_lengths) == gen.new_tokens
        steps, tokens = steps + gen.steps, tokens + gen.new_tokens
    assert proposers[0].template.size == 81 and proposers[1].template.size < 81
    assert tokens / steps > 1.0  # drafts were accepted: the equality is not vacuous


def test_sampling_matches_target_distribution():
    """Two sampled tokens through recycle's trees vs the exact joint target distribution."""
    vocab, prompt, trials = 6, [1, 4, 2], 2000
    model = tiny_llama(vocab=vocab, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # a peaked target: drafts get accepted, the table matters
    tr = TokenRecycling(method_env(model), k=4, tree_nodes=12, tree_order="rank_sum")  # ranks <= 1
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)            # [V]
        nxt = torch.softmax(model(torch.tensor([prompt + [x] for x in range(vocab)])).logits[:, -1], -1)
    exact = (first[:, None] * nxt).flatten()                                               # [V * V]
    counts = torch.zeros(vocab * vocab)
    steps = 0
    for seed in range(trials):
        gen = run_generation(model, tr, prompt, 2, temperature=1.0, seed=seed)
        counts[gen.output_ids[0] * vocab + gen.output_ids[1]] += 1
        steps += gen.steps
    assert steps < 2 * trials * 0.8  # the table was hot: many second tokens came from accepted drafts
    tv = 0.5 * (counts / trials - exact).abs().sum()
    expected_tv = 0.5 * (2 * exact * (1 - exact) / (torch.pi * trials)).sqrt().sum()  # E|mean - p|, normal approx.
    assert tv < 2 * expected_tv
    expected = exact.double() * trials
    rare = expected < 5  # pooled into one cell so the chi-square approximation holds
    observed = torch.cat([counts.double()[~rare], counts.double()[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    assert chisquare(observed.numpy(), expected.numpy() * trials / float(expected.sum())).pvalue > 1e-3


# ---------------------------------------------------------------------------- released trajectory
def released_accept_lengths(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The released recycling loop restated independently of methods/recycle.py (its control flow,
    on our verifier): a zero table; per step fill the 2.2.2 template node by node, accept the longest
    greedy match, stop before the update if the accepted path holds the EOS or ``generated - 1 >
    max_new_tokens``, rewrite every node's row (later nodes overwrite earlier ones), stop after the
    update if the bonus is the EOS. Returns accept lengths (accepted drafts + 1) per step."""
    paths = [()] + expand_children(CHILDREN_2_2_2)
    parent = [-1] + [paths.index(p[:-1]) for p in paths[1:]]
    table = torch.zeros(model.config.vocab_size, 8, dtype=torch.long)
    target = Target(model)
    target.prefill(prompt)
    root, generated, lengths = prompt[-1], 0, []
    while True:
        tokens = [root]
        for i in range(1, len(paths)):
            tokens.append(int(table[tokens[parent[i]], paths[i][-1]]))
        tree = DraftTree(torch.tensor(tokens), torch.tensor(parent))
        logits = target.score(tree)
        best = logits.argmax(-1).tolist()
        path = [0]
        while True:
            match = [c for c in range(1, len(paths)) if parent[c] == path[-1] and tokens[c] == best[path[-1]]]
            if not match:
                break
            path.append(match[0])
        target.commit(tree, path)
        lengths.append(len(path))
        generated += len(path)
        if eos in [tokens[i] for i in path] or generated - 1 > max_new_tokens:
            break
        top = torch.topk(logits, 8, dim=-1).indices
        for i, tok in enumerate(tokens):
            table[tok] = top[i]
        root = best[path[-1]]
        if root == eos:
            break
    return lengths

@pytest.mark.full

def test_dedup_siblings_changes_the_trajectory_and_false_follows_the_released_loop(smollm2, task_prompts,
                                                                                   ar_outputs):
    """First Spec-Bench writing question, zero table: ``dedup_siblings=false`` (the default) takes the
    released loop's steps; ``true`` parts from them; both equal AR."""
    model, tok, stops = smollm2
    env = method_env(model, tok)
    prompt, n = task_prompts["mt_bench"], LOSSLESS_NEW_TOKENS
    gens = {dedup: run_generation(model, TokenRecycling(env, dedup_siblings=dedup), prompt, n, stops)
            for dedup in (False, True)}
    for gen in gens.values():
        assert gen.output_ids == ar_outputs["mt_bench"]
    released = released_accept_lengths(model, prompt, n, tok.eos_token_id)
    ours = gens[False].accept_lengths
    assert len(ours) > 15 and ours[:-1] == released[:len(ours) - 1]  # the last step is cut at n tokens
    assert gens[True].accept_lengths != ours

@pytest.mark.full

def test_dedup_siblings_does_not_change_recycle_cpu(smollm2, task_prompts):
    """recycle_cpu's depth-1 tree: duplicates share the root's context, so the table and every step
    are the same with and without the dedup (it only shrinks cold forwards)."""
    model, tok, stops = smollm2
    env = method_env(model, tok)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "method" / "recycle_cpu.yaml"))
    assert cfg["dedup_siblings"] is True
    runs = {}
    for dedup in (True, False):
        tr = build_proposer({**cfg, "dedup_siblings": dedup}, env)
        runs[dedup] = [run_generation(model, tr, task_prompts[task], 32, stops) for task in ("mt_bench", "qa")]
        runs[dedup].append(tr.table.clone())
    assert [g.accept_lengths for g in runs[True][:2]] == [g.accept_lengths for g in runs[False][:2]]
    assert torch.equal(runs[True][2], runs[False][2])
    assert runs[True][0].tree_sizes[0] == 2 < runs[False][0].tree_sizes[0] == 5  # cold root row: 4 x token 0
