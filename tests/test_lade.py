"""LADE (methods/lade.py; docs/lade.md): the pool and the window worked by hand (fill phase, steady-state rows,
positions and visibility, harvest, shift), the drafts and their layouts, greedy equality with AR on real SmolLM2
prompts, the shared exact rule on a real LADE tree at T = 1, and outputs and accept lengths against a plain
re-implementation of the release's greedy loop (Spec-Bench's ``jacobi_greedy_search_multilevel``; no KV cache:
every forward recomputes the whole context).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -x tests/test_lade.py
"""

import random

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
)

from methods.lade import Lade, NgramPool, Window, window_rows
from specdec.errors import UserError
from specdec.verify.proposer import Context, Proposer, StepResult, build_proposer

V = 64


def lade(level=4, window=3, guess=7, model=None, **knobs) -> Lade:
    env = method_env(model) if model is not None else method_env(tiny_llama(vocab=V))
    return Lade(env, level=level, window=window, guess=guess, **knobs)


def started(proposer: Lade, prompt, seed=0) -> Context:
    ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=100, seed=seed)
    proposer.reset("turn")
    proposer.begin(ctx)
    return ctx


def step_with_argmaxes(tree, argmaxes: list[int], committed: list[int]) -> StepResult:
    """A verify step whose wanted side rows have the given argmax tokens (one-hot logits)."""
    side = torch.full((len(argmaxes), V), -1.0)
    side[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 1.0
    return StepResult(tree, torch.zeros(tree.size, V), [0], committed, side_logits=side)


# ---------------------------------------------------------------------------------------------- the pool
def test_pool_keeps_the_newest_cap_ngrams_per_key():
    pool = NgramPool(cap=2)
    pool.insert(1, (2, 3))
    pool.insert(1, (4, 5))
    pool.insert(1, (2, 3))                    # present: moves to the end
    assert pool.get(1) == [(4, 5), (2, 3)]
    pool.insert(1, (6, 7))                    # full: the oldest goes
    assert pool.get(1) == [(2, 3), (6, 7)] and pool.get(9) == [] and len(pool) == 2


# ---------------------------------------------------------------------------------------------- the window
def test_window_init_copies_from_the_prompt_with_the_turn_seed():
    prompt = [11, 12, 13, 14, 15, 16]
    p = lade(level=5, window=7)
    started(p, prompt, seed=3)
    rng = random.Random(3)
    assert p.window.levels == [[rng.choice(prompt) for _ in range(7 + 5 - 3)], None, None, None]
    fixed = lade(level=5, window=7, init_seed=10)   # Spec-Bench: random.seed(10) at every generate call
    started(fixed, prompt, seed=3)
    random.seed(10)
    assert fixed.window.levels[0] == [random.choice(prompt) for _ in range(9)]


def test_fill_phase_grows_one_level_per_step_then_candidates_come():
    """5/7/7: side rows 9, 17, 23 in the three fill steps (no candidates, one token each), then 27 (docs/lade.md §3)."""
    p = lade(level=5, window=7, guess=7)
    ctx = started(p, list(range(20, 40)))
    sizes = []
    for step in range(5):
        tree = p.propose(ctx)
        sizes.append(tree.side.size)
        assert tree.size == 1 or step >= 4       # no candidates before the window is full
        width = len(tree.side.wanted)
        ctx.tokens.append(30 + step)
        p.observe(step_with_argmaxes(tree, [40 + step] * width, [30 + step]))
    assert sizes == [9, 17, 23, 27, 27]
    assert p.stats()["fill_steps"] == 3 and [len(lvl) for lvl in p.window.levels] == [6, 7, 7, 7]


def steady_example():
    """The worked example of docs/lade.md §2 (N = 4, W = 3): level 0 = [r, a1, a2], level 1 = [b0, b1, b2],
    level 2 = [c0, c1, c2], set by hand on a started proposer."""
    p = lade(level=4, window=3)
    ctx = started(p, [40, 41, 42, 1])           # root r = 1
    p.window.levels = [[2, 3], [4, 5, 6], [7, 8, 9]]  # a1 a2 | b0 b1 b2 | c0 c1 c2
    return p, ctx


def test_steady_rows_positions_and_visibility():
    p, ctx = steady_example()
    tree = p.propose(ctx)
    side = tree.side
    assert tree.size == 1 and side.tokens.tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert side.offsets.tolist() == [1, 2, 1, 2, 3, 2, 3, 4]                  # cell (l, j) at P + l + j
    a1, a2, b0, b1, b2, c0, c1, c2 = range(1, 9)                               # columns after the root's
    expected = {a1: [0, a1], a2: [0, a1, a2], b0: [0, b0], b1: [0, a1, b1], b2: [0, a1, a2, b2],
                c0: [0, b0, c0], c1: [0, a1, b1, c1], c2: [0, a1, a2, b2, c2]}
    for row, cols in expected.items():
        assert side.sees[row - 1].nonzero().flatten().tolist() == cols, row
    assert side.wanted.tolist() == [5, 6, 7]                                   # the top level only


def test_harvest_and_shift_as_released():
    p, ctx = steady_example()
    tree = p.propose(ctx)
    p.observe(step_with_argmaxes(tree, [21, 22, 23], committed=[50]))
    # one n-gram per column: key r -> (b0, c0, new0), a1 -> (b1, c1, new1), a2 -> (b2, c2, new2)
    assert p.pool.map == {1: [(4, 7, 21)], 2: [(5, 8, 22)], 3: [(6, 9, 23)]}
    assert p.window.levels == [[5, 6], [7, 8, 9], [21, 22, 23]]              # slid by one column


def test_candidates_are_the_pool_ngrams_for_the_root():
    """released: the first N - 2 tokens of each n-gram, merged into a trie; full: all N - 1; chains: one chain
    per n-gram with (released) the dropped last token as an unread side row seeing the root and its chain."""
    p, ctx = steady_example()
    for ngram in [(5, 6, 7), (5, 8, 9), (10, 11, 12)]:
        p.pool.insert(1, ngram)
    trie = p.propose(ctx)
    assert trie.token_list == [1, 5, 10, 6, 8, 11] and trie.parent_list == [-1, 0, 0, 1, 1, 2]
    assert trie.side.size == 8 and trie.forward_rows == 14
    p.candidate_len = "full"
    assert p.propose(ctx).size == 1 + 2 + 3 + 3
    p.candidate_len, p.layout = "released", "chains"
    chains = p.propose(ctx)
    assert chains.token_list == [1, 5, 6, 5, 8, 10, 11] and chains.parent_list == [-1, 0, 1, 0, 3, 0, 5]
    assert chains.side.tokens.tolist()[8:] == [7, 9, 12] and chains.side.offsets.tolist()[8:] == [3, 3, 3]
    assert chains.side.sees[8].nonzero().flatten().tolist() == [0, 1, 2, 7 + 8]
    assert chains.forward_rows == 1 + 3 * 2 + 8 + 3                            # the release's W(N-1) + G(N-1)
    ctx.remaining = 2                                                          # one more draft could commit
    assert p.propose(ctx).token_list == [1, 5, 5, 10]


def test_pool_from_prompt_inserts_prompt_and_committed_ngrams():
    p = lade(level=3, window=2, pool_from_prompt=True)
    ctx = started(p, [1, 2, 3, 1, 2, 4])
    assert p.pool.map == {1: [(2, 3), (2, 4)], 2: [(3, 1)], 3: [(1, 2)]}
    tree = p.propose(ctx)
    p.observe(step_with_argmaxes(tree, [9] * len(tree.side.wanted), committed=[7, 8]))
    assert p.pool.get(2) == [(3, 1), (4, 7)] and p.pool.get(4) == [(7, 8)]     # n-grams ending at 7 and at 8


def test_pool_lifetime_and_settings():
    p = lade(pool_lifetime="question")
    p.pool.insert(1, (2, 3, 4))
    p.reset("turn")
    assert len(p.pool) == 1
    p.reset("question")
    assert len(p.pool) == 0
    for bad in ({"level": 2}, {"guess": 0}, {"layout": "tree"}, {"candidate_len": "all"}):
        with pytest.raises(UserError):
            build_proposer({"name": "lade", "proposer": "lade", **bad}, method_env(tiny_llama(vocab=V)))


def test_sampling_replaces_stop_ids_in_the_new_top_level():
    """The release's sampling loop (filter_window) swaps a stop id in the new top level for a prompt token."""
    model = tiny_llama(vocab=V)
    from dataclasses import replace
    p = Lade(replace(method_env(model), temperature=1.0), level=4, window=3)
    ctx = started(p, [40, 41, 42, 1])
    p.stop_ids = frozenset({63})
    p.window.levels = [[2, 3], [4, 5, 6], [7, 8, 9]]
    p.observe(step_with_argmaxes(p.propose(ctx), [63, 22, 63], committed=[50]))
    top = p.window.levels[-1]
    assert top[1] == 22 and top[0] in (40, 41, 42, 1) and top[2] in (40, 41, 42, 1)
    assert p.pool.get(1) == [(4, 7, 63)]                                       # the harvest saw the argmax


def test_yaml_configs():
    for name, size in (("lade", (5, 7, 7)), ("lade_cpu", (4, 5, 5))):
        cfg = yaml.safe_load(open(f"conf/method/{name}.yaml"))
        p = build_proposer(cfg, method_env(tiny_llama(vocab=V)))
        assert (p.level, p.width, p.guess, p.candidate_len, p.layout) == (*size, "released", "trie")


# ---------------------------------------------------------------------------------------------- the release's loop
def release_mask(level_sizes: list[int], guess_len: int, guess_size: int) -> torch.Tensor:
    """The step block's mask as the release builds it (j_make_causal_mask_multilevel), bool, True = visible:
    the root and level 0 causal; level ll's rows see the root + level-0 block lower-triangularly and the
    diagonal of each level block 1..ll; every candidate row sees the root and its own candidate causally."""
    tiny = level_sizes[0] + 1
    n = 1 + sum(level_sizes) + guess_len
    mask = torch.zeros(n, n, dtype=torch.bool)
    tri = torch.ones(tiny, tiny, dtype=torch.bool).tril()
    for ll in range(len(level_sizes)):
        mask[tiny * ll:tiny * (ll + 1), :tiny] |= tri
        for row in range(1, ll + 1):
            mask[tiny * ll:tiny * (ll + 1), tiny * row:tiny * (row + 1)] |= torch.eye(tiny, dtype=torch.bool)
    if guess_len:
        start = n - guess_len
        mask[start:, 0] = True
        for g in range(guess_len // guess_size):
            lo = start + g * guess_size
            mask[lo:lo + guess_size, lo:lo + guess_size] = torch.ones(guess_size, guess_size, dtype=torch.bool).tril()
    return mask


@torch.inference_mode()
def release_forward(model, context, past, fill_level, guess_tokens, guess_size):
    """One forward of the release without a KV cache: the committed context (its last token is the step's
    input, the root) + the window levels 0..fill_level + the candidates, at the release's positions."""
    lst = len(context) - 1
    window, positions, sizes = [], [], []
    for ll in range(fill_level + 1):
        window += past[ll]
        sizes.append(len(past[ll]))
        positions += list(range(lst + 1 + (0 if ll == 0 else ll - 1), lst + 1 + (0 if ll == 0 else ll - 1) + len(past[ll])))
    guess = guess_tokens or []
    positions += list(range(lst + 1, lst + 1 + guess_size)) * (len(guess) // guess_size)
    block = release_mask(sizes, len(guess), guess_size)
    n, P = block.shape[0], lst
    full = torch.zeros(P + n, P + n, dtype=torch.bool)
    full[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    full[P:, :P] = True
    full[P:, P:] = block
    mask = torch.zeros(P + n, P + n).masked_fill(~full, torch.finfo(torch.float32).min)
    ids = torch.tensor([context + window + guess])
    pos = torch.tensor([list(range(P + 1)) + positions])
    logits = model(input_ids=ids, attention_mask=mask[None, None], position_ids=pos).logits[0]
    out = logits[P]
    lguess = len(guess)
    inp = logits[P + n - lguess - len(past[fill_level]):P + n - lguess]
    return out, inp, logits[P + n - lguess:]


def release_greedy(model, prompt, level, window, guess_set, max_new, seed):
    """Spec-Bench's jacobi_greedy_search_multilevel restated step by step (no EOS; stops at ``max_new``), with
    ``release_forward`` for its model call. Returns (generated ids, tokens per forward)."""
    rng = random.Random(seed)
    guess_size = level - 1
    all_old = list(prompt)
    past = [[rng.choice(all_old) for _ in range(window + level - 3)]] + [None] * (level - 2)
    fill_level, token_map, accepts, lst_token = 0, {}, [], None
    while len(all_old) - len(prompt) < max_new:
        guess_tokens = None
        if past[level - 2] is not None and lst_token in token_map and guess_set > 0:
            guess_tokens = [t for tup in token_map[lst_token] for t in tup]
        out, inp, guess_logits = release_forward(model, all_old, past, fill_level, guess_tokens, guess_size)
        first_guess = int(out.argmax())
        max_hit, hits = 0, [first_guess] + [0] * (guess_size - 1)
        if past[1] is None:
            past[0] = past[0][1:]
            past[1] = inp.argmax(-1).tolist()
            fill_level += 1
        elif past[level - 2] is None:
            for ll in range(fill_level + 1):
                past[ll] = past[ll][1:]
            past[fill_level + 1] = inp.argmax(-1).tolist()[1:]
            fill_level += 1
        else:
            if guess_tokens is not None:
                results = guess_logits.argmax(-1).tolist()
                for eg in range(len(results) // guess_size):
                    correct = [first_guess] + results[eg * guess_size:(eg + 1) * guess_size]
                    mine = guess_tokens[eg * guess_size:(eg + 1) * guess_size]
                    gg = 0
                    for gg in range(len(mine)):         # the release's loop: it never credits the last slot
                        if mine[gg] != correct[gg]:
                            break
                    if gg > max_hit:
                        max_hit = gg
                        hits[:max_hit + 1] = correct[:max_hit + 1]
            new = inp.argmax(-1).tolist()
            keys = [lst_token] + past[0]
            for i in range(window):
                tup = tuple(past[ll][i] for ll in range(1, level - 1)) + (new[i],)
                entries = token_map.setdefault(keys[i], [])
                if tup in entries:
                    entries.remove(tup)
                    entries.append(tup)
                elif len(entries) < guess_set:
                    entries.append(tup)
                else:
                    token_map[keys[i]] = entries[1:] + [tup]
            past[0] = past[1][1:]
            for ll in range(1, level - 2):
                past[ll] = past[ll + 1][:]
            past[level - 2] = new
        lst_token = hits[max_hit]
        all_old += hits[:max_hit + 1]
        accepts.append(max_hit + 1)
    return all_old[len(prompt):len(prompt) + max_new], accepts


def test_release_mask_is_the_documented_layout():
    """The re-implementation's mask against the worked example's table (docs/lade.md §2), so that the comparison
    below does not rest on our own side-row layout."""
    mask = release_mask([2, 3, 3], 6, 3)          # r a1 a2 | b0 b1 b2 | c0 c1 c2 | x1 x2 x3 | y1 y2 y3
    names = "r a1 a2 b0 b1 b2 c0 c1 c2 x1 x2 x3 y1 y2 y3".split()
    seen = {names[i]: [names[j] for j in mask[i].nonzero().flatten().tolist()] for i in range(len(names))}
    assert seen["c2"] == ["r", "a1", "a2", "b2", "c2"] and seen["b0"] == ["r", "b0"] and seen["a1"] == ["r", "a1"]
    assert seen["y2"] == ["r", "y1", "y2"] and seen["x3"] == ["r", "x1", "x2", "x3"]


def compare_with_release(model, prompt, new_tokens, level, window, guess, stops=frozenset(), tok=None):
    ours = Lade(method_env(model, tok), level=level, window=window, guess=guess, init_seed=10)
    gen = run_generation(model, ours, prompt, new_tokens, stops)
    ids, accepts = release_greedy(model, prompt, level, window, guess, new_tokens, seed=10)
    assert gen.output_ids == ids
    assert gen.accept_lengths[:-1] == accepts[:len(gen.accept_lengths) - 1] and gen.steps == len(accepts)
    return gen


@pytest.mark.parametrize("seed,size", [(0, (5, 7, 7)), (1, (4, 5, 5)), (2, (3, 4, 2))])
def test_same_output_and_accept_lengths_as_the_release_loop(seed, size):
    """A tiny Llama (vocab 16: it repeats itself, so candidates do get accepted), prompt from its own vocabulary."""
    model = tiny_llama(vocab=16, seed=seed)
    prompt = [3, 7, 11, 3, 7, 2, 9, 3, 7, 5]
    gen = compare_with_release(model, prompt, 40, *size)
    assert gen.new_tokens / gen.steps > 1.2          # drafts were accepted: the check is not vacuous


# ---------------------------------------------------------------------------------------------- real prompts
def test_greedy_equals_ar_on_real_prompts(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    accepted = 0
    for task in ("summarization", "math_reasoning"):
        gen = run_generation(model, Lade(method_env(model, tok), level=4, window=5, guess=5), task_prompts[task],
                             LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task
        accepted += sum(n > 1 for n in gen.accept_lengths)
    assert accepted > 0  # candidates were verified and accepted, not only the window run


@pytest.mark.full
@pytest.mark.parametrize("size", [(5, 7, 7), (4, 5, 5)])
def test_greedy_equals_ar_on_every_task(size, smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    committed = steps = 0
    for layout in ("trie", "chains"):
        for task, ids in task_prompts.items():
            p = Lade(method_env(model, tok), *size, layout=layout)
            gen = run_generation(model, p, ids, LOSSLESS_NEW_TOKENS, stops)
            assert gen.output_ids == ar_outputs[task], (task, layout)
            committed, steps = committed + gen.new_tokens, steps + gen.steps
    assert committed / steps > 1.05


@pytest.mark.full
def test_mat_per_task_equals_the_release_loop_on_smollm2(smollm2, task_prompts):
    """Spec-Bench's 5/7/7 on every task prompt: the same ids and the same tokens per forward as the release's loop
    (re-implemented without a cache), so the same MAT."""
    model, tok, _ = smollm2
    for task, ids in task_prompts.items():
        compare_with_release(model, ids, LOSSLESS_NEW_TOKENS, 5, 7, 7, tok=tok)


# ---------------------------------------------------------------------------------------------- sampling
class Frozen(Proposer):
    """A LADE proposer as it stands after some steps: ``begin`` keeps its state, ``propose`` is LADE's."""

    def __init__(self, inner: Lade):
        super().__init__(inner.env)
        self.inner = inner

    def propose(self, ctx):
        return self.inner.propose(ctx)


def test_sampling_is_exact_on_a_real_lade_tree():
    """The shared sample-and-follow rule on LADE's tree (a trie with the window's side rows in the same forward):
    the first two committed tokens follow p(x1) p(x2 | x1). The proposer is first run greedily until the pool
    holds n-grams for the root."""
    vocab, trials = 6, 20_000
    model = tiny_llama(vocab=vocab, seed=2)
    prompt = [0, 1, 2, 3, 4, 5, 1, 2, 3, 1, 2]
    for n in range(4, 30):
        p = Lade(method_env(model), level=3, window=3, guess=3)
        gen = run_generation(model, p, prompt, n)
        if p.pool.get(gen.output_ids[-1]):
            break
    context = prompt + gen.output_ids
    counts, exact, accepted, tree = first_two_tokens_histogram(model, Frozen(p), context, trials)
    assert tree.size > 1 and tree.side is not None and tree.side.size == 3 * 2 - 1
    assert_same_distribution(counts, exact)
    assert accepted > trials // 20


# ---------------------------------------------------------------------------------------------- host syncs
def test_host_syncs_per_step():
    """Per step (``specdec.measure.syncs``, CPU proxy): two uploads (the tree, the side rows), the greedy rule's
    read and the read of the window's argmaxes; every tensor the model reads is on its device."""
    from specdec.measure.syncs import host_syncs

    model = tiny_llama(vocab=96, layers=3, seed=0)
    p = Lade(method_env(model), level=4, window=5, guess=5)
    report = host_syncs(model, p, [5, 9, 13, 7, 21, 5, 9, 13, 7, 30, 41, 5, 9, 13, 2, 8, 5, 9], 32)
    assert report["violations"] == [] and report["steps"] > 0
    assert report["max"] <= 4 and report["by_kind"]["upload"] == 2.0, (report["per_step"], report["sites"])
