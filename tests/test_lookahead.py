"""Alipay Lookahead (methods/lookahead.py): trie bookkeeping by hand, retrieval order and layouts,
greedy equality with AR on real SmolLM2 prompts, and sampling exactness on a tiny model."""

import json
import random

import pytest
import torch
from conftest import (
    LOSSLESS_NEW_TOKENS,
    assert_same_distribution,
    first_two_tokens_histogram,
    method_env,
    run_generation,
    tiny_llama,
)

from methods.lookahead import Lookahead, TokenTrie, TrieForest, par_layout, read_answers
from specdec.verify.acceptance import Greedy
from specdec.verify.proposer import Context, build_proposer
from specdec.verify.target import Target
from specdec.verify.tree import DraftTree

W = 1e-4  # released output_weight


def trie_paths(nodes, prefix=()):
    """{token path: (input freq, output freq)} of every node below ``nodes``."""
    out = {}
    for tok, node in nodes.items():
        path = prefix + (tok,)
        out[path] = (node.inp, node.out)
        out.update(trie_paths(node.children, path))
    return out


# ------------------------------------------------------------------ insertion, elimination, pruning
def test_prompt_insertion_counts_every_window():
    forest = TrieForest()
    forest.put([1, 2, 3, 1, 2, 4], window=3, output=False)
    # key 1: windows [2,3,1] and [2,4]; key 2: [3,1,2] and [4]; key 3: [1,2,4]; the last token is no key
    assert trie_paths(forest.mem[1].nodes) == {(2,): (2, 0), (2, 3): (1, 0), (2, 3, 1): (1, 0), (2, 4): (1, 0)}
    assert trie_paths(forest.mem[2].nodes) == {(3,): (1, 0), (3, 1): (1, 0), (3, 1, 2): (1, 0), (4,): (1, 0)}
    assert trie_paths(forest.mem[3].nodes) == {(1,): (1, 0), (1, 2): (1, 0), (1, 2, 4): (1, 0)}
    assert set(forest.mem) == {1, 2, 3}
    assert forest.mem[1].n_node == 4 and forest.mem[1].n_output_node == 0


def test_released_prompt_insertion_stops_at_the_first_eos(smollm2, task_prompts):
    model, tok, stops = smollm2
    ids = task_prompts["mt_bench"]
    cut = next(i for i, t in enumerate(ids) if t in stops)  # ChatML: the end of the system message
    assert 2 < cut < len(ids) - 2
    ctx = Context(tokens=list(ids), prompt_len=len(ids), remaining=8)

    def input_keys(insertion):
        la = Lookahead(method_env(model, tok), prompt_insertion=insertion)
        la.begin(ctx)
        return {key for key, trie in la.forest.mem.items() if any(n.inp > 0 for n in trie.nodes.values())}

    # every token but the last of the inserted list is a key; token 0 is skipped in both
    assert input_keys("released") == set(ids[1:cut - 1])
    assert input_keys("whole") == set(ids[1:-1])


def test_stream_insertion_waits_for_full_windows_and_flushes_at_the_end():
    forest = TrieForest()
    forest.stream_put([5, 6], window=3)
    assert forest.mem == {} and forest.buffer == [5, 6]
    forest.stream_put([7, 8], window=3)          # key 5 now has 3 tokens after it
    assert set(forest.mem) == {5} and forest.buffer == [6, 7, 8]
    assert trie_paths(forest.mem[5].nodes) == {(6,): (0, 1), (6, 7): (0, 1), (6, 7, 8): (0, 1)}
    forest.end_request(window=3)                  # final: shorter trailing windows, buffer cleared
    assert trie_paths(forest.mem[6].nodes) == {(7,): (0, 1), (7, 8): (0, 1)}
    assert trie_paths(forest.mem[7].nodes) == {(8,): (0, 1)}
    assert forest.buffer == [] and forest.mem[6].n_output_node == 2


def test_stop_words_are_never_stream_keys():
    forest = TrieForest(stop_words=[6])
    forest.stream_put([5, 6, 7], window=2, final=True)
    assert set(forest.mem) == {5}


def test_elimination_zeroes_prompt_counts_but_keeps_output_counts():
    forest = TrieForest()
    forest.put([1, 2, 3], window=2, output=False)
    forest.stream_put([1, 2, 9], window=2, final=False)
    assert trie_paths(forest.mem[1].nodes)[(2,)] == (1, 1)
    forest.end_request(window=2)
    paths = trie_paths(forest.mem[1].nodes)
    assert paths[(2,)] == (0, 1) and paths[(2, 3)] == (0, 0) and paths[(2, 9)] == (0, 1)
    # dead nodes are not matched: key 2 -> 3 exists but has no frequency left
    assert forest.mem[2].match([3]) == {}
    kept = TrieForest(eliminate_prompt_branches=False)
    kept.put([1, 2, 3], window=2, output=False)
    kept.end_request(window=2)
    assert trie_paths(kept.mem[1].nodes)[(2, 3)] == (1, 0)


def test_squeeze_halves_frequent_output_nodes_and_drops_the_rest():
    trie = TokenTrie(max_node=100, max_output_node=3)
    for path in ([1, 2], [1, 2], [1, 2, 3], [1, 4], [5]):
        trie.put(path, output=True)
    assert trie.n_output_node == 5  # nodes created: 1,2 | 3 | 4 | 5
    assert trie.squeeze()
    # out: 1 -> 4 (halved to 2), 1/2 -> 3 (halved to 1.5), 1/2/3 -> 1 (dropped), 1/4 -> 1, 5 -> 1 (dropped)
    assert trie_paths(trie.nodes) == {(1,): (0, 2.0), (1, 2): (0, 1.5)}
    assert trie.n_node == trie.n_output_node == 2
    assert not trie.squeeze()  # under both caps now


def test_pruning_runs_in_batches_of_updated_trees():
    forest = TrieForest(max_output_node=0, squeeze_batch=3)
    forest.stream_put([1, 2], window=2, final=True)   # one tree updated: below the batch size
    assert 1 in forest.mem and forest.mem[1].nodes
    forest.end_request(window=2)
    assert forest.squeezes == 0
    forest.stream_put([3, 4, 5, 6], window=2, final=True)  # trees 3, 4, 5 -> 4 trees updated
    forest.end_request(window=2)
    assert forest.squeezes == 1 and all(not t.nodes for t in forest.mem.values())  # every count was 1


# ------------------------------------------------------------------ retrieval
def test_children_ranked_by_mixed_frequency_input_first():
    trie = TokenTrie(65536, 512)
    trie.put([7], output=False)                  # input 1
    for _ in range(5):
        trie.put([8, 9], output=True)            # output 5: loses to one input count (w = 1e-4)
    trie.put([6], output=True)                   # output 1
    tokens, parents = trie.get([], max_size=8, max_length=4)
    assert tokens == [7, 8, 9, 6] and parents == [0, 0, 2, 0]  # DFS: 7 | 8 -> 9 | 6
    # over budget (4 live nodes > root + 2): pre-2024 the mixed fill keeps the top mixed scores;
    # released, only the output reservation counts (none reserved -> nothing; one -> output >= 5)
    assert trie.get([], max_size=3, max_length=4, budget_filter="indexed") == ([7, 8], [0, 0])
    assert trie.get([], max_size=3, max_length=4) == ([], [])
    assert trie.get([], max_size=3, max_length=4, min_output_size=1) == ([8, 9], [0, 1])
    assert trie.get([], max_size=8, max_length=1) == ([7, 8, 6], [0, 0, 0])  # depth 1 only
    assert trie.get([8], max_size=8, max_length=4) == ([9], [0])
    assert trie.get([5], max_size=8, max_length=4) == ([], [])  # no match: root only


def test_budget_cutoffs_reserve_top_output_nodes():
    trie = TokenTrie(65536, 512)
    for tok, count in zip(range(10, 16), (6, 5, 4, 3, 2, 1)):
        for _ in range(count):
            trie.put([tok], output=True)
    # 6 live nodes > max_size 4: top-2 by output -> cut 5. Pre-2024 (indexed): the mixed ranking then
    # fills the budget: chosen {10, 11}, then 12 (3 chosen), 13 (4 = max_size) -> mixed cut = fm(13) = w * 3
    cut_in, cut_out, cut_mix = TokenTrie._cutoffs(trie.nodes, 4, "mix", 0, 2, W, "indexed")
    assert (cut_in, cut_out) == (1e9, 5) and cut_mix == pytest.approx(W * 3)
    indexed = trie.get([], max_size=4, max_length=3, min_output_size=2, budget_filter="indexed")
    assert indexed == ([10, 11, 12], [0, 0, 0])
    # released (None indices): the mixed fill never sets its cut-off; only output >= 5 survives
    assert TokenTrie._cutoffs(trie.nodes, 4, "mix", 0, 2, W) == (1e9, 5, 1e9)
    assert trie.get([], max_size=4, max_length=3, min_output_size=2) == ([10, 11], [0, 0])
    for budget_filter in ("released", "indexed"):
        under = TokenTrie._cutoffs(trie.nodes, 8, "mix", 0, 2, W, budget_filter)
        assert under == (1e9, 1e9, 0.0)  # under budget: everything passes


def test_released_filter_drops_prompt_only_branches_over_budget():
    trie = TokenTrie(65536, 512)
    for _ in range(3):
        trie.put([20, 21], output=False)         # prompt n-gram, input 3: first by mixed score
    trie.put([30], output=True)                  # generated, output 1
    trie.put([31], output=True)
    # 4 live nodes > max_size 3 (root + 2): released keeps only output >= the 1st largest (1)
    assert trie.get([], max_size=3, max_length=3, min_output_size=1) == ([30, 31], [0, 0])
    # indexed: the mixed fill admits the prompt branch first (fm 3 > w)
    assert trie.get([], max_size=3, max_length=3, min_output_size=1, budget_filter="indexed") == ([20, 21], [0, 1])
    # under budget both draft everything, prompt branch first
    assert trie.get([], max_size=8, max_length=3, min_output_size=1) == ([20, 21, 30, 31], [0, 1, 0, 0])


def test_retrieval_falls_back_to_shorter_context_and_last_stage_wins():
    forest = TrieForest()
    forest.stream_put([1, 2, 3], window=4, final=True)        # key 1: 2 -> 3 (one token after [1, 2])
    forest.stream_put([2, 5, 6, 7, 8], window=4, final=True)  # key 2: 3 | 5 -> 6 -> 7 -> 8
    # query [1, 2]: stage 1 (key 1, rest [2]) gives 1 draft (< branch_length 3 with root) -> stage 2,
    # key 2 alone: siblings of equal frequency keep insertion order, depth <= 3
    assert forest.retrieve([1, 2], decoding_length=8, branch_length=3) == ([3, 5, 6, 7], [0, 0, 2, 3])
    # with branch_length 2 stage 1 is enough (root + 1 token >= 2)
    assert forest.retrieve([1, 2], decoding_length=8, branch_length=2) == ([3], [0])
    assert forest.retrieve([9, 9], decoding_length=8, branch_length=3) == ([], [])
    assert forest.retrieve([1, 2], decoding_length=1, branch_length=3) == ([], [])


def hand_forest():
    """Key 1: 2 -> {3 -> 4, 5}, 6, with 2 -> 3 the most frequent path."""
    forest = TrieForest()
    trie = forest.mem[1] = TokenTrie(65536, 512)
    for path in ([2, 3, 4], [2, 3, 4], [2, 5], [6]):
        trie.put(path, output=True)
    return forest


def test_hier_par_and_one_layouts():
    forest = hand_forest()
    hier = forest.retrieve([1], decoding_length=8, branch_length=3, mode="hier")
    assert hier == ([2, 3, 4, 5, 6], [0, 1, 2, 1, 0])
    par = forest.retrieve([1], decoding_length=8, branch_length=3, mode="par")
    # one chain per leaf (4, 5, 6), shared prefix "2" duplicated, cut at hier's 5 draft nodes
    assert par == ([2, 3, 4, 2, 5], [0, 1, 2, 0, 4])
    assert par_layout([2, 3, 4, 5, 6], [0, 1, 2, 1, 0], 8) == ([2, 3, 4, 2, 5, 6], [0, 1, 2, 0, 4, 0])
    assert forest.retrieve([1], decoding_length=8, branch_length=3, mode="one") == ([2, 3, 4], [0, 1, 2])
    # greedy on the duplicated layout accepts the same path as on the trie layout
    logits = torch.zeros(6, 10)
    for node, tok in {0: 2, 1: 5, 2: 4, 3: 0, 4: 7, 5: 9}.items():
        logits[node, tok] = 1.0
    hier_tree = DraftTree(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([-1, 0, 1, 2, 1, 0]))
    par_tree = DraftTree(torch.tensor([1, 2, 3, 4, 2, 5]), torch.tensor([-1, 0, 1, 2, 0, 4]))
    hier_logits = logits[[0, 1, 2, 3, 4, 5]]
    par_logits = logits[[0, 1, 2, 3, 1, 4]]  # node 4 of par (the second "2") has the context of hier node 1
    h_path, h_bonus = Greedy()(hier_tree, hier_logits)
    p_path, p_bonus = Greedy()(par_tree, par_logits)
    assert hier_tree.tokens[h_path].tolist() == par_tree.tokens[p_path].tolist() == [1, 2, 5]
    assert h_bonus == p_bonus == 7


@pytest.mark.parametrize("mode", ["hier", "par", "one"])
def test_retrieved_trees_are_topological_ancestor_closed_trie_paths(mode):
    rng = random.Random(0)
    forest = TrieForest()
    text = [rng.randrange(12) for _ in range(400)]
    forest.put(text[:200], window=6, output=False)
    forest.stream_put(text[200:], window=6, final=False)
    target = Target(tiny_llama(vocab=12))
    checked = 0
    for i in range(2, 400, 7):
        query = text[i - 2:i]
        tokens, parents = forest.retrieve(query, decoding_length=16, branch_length=5, mode=mode)
        tree = DraftTree(torch.tensor([query[-1], *tokens]), torch.tensor([-1, *parents]))
        assert tree.size <= 16 and (tree.size == 1 or int(tree.depth.max()) <= 5)
        assert all(0 <= p < i for i, p in enumerate(tree.parent_list[1:], start=1))
        mask = target.tree_mask(tree, prefix_len=3)[0, 0]     # [T, 3 + T]
        assert (mask[:, :3] == 0).all()
        for node in range(tree.size):
            visible = set((mask[node, 3:] == 0).nonzero().flatten().tolist())
            assert visible == set(tree.path_to(node))      # itself and its ancestors only
            path_tokens = tree.tokens[tree.path_to(node)[1:]].tolist()
            assert in_forest(forest, query, path_tokens)
        checked += tree.size > 1
    assert checked > 10


def in_forest(forest, query, path):
    """The drafted path follows ``query`` in some trie (key query[0] with rest, or key query[-1])."""
    for i, key in enumerate(query):
        nodes = forest.mem[key].nodes if key in forest.mem else {}
        for tok in list(query[i + 1:]) + list(path):
            if tok not in nodes:
                break
            nodes = nodes[tok].children
        else:
            return True
    return False


# ------------------------------------------------------------------ warm start and config
def test_sharegpt_reader_takes_the_gpt_turns():
    texts, info = read_answers("sharegpt", max_records=3)
    assert info["warm_start_records"] == 3 and len(texts) == info["warm_start_texts"] >= 3
    assert texts[0].startswith("Here are the main ideas of Jeff Walker")


def test_warm_start_from_jsonl_is_inserted_recorded_and_restored(smollm2, tmp_path):
    model, tok, _ = smollm2
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text(json.dumps({"text": "alpha beta gamma delta"}) + "\n" + json.dumps("one two three") + "\n")
    la = Lookahead(method_env(model, tok), decoding_length=8, branch_length=4, warm_start=str(corpus))
    stats = la.stats()
    assert stats["warm_start"] == str(corpus) and stats["warm_start_records"] == 2
    assert stats["warm_start_tokens"] > 8 and stats["trie_nodes"] > 0
    ids = tok(" beta gamma delta", add_special_tokens=False).input_ids
    assert la.forest.retrieve(ids[:2], 8, 4)[0][:1] == ids[2:3]  # "delta" follows "beta gamma"
    before = la.stats()["trie_nodes"]
    la.begin(Context(tokens=tok("zz yy xx ww", add_special_tokens=False).input_ids, prompt_len=4, remaining=4))
    assert la.stats()["trie_nodes"] > before
    la.reset("question")  # reset_policy never: keeps what it learned
    assert la.stats()["trie_nodes"] > before
    la.reset("run")       # back to the warm-started tries
    assert la.stats()["trie_nodes"] == before
    assert Lookahead(method_env(model, tok)).stats()["warm_start"] is None


@pytest.mark.parametrize("name", ["lookahead", "lookahead_cpu", "lookahead_whole_prompt"])
def test_method_yaml_builds_the_proposer(name, smollm2):
    import yaml
    model, tok, _ = smollm2
    cfg = yaml.safe_load(open(f"conf/method/{name}.yaml"))
    assert cfg["name"] == name and cfg["proposer"] == "lookahead"
    proposer = build_proposer(cfg, method_env(model, tok))
    assert isinstance(proposer, Lookahead) and proposer.stats()["warm_start"] is None
    assert proposer.stats()["budget_filter"] == "released"  # the released default everywhere
    assert proposer.stats()["prompt_insertion"] == ("whole" if name.endswith("whole_prompt") else "released")


@pytest.mark.full
# ------------------------------------------------------------------ losslessness
@pytest.mark.parametrize("variant", [{}, {"budget_filter": "indexed", "prompt_insertion": "whole"}])
def test_greedy_equals_ar_on_every_task(variant, smollm2, task_prompts, ar_outputs):
    import yaml
    model, tok, stops = smollm2
    cfg = {k: v for k, v in yaml.safe_load(open("conf/method/lookahead_cpu.yaml")).items()
           if k not in ("name", "proposer")}
    la = Lookahead(method_env(model, tok), **{**cfg, **variant})
    accepted = steps = 0
    for task, ids in task_prompts.items():   # tries persist across questions, as in a run
        la.reset("question")
        gen = run_generation(model, la, ids, LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task
        accepted, steps = accepted + gen.new_tokens, steps + gen.steps
    assert accepted / steps > 1.1  # drafts were really accepted


@pytest.mark.parametrize("mode", ["par", "one"])
def test_greedy_equals_ar_in_par_and_one_modes(mode, smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    # the whole prompt in the tries: the article's n-grams are what gets drafted in 24 tokens
    la = Lookahead(method_env(model, tok), decoding_length=16, branch_length=6, decoding_mode=mode,
                   prompt_insertion="whole")
    gen = run_generation(model, la, task_prompts["summarization"], 24, stops)
    assert gen.output_ids == ar_outputs["summarization"][:24]
    assert max(gen.accept_lengths) > 1


def test_short_budgets_clip_the_depth(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    la = Lookahead(method_env(model, tok), decoding_length=16, branch_length=6)
    for n in (1, 7):
        gen = run_generation(model, la, task_prompts["rag"], n, stops)
        assert gen.output_ids == ar_outputs["rag"][:n]
    assert gen.tree_sizes[0] > 1
    ids = task_prompts["rag"]
    la.begin(Context(tokens=list(ids), prompt_len=len(ids), remaining=2))
    tree = la.propose(Context(tokens=list(ids), prompt_len=len(ids), remaining=2))
    assert tree.size > 1 and int(tree.depth.max()) == 1  # depth <= remaining - 1
    assert la.propose(Context(tokens=list(ids), prompt_len=len(ids), remaining=1)).size == 1


# ------------------------------------------------------------------ sampling exactness
V = 6
PROMPT = [0, 1, 2, 3, 4, 1, 2, 3, 5, 1, 2]  # root 2 after [1, 2]: drafts 3 -> {4, 5} -> 1 -> 2 (par: 3 twice)
TRIALS = 20_000


@pytest.mark.parametrize("mode", ["hier", "par"])
def test_sampling_is_exact(mode):
    model = tiny_llama(vocab=V, seed=1)
    la = Lookahead(method_env(model), decoding_length=10, branch_length=4, decoding_mode=mode)
    counts, exact, accepted, tree = first_two_tokens_histogram(model, la, PROMPT, TRIALS)
    if mode == "par":  # the duplicated-prefix layout really has duplicate siblings
        root_kids = tree.tokens[tree.children[0]].tolist()
        assert len(root_kids) > len(set(root_kids))
    assert tree.size > 2
    assert_same_distribution(counts, exact)
    assert accepted > TRIALS // 20  # draft tokens were accepted, not only corrections
