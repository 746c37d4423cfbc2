"""ADED (methods/aded.py, methods/_trigram.py): the tri-gram table build (counts, normalisation,
top-k pruning, a cut-off JSON corpus, the cache), the online boost, the MCTS (pUCT, reward, seeded
determinism, size limits), greedy equality with AR on real SmolLM2 prompts, and sampling exactness of
the shared rule over trees ADED proposes (synthetic target, 6-token vocabulary).

    PYTHONPATH=. .venv/bin/python -m pytest tests/test_aded.py -x -q
"""

import json
import random
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    LOSSLESS_NEW_TOKENS,
    assert_same_distribution,
    method_env,
    run_generation,
    WordTokenizer,
)
from scipy.stats import chisquare

from methods import _aded_search, _trigram
from methods._trigram import SHIFT, TrigramTable
from methods.aded import (
    REWARDS,
    Aded,
    MemoRows,
    SearchTree,
    budget_cut,
    draft_paths,
    main,
    mcts,
    reward_of,
    select_child,
)
from specdec.verify.acceptance import Sampling, sampling_processors
from specdec.verify.proposer import Context, MethodEnv, build_proposer
from specdec.verify.tree import DraftTree


WORDS = WordTokenizer(["a", "b", "c", "d", "e"])
A, B, C, D, E = range(5)


def key(a, b):
    return (a << SHIFT) | b


def write_truncated_json(path, records, tail='{"id": "cut", "conversations": [{"from": "human", "value": "a b'):
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + ",\n" + tail
    path.write_text(text)


def chat(*turns):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


# ---------------------------------------------------------------------------------------------- table build
def test_build_counts_normalises_and_tolerates_a_truncated_json(tmp_path):
    corpus = tmp_path / "corpus.json"
    write_truncated_json(corpus, [chat("a b c a b d", "a b c"), chat("e")])
    with pytest.warns(UserWarning, match="cut off after 2 complete records"):
        table, meta = _trigram.build_table(WORDS, str(corpus), progress=False)
    # documents: "a b c a b d" (triples abc, bca, cab, abd), "a b c" (abc), "e" (none)
    assert (meta["records"], meta["documents"], meta["tokens"], meta["triples"]) == (2, 3, 10, 5)
    rows = {int(k): (table["succ"][lo:hi].tolist(), table["prob"][lo:hi].tolist())
            for k, lo, hi in zip(table["keys"], table["offsets"][:-1], table["offsets"][1:])}
    assert rows.keys() == {key(A, B), key(B, C), key(C, A)}
    assert rows[key(A, B)][0] == [C, D]                      # count 2 before count 1
    assert rows[key(A, B)][1] == pytest.approx([2 / 3, 1 / 3])
    assert rows[key(B, C)] == ([A], [1.0]) and rows[key(C, A)] == ([B], [1.0])


def test_max_records_and_plain_text_and_jsonl_corpora(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("a b c\n\na b d\na b e\n")
    _, meta = _trigram.build_table(WORDS, str(text), max_records=2, progress=False)
    assert (meta["records"], meta["triples"]) == (2, 2)
    lines = tmp_path / "c.jsonl"
    lines.write_text(json.dumps({"text": "a b c d"}) + "\n" + json.dumps(chat("c d e", "a")) + "\n")
    table, meta = _trigram.build_table(WORDS, str(lines), progress=False)
    assert (meta["documents"], meta["triples"]) == (3, 3)
    assert table["keys"].tolist() == sorted([key(A, B), key(B, C), key(C, D)])


def test_top_k_pruning_keeps_the_best_successors_ties_by_id():
    # key (a, b): c x3, e x2, d x2, a x1 -> sorted c, d, e, a (d before e: equal counts, lower id)
    codes = np.array([(A << 40) | (B << 20) | t for t in [C, C, C, E, E, D, D, A]] + [(B << 40) | (C << 20) | A])
    full = _trigram.count_table(codes)
    assert full["succ"].tolist() == [C, D, E, A, A]
    pruned = _trigram.prune(full, 2)
    assert pruned["succ"].tolist() == [C, D, A] and pruned["offsets"].tolist() == [0, 2, 3]
    assert pruned["prob"].tolist() == pytest.approx([3 / 8, 2 / 8, 1.0])  # probabilities of the full row
    assert _trigram.prune(full, 12)["succ"].tolist() == full["succ"].tolist()


def test_table_cache_is_keyed_by_corpus_and_build_params(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\na b d\n")
    first = _trigram.ensure_table(tmp_path / "cache", WORDS, str(corpus), None, progress=False)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert _trigram.ensure_table(tmp_path / "cache", WORDS, str(corpus), None, progress=False) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # found, not rebuilt
    assert _trigram.ensure_table(tmp_path / "cache", WORDS, str(corpus), 1, progress=False) != first
    other = WordTokenizer(["b", "a", "c", "d", "e"])
    assert _trigram.table_dir(tmp_path / "cache", other, str(corpus), None) != first


def test_build_command_reports_the_table(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\na b d\n")
    monkeypatch.setattr("methods.aded.load_tokenizer", lambda model, cache: WORDS)
    assert main(["build", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "2 records, 2 documents, 6 tokens" in out and "1 keys, 2 entries" in out


# ---------------------------------------------------------------------------------------------- boost
def small_table() -> TrigramTable:
    codes = np.array([(A << 40) | (B << 20) | C] * 3 + [(A << 40) | (B << 20) | D])  # S[(a,b)] = {c: .75, d: .25}
    return TrigramTable(_trigram.count_table(codes))


def test_boost_adds_delta_per_triple_occurrence_caps_and_never_writes_back():
    table = small_table()
    table.boost([A, B, C, A, B, E], delta=0.04, cap=3.0)  # triples abc, bca, cab, abe
    succ, scores = table.row(A, B)
    assert succ == [C, D, E]                               # new successor appended, from 0
    assert scores == pytest.approx([0.79, 0.25, 0.04])
    assert table.row(B, C) == ([A], [pytest.approx(0.04)])  # a new key
    table.boost([A, B, C, A, B, C], delta=0.04, cap=3.0)   # abc twice in one window
    assert table.row(A, B)[1][0] == pytest.approx(0.87)
    for _ in range(200):
        table.boost([A, B, C], delta=0.04, cap=3.0)
    assert table.row(A, B)[1][0] == 3.0
    assert table.base_row(key(A, B)) == ([C, D], [0.75, 0.25])  # the base arrays are untouched
    table.clear_boost()
    assert table.row(A, B) == ([C, D], [0.75, 0.25]) and table.row(B, C) == ([], [])


def test_reset_policy_scopes(tmp_path):
    env = MethodEnv(vocab_size=5, device=torch.device("cpu"), tokenizer=WORDS, cache_dir=str(tmp_path))
    for policy, cleared_by_question in (("never", False), ("per_question", True)):
        prop = Aded(env, empty_table=True, reset_policy=policy, sims=5)
        prop.table.boost([A, B, C], 0.04, 3.0)
        prop.reset("turn")
        assert prop.table.boosted
        prop.reset("question")
        assert (not prop.table.boosted) == cleared_by_question
        prop.table.boost([A, B, C], 0.04, 3.0)
        prop.reset("run")
        assert not prop.table.boosted


# ---------------------------------------------------------------------------------------------- MCTS
def test_puct_selection_by_hand():
    tree = SearchTree(prev=A)
    tree.add([B], -1, [0.0])
    kids = tree.kids[0] = tree.add([C, D, E], 0, [0.5, 0.3, 0.2])
    tree.visits[:] = [10, 4, 0, 5]
    tree.value[:] = [10.0, 4.0, 0.0, 5.0]
    assert select_child(tree, 0, 32.0, 8.0) == kids[1]  # the first unvisited child goes first
    tree.visits[2], tree.value[2] = 1, 1.0
    # score = 1 + (32 + ln(19/8)) * sqrt(10) * p / (1 + n): c 0.5/5 = .100, d 0.3/2 = .150, e 0.2/6 = .033
    assert select_child(tree, 0, 32.0, 8.0) == kids[1]
    tree.value[1] = 4.0 + 40.0  # a large mean value wins
    assert select_child(tree, 0, 32.0, 8.0) == kids[0]


def chain_table() -> TrigramTable:
    """a b -> c (1.0); b c -> d (.5), e (.5); c d -> a; c e -> a; d a -> b; e a -> b."""
    text = [A, B, C, D, A, B, C, E, A, B]
    codes = np.concatenate([_trigram.triple_codes(text)])
    return TrigramTable(_trigram.count_table(codes))


def test_rewards_as_released_are_constant_and_path_score_sums_trigram_scores():
    rows = MemoRows(chain_table().row)
    assert reward_of(rows, [A, B, C, D, A], "as_released") == 1.0   # S[(a,b)].get(b) etc. all miss
    assert reward_of(rows, [A, B, C, D, A], "path_score") == pytest.approx(1 + 1.0 + 0.5 + 1.0)
    search = mcts(chain_table().row, A, B, sims=30, rng=random.Random(0))
    assert search.value == [float(n) for n in search.visits]      # value sum == visits: reward 1


def test_mcts_on_a_chain_table_by_hand():
    table = chain_table()
    search = mcts(table.row, A, B, sims=3, max_keys=4, rng=random.Random(0))
    # sim 1: expand the root (a,b) -> child c, step into it; sim 2: c, expand (b,c) -> d, e, step into
    # the last added (e); sim 3: c, then the unvisited d first, expand (c,d) -> a, step into it
    assert search.tokens == [B, C, D, E, A]
    assert search.parents == [-1, 0, 1, 1, 2]
    assert search.visits == [3, 3, 1, 1, 1]
    paths = draft_paths(search, table.row, top_sequences=24)
    # [b] + argmax c; [b c] + d (first of the tied .5s); [b c d] + a; [b c e] + a; [b c d a] + b; root dropped
    assert paths == [[C], [C, D], [C, D, A], [C, E, A], [C, D, A, B]]
    assert draft_paths(search, table.row, top_sequences=2) == [[C], [C, D]]


def test_budget_cut_drops_the_last_path_with_most_distinct_tokens():
    paths = [[1, 2, 3, 4], [5, 6], [1, 2], [7, 8, 9, 10], [5, 6]]
    assert budget_cut(paths, 8) == [[1, 2, 3, 4], [5, 6], [1, 2]]   # dedup, then 12 > 8: drop [7..10]
    assert budget_cut([[1, 1, 1, 1], [2, 3]], 3) == [[1, 1, 1, 1], [2, 3]]  # counts distinct tokens only
    assert budget_cut([[1, 2], [3, 4]], 1) == []


def sharegpt_like_table(n_tokens=3000, vocab=40, seed=0) -> TrigramTable:
    rng = np.random.default_rng(seed)
    text = rng.zipf(1.5, size=n_tokens) % vocab
    return TrigramTable(_trigram.prune(_trigram.count_table(_trigram.triple_codes(text.tolist())), 12))


@pytest.mark.parametrize("reward", ["as_released", "path_score"])
def test_seeded_mcts_is_deterministic_and_respects_the_limits(reward):
    table = sharegpt_like_table()
    for prev, root in ((1, 2), (0, 1), (3, 1)):
        runs = [mcts(table.row, prev, root, sims=150, rng=random.Random(7), reward=reward) for _ in range(2)]
        assert runs[0] == runs[1]
        search = runs[0]
        assert search.visits[0] == 150 and max(search.depth) <= 3
        paths = budget_cut(draft_paths(search, table.row, 24), 64)
        assert paths and len(paths) <= 24 and all(1 <= len(p) <= 4 for p in paths)
        assert sum(len(set(p)) for p in paths) <= 64
        tree = DraftTree.from_paths(root, sorted(paths), max_nodes=64)
        assert tree.size - 1 <= 64 and int(tree.depth.max()) <= 4


def test_proposer_tree_is_a_bfs_trie_within_max_nodes(tmp_path):
    env = MethodEnv(vocab_size=64, device=torch.device("cpu"), tokenizer=WORDS, cache_dir=str(tmp_path))
    prop = Aded(env, empty_table=True, max_nodes=6)
    prop.table = sharegpt_like_table()
    from specdec.verify.proposer import Context

    ctx = Context(tokens=[5, 1, 2], prompt_len=3, remaining=10)
    tree = prop.propose(ctx)
    assert tree.kind == "deterministic" and int(tree.tokens[0]) == 2 and 1 < tree.size <= 7
    assert tree.depth.tolist() == sorted(tree.depth.tolist())
    for kids in tree.children:  # trie: siblings distinct
        assert len({int(tree.tokens[k]) for k in kids}) == len(kids)
    first = tree.tokens.tolist()
    prop.begin(ctx)
    assert prop.propose(ctx).tokens.tolist() == first  # re-seeded per (question, turn), same boost state
    assert Aded(env, empty_table=True).propose(ctx).size == 1  # nothing known: root only
    assert prop.stats()["proposes"] == 2


def test_method_yamls_build(tmp_path):
    env = MethodEnv(vocab_size=5, device=torch.device("cpu"), tokenizer=WORDS, cache_dir=str(tmp_path))
    for name in ("aded", "aded_fixed_reward", "aded_fast"):
        with open(f"conf/method/{name}.yaml") as f:
            cfg = yaml.safe_load(f)
        assert cfg["name"] == name and cfg["proposer"] == "aded"
        prop = build_proposer({**cfg, "empty_table": True}, env)
        assert isinstance(prop, Aded)
    assert prop.reward == "as_released"
    assert build_proposer({**yaml.safe_load(open("conf/method/aded_fixed_reward.yaml")), "empty_table": True},
                          env).reward == "path_score"


@pytest.mark.full
# ---------------------------------------------------------------------------------------------- SmolLM2
def test_greedy_equals_ar_on_every_task(smollm2, task_prompts, ar_outputs, tmp_path_factory):
    model, tok, stops = smollm2
    env = replace(method_env(model, tok), cache_dir=str(tmp_path_factory.mktemp("aded_cache")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prop = Aded(env, max_records=300)  # the real ShareGPT corpus, first 300 records (a few seconds)
    assert prop.table_info["records"] == 300 and prop.table_info["entries"] > 0
    steps = tokens = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: 2 threads under load run several times slower
    try:
        for task, ids in task_prompts.items():
            gen = run_generation(model, prop, ids, LOSSLESS_NEW_TOKENS, stops)
            assert gen.output_ids == ar_outputs[task], task
            steps, tokens = steps + gen.steps, tokens + gen.new_tokens
    finally:
        torch.set_num_threads(threads)
    assert tokens / steps > 1.0  # drafts were accepted: the equality is not vacuous
    assert prop.stats()["boosted_keys"] > 0


# ---------------------------------------------------------------------------------------------- sampling
V = 6
TRIALS = 30_000


def aded_trees(tmp_path, n_trees=40):
    """Trees proposed by ADED (released knobs but 30 simulations) over a 6-token corpus, many contexts."""
    words = WordTokenizer([str(i) for i in range(V)])
    rng = np.random.default_rng(0)
    corpus = tmp_path / "digits.txt"
    corpus.write_text("\n".join(" ".join(map(str, rng.zipf(1.6, 30) % V)) for _ in range(100)))
    env = MethodEnv(vocab_size=V, device=torch.device("cpu"), tokenizer=words, cache_dir=str(tmp_path))
    prop = Aded(env, corpus=str(corpus), sims=30)
    from specdec.verify.proposer import Context

    trees = []
    for _ in range(n_trees):
        tokens = rng.integers(0, V, 8).tolist()
        trees.append(prop.propose(Context(tokens=tokens, prompt_len=8, remaining=16)))
    return trees


def node_logits(tree: DraftTree, p1, p2) -> torch.Tensor:
    """float32 [T, V] target logits: log p1 at the root, log p2[x] after a depth-1 node x, log p1 deeper
    (depth >= 2 rows only shape the third token, which is not tested)."""
    depth = tree.depth.tolist()
    tokens = tree.tokens.tolist()
    rows = [np.log(p2[tokens[i]]) if depth[i] == 1 else np.log(p1) for i in range(tree.size)]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


class AcceptFirstChild(Sampling):
    """A wrong rule (always descends into the first child): the test must reject it."""

    def _follow(self, target_probs, kids, tokens):
        return kids[0], tokens[kids[0]]


def joint_counts(trees, p1, p2, rule_cls) -> tuple[np.ndarray, int]:
    """Counts [V, V] of the first two committed tokens over TRIALS verify steps (cycling the trees);
    a step that commits one token is completed by a draw from p2 (what the next step would do)."""
    rule = rule_cls(sampling_processors(1.0), torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    logits = [node_logits(t, p1, p2) for t in trees]
    counts, accepted = np.zeros((V, V)), 0
    for trial in range(TRIALS):
        tree = trees[trial % len(trees)]
        path, bonus = rule(tree, logits[trial % len(trees)])
        committed = tree.tokens[path[1:]].tolist() + [bonus]
        accepted += len(path) > 1
        if len(committed) < 2:
            committed.append(int(rng.choice(V, p=p2[committed[0]])))
        counts[committed[0], committed[1]] += 1
    return counts, accepted


def test_sampling_keeps_the_target_distribution_on_aded_trees(tmp_path):
    """Sample-and-follow (the core's rule for kind=deterministic) over trees ADED actually proposes:
    the joint of the first two tokens must be p1(x) p2(y | x) (chi-square and TV)."""
    trees = aded_trees(tmp_path)
    assert all(t.kind == "deterministic" for t in trees) and max(int(t.depth.max()) for t in trees) >= 3
    g = np.random.default_rng(3)
    p1, p2 = g.dirichlet(np.ones(V)), g.dirichlet(np.ones(V), size=V)
    exact = (p1[:, None] * p2).ravel()                                   # [V*V]
    counts, accepted = joint_counts(trees, p1, p2, Sampling)
    assert accepted > TRIALS // 2  # drafts were accepted: the walk is exercised, not bypassed
    assert_same_distribution(counts, exact)
    biased, _ = joint_counts(trees, p1, p2, AcceptFirstChild)
    assert chisquare(biased.ravel(), exact * TRIALS).pvalue < 1e-6  # the test has power


# ---------------------------------------------------------------------------------------------- compiled search
FIXTURES = Path(__file__).parent / "fixtures"


def recorded_table() -> TrigramTable:
    """The table tests/fixtures/aded_drafts.json was recorded on (zipf text over 300 ids, top-12)."""
    text = (np.random.default_rng(11).zipf(1.3, size=30000) % 300).tolist()
    return TrigramTable(_trigram.prune(_trigram.count_table(_trigram.triple_codes(text)), 12))


def reference_tree(table: TrigramTable, tokens: list[int], prop: Aded, rng: random.Random) -> DraftTree:
    """The pure-Python reference of one step after the boost (what Aded.propose ran before the kernel)."""
    search = mcts(table.row, tokens[-2], tokens[-1], prop.sims, prop.max_keys, prop.c1, prop.c2, rng, prop.reward)
    paths = budget_cut(draft_paths(search, table.row, prop.top_sequences), prop.max_nodes)
    return DraftTree.from_paths(tokens[-1], sorted(paths), max_nodes=prop.max_nodes) if paths \
        else DraftTree.root_only(tokens[-1])


@pytest.mark.parametrize("reward", ["as_released", "path_score"])
def test_compiled_search_reproduces_the_recorded_python_drafts(reward):
    """Drafts recorded from the pure-Python implementation (before the compiled kernel), released constants,
    boost on, 198 consecutive contexts: the compiled path must give every tree exactly."""
    recorded = json.loads((FIXTURES / "aded_drafts.json").read_text())[reward]
    prop = Aded(MethodEnv(vocab_size=300, device=torch.device("cpu"), tokenizer=None, seed=3), empty_table=True,
                reward=reward)
    prop.table = recorded_table()
    stream = (np.random.default_rng(12).zipf(1.3, size=200) % 300).tolist()
    assert len(recorded) == len(stream) - 2
    for n, (tokens, parents) in enumerate(recorded, start=2):
        tree = prop.propose(Context(tokens=stream[:n], prompt_len=2, remaining=64))
        assert (tree.tokens.tolist(), tree.parents.tolist()) == (tokens, parents), n
    assert sum(len(t) for t, _ in recorded) / len(recorded) > 20  # real trees, not root-only


@pytest.mark.full
def test_compiled_search_equals_the_python_reference_on_the_sharegpt_table(smollm2, task_prompts, tmp_path_factory):
    """The real table (first 300 ShareGPT records), real prompts, the boost carried along, both rewards:
    the same trees, and the rollouts leave the random.Random stream in the same state."""
    _, tok, _ = smollm2
    env = MethodEnv(vocab_size=49152, device=torch.device("cpu"), tokenizer=tok,
                    cache_dir=str(tmp_path_factory.mktemp("aded_cache")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prop = Aded(env, max_records=300)
    compared = 0
    for reward in REWARDS:
        prop.reward = reward
        prop.reset("run")
        prop.begin(Context(tokens=[0], prompt_len=1, remaining=1, seed=0))
        rng = random.Random(prop.stream_seed(0))
        for ids in task_prompts.values():
            for n in range(max(3, len(ids) - 25), len(ids) + 1):
                tree = prop.propose(Context(tokens=ids[:n], prompt_len=n, remaining=64))  # boosts, then searches
                ref = reference_tree(prop.table, ids[:n], prop, rng)
                assert (tree.tokens.tolist(), tree.parents.tolist()) == (ref.tokens.tolist(), ref.parents.tolist())
                compared += tree.size > 1
        assert prop.stream.to_random().getstate() == rng.getstate()
    assert compared > 100


def test_mersenne_twister_stream_matches_random_random():
    rng = random.Random(1234)
    stream = _aded_search.MTStream(rng)
    draws = [_aded_search._random(stream.mt, stream.pos) for _ in range(2000)]  # crosses several twists
    assert draws == [rng.random() for _ in range(2000)]
    assert stream.to_random().getstate() == rng.getstate()
