"""Prompt lookup decoding (methods/pld.py): the lookup by hand, greedy equality with AR, parity with
transformers' prompt lookup (same output ids, same number of target forwards), sampling exactness."""

import numpy as np
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

from methods.pld import PromptLookup, lookup_continuation
from specdec.verify.proposer import Context, build_proposer


def lookup(seq, n=3, k=4, full_only=False):
    return lookup_continuation(np.array(seq), n, k, full_only).tolist()


def test_longest_ngram_first_then_earliest_match():
    #        0  1  2  3  4  5  6  7  8  9
    seq = [5, 6, 7, 1, 5, 6, 9, 9, 6, 7]
    # 3-gram [9, 6, 7]: no earlier match; 2-gram [6, 7] at 1 -> continuation starts at 3
    assert lookup(seq) == [1, 5, 6, 9]
    # 1-gram only ([8] is new, [2, 8] never seen): no match at all
    assert lookup([1, 2, 3, 2, 8]) == []
    # earliest of several matches, not the latest
    assert lookup([4, 1, 4, 2, 4], n=1, k=2) == [1, 4]


def test_continuation_is_cut_by_the_end_of_the_context():
    assert lookup([3, 4, 5, 3, 4], n=2, k=10) == [5, 3, 4]  # transformers: shorter than k is fine
    assert lookup([3, 4, 5, 3, 4], n=2, k=10, full_only=True) == []  # Spec-Bench: needs all k tokens
    assert lookup([3, 4, 5, 6, 7, 3, 4], n=2, k=3, full_only=True) == [5, 6, 7]
    assert lookup([7, 7], n=3, k=4) == [7]  # n limited to len - 1; the final n-gram never matches itself


def test_draft_is_cut_at_stop_ids_and_clipped_to_the_budget(smollm2):
    model, tok, stops = smollm2
    pld = PromptLookup(method_env(model, tok), num_pred_tokens=5, max_ngram_size=2)
    eos = min(stops)
    tokens = [10, 11, 12, eos, 13, 10, 11]
    assert pld.draft(tokens, remaining=100) == [12]         # cut before the stop id
    assert pld.draft([10, 11, 12, 13, 14, 15, 10, 11], remaining=3) == [12, 13]  # at most remaining - 1
    assert pld.draft([10, 11, 12, 10, 11], remaining=1) == []
    tree = pld.propose(Context(tokens=[10, 11, 12, 10, 11], prompt_len=5, remaining=50))
    assert tree.tokens.tolist() == [11, 12, 10, 11] and tree.parents.tolist() == [-1, 0, 1, 2]


def test_yaml_builds_the_proposer(smollm2):
    import yaml
    model, tok, _ = smollm2
    cfg = yaml.safe_load(open("conf/method/pld.yaml"))
    assert cfg["name"] == "pld" and cfg["proposer"] == "pld"
    pld = build_proposer(cfg, method_env(model, tok))
    assert (pld.num_pred_tokens, pld.max_ngram_size, pld.lookup) == (10, 3, "transformers")

@pytest.mark.full

def test_greedy_equals_ar_on_every_task(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    pld = PromptLookup(method_env(model, tok))
    committed = steps = 0
    for task, ids in task_prompts.items():
        gen = run_generation(model, pld, ids, LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task
        committed, steps = committed + gen.new_tokens, steps + gen.steps
    assert committed / steps > 1.1  # drafts were really accepted
    spec_bench = PromptLookup(method_env(model, tok), lookup="spec_bench")
    gen = run_generation(model, spec_bench, task_prompts["summarization"], LOSSLESS_NEW_TOKENS, stops)
    assert gen.output_ids == ar_outputs["summarization"]


class ForwardCounter:
    """Counts target forwards (and the query length of each) by wrapping ``model.forward``."""

    def __init__(self, model):
        self.model, self.original, self.lengths = model, model.forward, []

    def __enter__(self):
        def forward(*args, **kwargs):
            self.lengths.append(int(kwargs["input_ids"].shape[1]))
            return self.original(*args, **kwargs)
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward  # back to the class method


@pytest.mark.parametrize("task", [pytest.param("translation", marks=pytest.mark.full), "summarization"])
def test_same_output_and_forwards_as_transformers_prompt_lookup(task, smollm2, task_prompts):
    """Our pld vs ``generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=3, do_sample=False)``.

    Forward accounting: our loop prefills ``prompt[:-1]`` in one forward that produces no token, then
    every verify step scores root + draft. transformers 5.23's ``_assisted_decoding`` has no separate
    prefill: its first forward runs the whole prompt *plus* the first lookup candidates (asserted
    below), which is exactly our step 1 with our prefill folded in. So the drafts are identical step by
    step, our verify steps == its forwards, and our forward count == its count + 1 (the token-less
    prefill). (A version whose prefill forward produced the first token without candidates would
    instead shift the lookup by one token and the counts could differ.)
    """
    model, tok, stops = smollm2
    ids = task_prompts[task]
    with ForwardCounter(model) as ours:
        gen = run_generation(model, PromptLookup(method_env(model, tok)), ids, LOSSLESS_NEW_TOKENS, stops)
    with ForwardCounter(model) as theirs, torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=LOSSLESS_NEW_TOKENS, do_sample=False,
                             prompt_lookup_num_tokens=10, max_matching_ngram_size=3)
    assert out[0, len(ids):].tolist() == gen.output_ids
    assert len(ours.lengths) == gen.steps + 1 and ours.lengths[0] == len(ids) - 1  # prefill + steps
    assert len(theirs.lengths) == gen.steps                                          # one per step
    assert theirs.lengths[0] == len(ids) + gen.tree_sizes[0] - 1  # prompt + our first draft
    # root + the same draft each step; ours is clipped to the tokens still allowed (never committable past it)
    remaining = [LOSSLESS_NEW_TOKENS - sum(gen.accept_lengths[:i]) for i in range(gen.steps)]
    assert gen.tree_sizes[1:] == [min(t, r) for t, r in zip(theirs.lengths[1:], remaining[1:])]
    assert max(gen.tree_sizes) > 1


def test_sampling_is_exact():
    """The exact rule on PLD's real first draft: the first two committed tokens ~ p(x1) p(x2 | x1).

    The chain is scored once; the rule runs many times on it; a trial that commits one token only
    gets its second token from the target's p(. | x1) (what the next step does)."""
    V, trials = 6, 20_000
    prompt = [0, 1, 2, 3, 4, 5, 1, 2, 3, 1, 2]  # last 2-gram [1, 2] recurs: draft 3 -> 4 -> 5 -> 1
    model = tiny_llama(vocab=V, seed=2)
    pld = PromptLookup(method_env(model), num_pred_tokens=4, max_ngram_size=3)
    counts, exact, accepted, tree = first_two_tokens_histogram(model, pld, prompt, trials)
    assert tree.tokens.tolist() == [2, 3, 4, 5, 1]
    assert_same_distribution(counts, exact)
    assert accepted > trials // 20
