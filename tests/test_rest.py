"""REST (methods/rest.py, methods/_rest_datastore.py): the suffix array, the drafts against a brute-force search
of the same datastore (the release's span loop written out literally), a hand-worked trie and budget cut, the
datastore cache and build command, greedy equality with AR on real SmolLM2 prompts (a datastore of 300 ShareGPT
records), and the shared exact rule over REST's deterministic trees.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -x tests/test_rest.py
"""

import json
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    LOSSLESS_NEW_TOKENS,
    assert_same_distribution,
    first_two_tokens_histogram,
    method_env,
    run_generation,
    tiny_llama,
    WordTokenizer,
)

from methods import _rest_datastore as store_mod
from methods._rest_datastore import Datastore, concatenate, retrieve, suffix_array
from methods.rest import Rest, main
from specdec.errors import UserError
from specdec.verify.proposer import Context, MethodEnv, build_proposer
from specdec.verify.tree import DraftTree


WORDS = WordTokenizer(["a", "b", "c", "d", "e"])
A, B, C, D, E = range(5)


def memory_store(entries, entry_separator=True) -> Datastore:
    tokens, separator = concatenate(entries, entry_separator)
    return Datastore(tokens, suffix_array(tokens), separator, {})


def word_env(tmp_path, words=WORDS, vocab=5) -> MethodEnv:
    return MethodEnv(vocab_size=vocab, device=torch.device("cpu"), tokenizer=words, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- brute force
def brute_force(entries, context, entry_separator=True, max_span=16, min_span=2, max_matches=5000,
                continuation=10, num_draft=64, budget="distinct_tokens", seen=None):
    """The release's retrieval written out over a plain list: spans max_span .. min_span (query = the last
    ``span`` context tokens, fewer if the context is shorter), every occurrence by a linear scan, occurrences
    ordered by their whole suffix, the first ``max_matches`` kept, continuations cut at an entry's end, every
    prefix counted, the top ``num_draft`` by (count desc, length, tokens), then the distinct-token cut.
    ``seen`` (a Counter) counts the steps where the match cap, the top-k cut and the budget cut bound."""
    seen = Counter() if seen is None else seen
    data, separator = [], max((t for e in entries for t in e), default=-1) + 1
    for entry in entries:
        data += list(entry) + ([separator] if entry_separator else [])
    if not entry_separator:
        data.append(separator)
    for span in range(max_span, min_span - 1, -1):
        query = list(context[-span:])
        hits = sorted((i for i in range(len(data)) if data[i:i + len(query)] == query), key=lambda i: data[i:])
        conts = []
        for i in hits[:max_matches]:
            nxt = data[i + len(query):i + len(query) + continuation]
            conts.append(nxt[:nxt.index(separator)] if separator in nxt else nxt)
        if not any(conts):
            continue
        counts = Counter(tuple(c[:d]) for c in conts for d in range(1, len(c) + 1))
        paths = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_draft]
        seen["capped"] += len(hits) > max_matches
        seen["top_cut"] += len(counts) > num_draft
        if budget == "distinct_tokens":
            by_weight = sorted(enumerate(paths), key=lambda ip: (len(set(ip[1])), ip[0]), reverse=True)
            total, dropped = sum(len(set(p)) for p in paths), set()
            for i, p in by_weight:
                if total <= num_draft:
                    break
                total -= len(set(p))
                dropped.add(i)
            paths = [p for i, p in enumerate(paths) if i not in dropped]
            seen["budget_cut"] += bool(dropped)
        return paths, len(query)  # the query length (the span, or the whole context if shorter)
    return [], 0


def random_corpus(rng, vocab, n_entries, max_len):
    return [(rng.zipf(1.5, rng.integers(1, max_len)) % vocab).tolist() for _ in range(n_entries)]


# ---------------------------------------------------------------------------------------------- datastore
@pytest.mark.parametrize("high", [5, 300, 70_000])  # one byte, two bytes (SmolLM2) and four bytes per token
def test_suffix_array_is_the_sorted_suffixes(high):
    rng = np.random.default_rng(high)
    for _ in range(5):
        data = rng.integers(0, 4, 200) * (high // 4)  # few distinct values: long common prefixes
        tokens = data.astype(np.uint32 if high >= 2**16 else np.uint16)
        expected = sorted(range(len(data)), key=lambda i: data[i:].tolist())
        assert suffix_array(tokens).tolist() == expected


def test_concatenate_puts_a_separator_above_every_token():
    tokens, sep = concatenate([[3, 1], [], [2]])
    assert sep == 4 and tokens.tolist() == [3, 1, 4, 2, 4] and tokens.dtype == np.uint16
    tokens, sep = concatenate([[3, 1], [2]], entry_separator=False)
    assert tokens.tolist() == [3, 1, 2, 4]
    assert concatenate([[70_000]])[0].dtype == np.uint32


def chat(*turns):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


def test_datastore_round_trips_through_the_cache(tmp_path):
    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps([chat("a b c d", "a b c e"), chat("a b d")]))
    cache = tmp_path / "cache"
    first = store_mod.ensure_datastore(cache, WORDS, str(corpus), progress=False)
    store = store_mod.load_datastore(str(first))
    assert store.tokens.tolist() == [A, B, C, D, 5, A, B, C, E, 5, A, B, D, 5] and store.separator == 5
    assert store.suffixes.tolist() == sorted(range(14), key=lambda i: store.tokens[i:].tolist())
    meta = store.meta
    assert (meta["records"], meta["entries"], meta["tokens"], meta["entry_separator"]) == (2, 3, 11, True)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert store_mod.ensure_datastore(cache, WORDS, str(corpus), progress=False) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # found, not rebuilt
    others = [store_mod.ensure_datastore(cache, WORDS, str(corpus), max_records=1, progress=False),
              store_mod.ensure_datastore(cache, WORDS, str(corpus), entry_separator=False, progress=False),
              store_mod.ensure_datastore(cache, WORDS, str(corpus), roles=["gpt"], progress=False)]
    assert len({first, *others}) == 4
    assert store_mod.load_datastore(str(others[2])).tokens.tolist() == [A, B, C, E, 5]  # gpt turns only
    other_words = WordTokenizer(["b", "a", "c", "d", "e"])
    assert store_mod.datastore_dir(cache, other_words, str(corpus), None, None, True) != first


def test_build_command_reports_the_datastore(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\na b d\n")
    monkeypatch.setattr("methods.aded.load_tokenizer", lambda model, cache: WORDS)
    assert main(["build", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "2 records, 2 entries, 6 tokens" in out and str(tmp_path / "cache" / "rest") in out


# ---------------------------------------------------------------------------------------------- retrieval
HAND = [[A, B, C, D], [A, B, C, E], [A, B, D]]


def test_hand_worked_drafts_trie_and_budget_cut():
    store = memory_store(HAND)
    # context e a b: "e a b" never occurs; "a b" is followed by c d | c e | d -> c x2, d, c d, c e
    assert retrieve(store, [E, A, B]) == ([(C,), (D,), (C, D), (C, E)], 2)
    assert retrieve(store, [E, A, B], num_draft=4)[0] == [(C,), (D,), (C, D)]  # weights 1+1+2+2 > 4: drop (c, e)
    assert retrieve(store, [E, A, B], num_draft=3)[0] == [(C,), (D,)]          # top 3 weigh 4 > 3: drop (c, d)
    assert retrieve(store, [E, A, B], num_draft=3, budget="nodes")[0] == [(C,), (D,), (C, D)]
    assert retrieve(store, [E, A, B], max_matches=1)[0] == [(C,), (C, D)]      # the first suffix: a b c d
    assert retrieve(store, [C, A, B, C], max_span=3)[0] == [(D,), (E,)]        # "a b c" (span 3) wins over "b c"
    assert retrieve(store, [C, D]) == ([], 0)                                  # only an entry's end follows "c d"
    assert retrieve(store, [C, 7, A]) == ([], 0)                               # an unknown id ends the suffix
    glued = memory_store(HAND, entry_separator=False)                          # as released: no separator
    assert retrieve(glued, [C, D])[0][0] == (A,)                               # continues into the next entry
    assert retrieve(glued, [E, A, B]) == ([(D,)], 3)                           # "e a b" spans two entries


@pytest.mark.parametrize("separate", [True, False])
def test_drafts_equal_a_brute_force_search(separate):
    """Many random contexts over zipf corpora, with knobs small enough that the match cap, the top-k cut and
    the budget cut all bind, and with the released defaults."""
    rng = np.random.default_rng(7 + separate)
    entries = random_corpus(rng, vocab=9, n_entries=40, max_len=30)
    store = memory_store(entries, separate)
    settings = [dict(max_span=4, min_span=1, max_matches=7, continuation=4, num_draft=12),
                dict(max_span=3, max_matches=20, continuation=5, num_draft=10, budget="nodes"),
                dict()]
    seen = Counter()
    for knobs in settings:
        for _ in range(60):
            context = (rng.zipf(1.5, rng.integers(1, 20)) % 9).tolist()
            expected = brute_force(entries, context, separate, **knobs, seen=seen)
            assert retrieve(store, context, **knobs) == expected, (knobs, context)
            seen["matched"] += expected[1] > 0
    assert seen["matched"] > 100 and min(seen[k] for k in ("capped", "top_cut", "budget_cut")) > 5, seen  # not vacuous


def test_proposer_tree_is_the_bfs_trie_of_the_brute_force_drafts(tmp_path):
    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(3)
    entries = random_corpus(rng, vocab=5, n_entries=30, max_len=25)
    corpus.write_text("\n".join(" ".join("abcde"[t] for t in e) for e in entries) + "\n")
    prop = Rest(word_env(tmp_path), corpus=str(corpus), max_span=5, num_draft=16)
    sizes = []
    for _ in range(40):
        tokens = (rng.zipf(1.5, 8) % 5).tolist()
        tree = prop.propose(Context(tokens=tokens, prompt_len=8, remaining=64))
        paths, span = brute_force(entries, tokens, max_span=5, num_draft=16)
        assert tree.kind == "deterministic" and tree.tokens[0] == tokens[-1]
        nodes = [tuple(tree.tokens[tree.path_to(i)[1:]].tolist()) for i in range(1, tree.size)]
        assert nodes == sorted(paths, key=lambda p: (len(p), paths.index(p)))  # BFS, siblings by rank
        sizes.append(tree.size)
    assert max(sizes) > 8 and prop.stats()["matched_share"] > 0.5


def test_no_match_budget_and_settings(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c d\na b c e\na b d\n")
    env = word_env(tmp_path)
    prop = Rest(env, corpus=str(corpus))
    assert prop.propose(Context(tokens=[C, D], prompt_len=2, remaining=9)).size == 1  # no match: AR step
    deep = prop.propose(Context(tokens=[E, A, B], prompt_len=3, remaining=9))
    assert deep.tokens.tolist() == [B, C, D, D, E] and deep.parents.tolist() == [-1, 0, 0, 1, 1]
    shallow = prop.propose(Context(tokens=[E, A, B], prompt_len=3, remaining=2))  # one more token may be drafted
    assert shallow.tokens.tolist() == [B, C, D]
    assert prop.propose(Context(tokens=[E, A, B], prompt_len=3, remaining=1)).size == 1
    dummy = Rest(env, corpus=str(corpus), no_match_token=4)  # the release's dummy draft (token 100 there)
    assert dummy.propose(Context(tokens=[C, D], prompt_len=2, remaining=9)).tokens.tolist() == [D, 4]
    stats = prop.stats()
    assert stats["proposes"] == 4 and stats["matched_share"] == 0.5 and stats["datastore"]["tokens"] == 11
    for bad in (dict(min_span=3, max_span=2), dict(num_draft=0), dict(budget="depth"), dict(no_match_token=5)):
        with pytest.raises(UserError, match="method 'rest'"):
            build_proposer({"name": "rest", "proposer": "rest", "corpus": str(corpus), **bad}, env)


def test_yaml_builds_the_released_settings(tmp_path):
    cfg = yaml.safe_load(open("conf/method/rest.yaml"))
    assert cfg["name"] == "rest" and cfg["proposer"] == "rest" and cfg["corpus"] == "sharegpt"
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    prop = build_proposer({**cfg, "corpus": str(corpus)}, word_env(tmp_path))
    assert (prop.max_span, prop.min_span, prop.max_matches, prop.continuation, prop.num_draft, prop.budget) == \
        (16, 2, 5000, 10, 64, "distinct_tokens")
    assert prop.no_match_token is None and prop.store.meta["entry_separator"] is True


# ---------------------------------------------------------------------------------------------- SmolLM2
def greedy_check(smollm2, task_prompts, ar_outputs, tmp_path_factory, tasks):
    model, tok, stops = smollm2
    env = replace(method_env(model, tok), cache_dir=str(tmp_path_factory.mktemp("rest_cache")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prop = Rest(env, max_records=300)  # the real ShareGPT corpus, first 300 records (~1 s to build)
    assert prop.store_info["records"] == 300 and prop.store_info["tokens"] > 100_000
    steps = tokens = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: 2 threads under load run several times slower
    try:
        for task in tasks:
            gen = run_generation(model, prop, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
            assert gen.output_ids == ar_outputs[task], task
            steps, tokens = steps + gen.steps, tokens + gen.new_tokens
    finally:
        torch.set_num_threads(threads)
    assert tokens / steps > 1.0 and max(gen.tree_sizes) > 1  # drafts were accepted: the equality is not vacuous
    assert prop.stats()["matched_share"] > 0


def test_greedy_equals_ar_on_real_prompts(smollm2, task_prompts, ar_outputs, tmp_path_factory):
    greedy_check(smollm2, task_prompts, ar_outputs, tmp_path_factory, ["qa"])


@pytest.mark.full
def test_greedy_equals_ar_on_every_task(smollm2, task_prompts, ar_outputs, tmp_path_factory):
    greedy_check(smollm2, task_prompts, ar_outputs, tmp_path_factory, list(task_prompts))


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_is_exact_on_a_rest_tree(tmp_path):
    """The shared rule for deterministic trees on REST's real first tree (branching, depth >= 2): the first two
    committed tokens follow p(x1) p(x2 | x1) of a tiny random target over 6 tokens."""
    V, trials = 6, 20_000
    words = WordTokenizer([str(i) for i in range(V)])
    corpus = tmp_path / "digits.txt"
    corpus.write_text("1 2 3 4\n1 2 3 5\n1 2 4 0\n2 3 1 1\n")
    prop = Rest(word_env(tmp_path, words, V), corpus=str(corpus))
    model = tiny_llama(vocab=V, seed=4)
    counts, exact, accepted, tree = first_two_tokens_histogram(model, prop, [0, 5, 1, 2], trials)
    assert tree.tokens.tolist() == [2, 3, 4, 4, 5, 0] and int(tree.depth.max()) == 2
    assert_same_distribution(counts, exact)
    assert accepted > trials // 20
