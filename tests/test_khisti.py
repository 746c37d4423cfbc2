"""Khisti et al.'s two-step importance-sampling rule (``multi_draft_is``, spectr_multidraft.md §5) and the
``khisti`` method (methods/khisti.py).

* One node, K = 2 and 3 i.i.d. draws of hand-built q (q = p, q with zeros where p is not, q nearly disjoint
  from p, q truncated to its top M; p zero on every draft at K = 3): the first committed token is distributed
  as p, and the measured acceptance equals sum min(p, r). A wrong r (r = q) fails the same test.
* r by enumeration equals the spec's K = 2 closed form, sums to 1, is q at K = 1; a too-large enumeration
  is one clear UserError naming the knobs.
* Acceptance sum min(p, r) against SpecInfer's (exact, over all ordered draws) for drafts at another
  temperature than the target.
* Two steps through the method's real tree (tiny random target + tiny drafter, T = 1, fresh tree per trial).
* Greedy: identical to AR on real SmolLM2 prompts (drafter early_exit); ``method=khisti`` composes.
"""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from conftest import (LOSSLESS_NEW_TOKENS, assert_same_distribution, first_two_tokens_histogram, method_env,
                      run_generation, tiny_llama)
from scipy.stats import chisquare
from test_multidraft import NODE_TRIALS, V, draw_children, pq_cases

import specdec.acceptance
from specdec.acceptance import Sampling, is_selection_law, sampling_processors
from specdec.drafter import HFDrafter, build_drafter
from specdec.errors import UserError
from specdec.models import vocab_size
from specdec.proposer import build_proposer
from specdec.tree import IID, MULTI_DRAFT_IS

KHISTI = dict(proposer="khisti", k=3, length=2, top_m=10)  # a small tree for the end-to-end tests


def is_cases():
    """test_multidraft's p/q pairs plus a nearly disjoint q and a q truncated to its top 3 (renormalised)."""
    cases = pq_cases()
    p, q = cases["random"]
    near = np.array([0.01, 0.01, 0.01, 0.3, 0.3, 0.37])
    cases["nearly_disjoint"] = (cases["disjoint"][0], near)  # p lives on tokens 0-2
    top3 = np.where(q >= np.sort(q)[-3], q, 0.0)
    cases["q_top3"] = (p, top3 / top3.sum())
    return cases


def exact_r(p: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return is_selection_law(torch.tensor(p), torch.tensor(q), k).numpy()


def is_first_token_counts(p, q, k: int, trials: int, seed: int = 0):
    """Counts [V] of the token committed at one node with k i.i.d. draws of q, and the acceptance rate."""
    rng = np.random.default_rng(seed)
    rule = Sampling(sampling_processors(1.0), torch.Generator().manual_seed(seed))
    target_probs, draft_probs = torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)
    counts, accepted = np.zeros(V), 0
    for _ in range(trials):
        children, mult = draw_children(IID, q, k, rng)
        tokens = [0] + children                       # node 0 is the root; children are nodes 1..n
        child, token = rule._multi_draft_is(target_probs, draft_probs, list(range(1, len(tokens))), tokens,
                                            torch.tensor([1] + mult))
        counts[token] += 1
        accepted += child is not None
        assert child is None or tokens[child] == token
    return counts, accepted / trials


NODE_CASES = [(k, case) for k in (2, 3) for case in ("q_equals_p", "q_zeros_where_p_not", "nearly_disjoint", "q_top3")]
NODE_CASES += [(3, "disjoint")]  # p = 0 on every draft: the uniform-pick convention (one K: keeps the file short)


@pytest.mark.parametrize("k,case", NODE_CASES)
def test_one_node_output_is_distributed_as_p(k, case):
    p, q = is_cases()[case]
    counts, acc = is_first_token_counts(p, q, k, NODE_TRIALS, seed=k)
    support = p > 0
    assert counts[~support].sum() == 0                                   # never a token p excludes
    assert chisquare(counts[support], p[support] * NODE_TRIALS).pvalue > 1e-3
    assert np.abs(counts / NODE_TRIALS - p).max() < 0.025               # >= 3.9 sigma at 6000 draws
    expected = np.minimum(p, exact_r(p, q, k)).sum()                     # P(accept) = sum min(p, r)
    assert abs(acc - expected) <= 4 * np.sqrt(expected * (1 - expected) / NODE_TRIALS) + 1e-9
    if case == "q_equals_p":
        assert acc == 1.0
    if case == "disjoint":                                               # p = 0 on every draft: uniform pick, r > 0
        assert acc == 0.0


def test_a_wrong_r_fails_the_node_test(monkeypatch):
    """Negative control: single-draft SD against q instead of the selection's law r is biased."""
    p, q = is_cases()["random"]
    monkeypatch.setattr(specdec.acceptance, "is_selection_law", lambda tp, dp, k: dp.double())
    counts, _ = is_first_token_counts(p, q, 3, NODE_TRIALS)
    assert chisquare(counts, p * NODE_TRIALS).pvalue < 1e-3


def test_r_matches_the_k2_closed_form_and_is_a_distribution():
    for case, (p, q) in is_cases().items():
        on = q > 0
        w = np.where(on, p / np.where(on, q, 1), 0.0)
        pair = lambda y, x: w[y] / (w[y] + w[x]) if w[y] + w[x] > 0 else 0.5  # noqa: E731  (both w = 0: uniform)
        closed = np.array([q[y] ** 2 + 2 * q[y] * sum(q[x] * pair(y, x) for x in range(V) if x != y and q[x] > 0)
                           for y in range(V)])
        np.testing.assert_allclose(exact_r(p, q, 2), closed, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(exact_r(p, q, 1), q, atol=1e-12, err_msg=case)  # K = 1: SpS
        for k in (2, 3, 5):
            r = exact_r(p, q, k)
            assert abs(r.sum() - 1) < 1e-12 and r.min() >= 0 and (r[q == 0] == 0).all(), (case, k)


def test_too_large_enumeration_is_a_clear_error():
    with pytest.raises(UserError, match="top_m or method.k"):
        is_selection_law(torch.ones(64) / 64, torch.ones(64) / 64, 8)      # C(71, 8) ~ 1e10 multisets


def specinfer_acceptance(p: np.ndarray, q: np.ndarray, k: int) -> float:
    """SpecInfer's exact acceptance at one node: over every ordered k-tuple of draws, 1 - prod(rejections)."""
    total = 0.0
    for draws in itertools.product(np.flatnonzero(q), repeat=k):
        residual, reject = p, 1.0
        for x in draws:
            reject *= 1 - min(1.0, residual[x] / q[x])
            leftover = np.maximum(residual - q, 0)
            if leftover.sum() <= 0:
                break
            residual = leftover / leftover.sum()
        total += np.prod(q[list(draws)]) * (1 - reject)
    return total


def test_acceptance_not_below_specinfer_with_drafts_at_another_temperature():
    """Drafts sharper than the target (draft at T = 0.5, target at T = 1): sum min(p, r) >= SpecInfer's."""
    logits = np.log(np.array([5.0, 3, 1, 0.5, 0.3, 0.2]))
    p, q = np.exp(logits) / np.exp(logits).sum(), np.exp(2 * logits) / np.exp(2 * logits).sum()
    for k in (2, 3):
        is_acc, si_acc = np.minimum(p, exact_r(p, q, k)).sum(), specinfer_acceptance(p, q, k)
        assert is_acc >= si_acc, (k, is_acc, si_acc)       # measured: 0.858 vs 0.847 (K=2), 0.882 vs 0.853 (K=3)


# ---------------------------------------------------------------------- the method end to end
def test_two_steps_through_the_real_tree_follow_the_target():
    """Tiny random target + tiny drafter, T = 1, a new tree per trial: p(x1) p(x2 | x1); q truncated to top 3."""
    vocab = 5
    target = tiny_llama(vocab=vocab, layers=2, seed=1)
    drafter = HFDrafter(tiny_llama(vocab=vocab, layers=1, seed=2), vocab)
    env = dataclasses.replace(method_env(target), drafter=drafter, temperature=1.0, seed=3)
    proposer = build_proposer(dict(KHISTI, top_m=3), env)
    proposer.reset("run")
    trials = 2000  # one propose + verify per trial: 25 cells, sampling noise alone gives TV ~0.045
    counts, exact, accepted, tree = first_two_tokens_histogram(target, proposer, [1, 2, 3, 4, 0], trials,
                                                               fresh_tree=True)
    assert_same_distribution(counts, exact, max_tv=0.08)
    assert tree.kind == MULTI_DRAFT_IS and int(tree.multiplicity[0]) == 3
    has_kids = [bool(kids) for kids in tree.children]
    assert ((tree.draft_probs[has_kids] > 0).sum(-1) == 3).all()            # the stored q is the top-3 law
    torch.testing.assert_close(tree.draft_probs[has_kids].sum(-1), torch.ones(sum(has_kids)))
    assert accepted > trials // 4                                            # drafts were accepted


def test_method_config_composes_and_checks_the_enumeration(smollm2):
    from omegaconf import OmegaConf
    from test_configs import compose_config

    cfg = OmegaConf.to_container(compose_config("method=khisti", "drafter=early_exit").method, resolve=True)
    assert cfg["name"] == "khisti" and cfg["top_m"] == 10
    model, tok, _ = smollm2
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 2}, model, tok, vocab_size(model))
    env = dataclasses.replace(method_env(model, tok), drafter=drafter)
    assert build_proposer(cfg, env).top_m == 10
    with pytest.raises(UserError, match="top_m or method.k"):
        build_proposer(dict(cfg, top_m=40, k=8), env)


@pytest.mark.slow
def test_khisti_greedy_equals_ar_on_smollm2(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 4}, model, tok, vocab_size(model))
    proposer = build_proposer(KHISTI, dataclasses.replace(method_env(model, tok), drafter=drafter))
    for task in ("math_reasoning", "translation"):
        gen = run_generation(model, proposer, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task
