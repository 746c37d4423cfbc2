"""Khisti et al.'s multi-draft rule (``multi_draft_is``; arXiv 2410.18234) and the methods ``khisti`` (the
paper's LP-optimised selection, drafts from the full q) and ``khisti_sir`` (the harness's simplified
variant: top-M drafting + self-normalised IS pick).

* LP selection, one node, vocab 6: the committed token is distributed as p (2e5 trials, max |freq - p|
  < 0.003) with every token its own LP symbol and with a truncated alphabet (2 tokens + 2 tail runs), and
  on hand-built q (q = p, zeros, nearly disjoint, disjoint); the measured acceptance is sum min(p, r).
  Serving SD against q instead of r fails the same test.
* r is exact: the closed form equals a brute-force enumeration of every ordered draw tuple through the
  selection's own definition; r sums to 1 and vanishes off q's support.
* K = 1 is SpS: r = q and the acceptance is sum min(p, q) (also on a 5000-token vocabulary with tail runs).
* Optimality: with every token its own symbol the LP attains min_S p(S) + 1 - q(S)^K (brute force over S),
  so it accepts at least as much as SpecInfer and K-SEQ (exact acceptances) at K = 2, 4; with the default
  truncation it does so on average over LM-like pairs on 2000 tokens, and never below SpS.
* Greedy collapse: p one-hot accepts exactly when the argmax was drafted; under temperature 0 the method
  commits what AR commits (tiny model) and on real SmolLM2 prompts (slow).
* Two steps through the method's real tree (tiny target + tiny drafter, T = 1, fresh tree per trial).
* khisti_sir: its r by enumeration equals the K = 2 closed form; node exactness; a too-large enumeration
  is one clear UserError; configs compose.
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

import specdec.verify.acceptance
from specdec.verify.acceptance import (ISSelection, MultiDraftTree, Sampling, hit_set_probs, is_selection_law,
                                lp_selection, optimal_acceptance_bound, sampling_processors, selection_classes)
from specdec.drafters import HFDrafter, build_drafter
from specdec.errors import UserError
from specdec.models import vocab_size
from specdec.verify.proposer import build_proposer
from analysis.token_acceptance import accept_kseq, accept_specinfer
from specdec.verify.tree import IID, MULTI_DRAFT_IS

KHISTI = dict(proposer="khisti", k=3, length=2)  # a small tree for the end-to-end tests
EXACT_TRIALS = 200_000
FULL = ISSelection("lp", lp_tokens=V, tail_classes=1)      # every vocab-6 token its own LP symbol
TRUNCATED = ISSelection("lp", lp_tokens=2, tail_classes=2)  # 2 single tokens + 2 tail runs of 2 tokens
SIR = ISSelection("sir")


def is_cases():
    """test_multidraft's p/q pairs plus a nearly disjoint q and a q truncated to its top 3 (renormalised)."""
    cases = pq_cases()
    p, q = cases["random"]
    near = np.array([0.01, 0.01, 0.01, 0.3, 0.3, 0.37])
    cases["nearly_disjoint"] = (cases["disjoint"][0], near)  # p lives on tokens 0-2
    top3 = np.where(q >= np.sort(q)[-3], q, 0.0)
    cases["q_top3"] = (p, top3 / top3.sum())
    return cases


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def lp_law(p, q, k: int, selection: ISSelection = FULL) -> np.ndarray:
    return lp_selection(t64(p), t64(q), k, selection.lp_tokens, selection.tail_classes).law.numpy()


def exact_r(p: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """khisti_sir's r."""
    return is_selection_law(torch.tensor(p), torch.tensor(q), k).numpy()


def is_first_token_counts(p, q, k: int, trials: int, seed: int = 0, selection: ISSelection = FULL):
    """Counts [V] of the token committed at one node with k i.i.d. draws of q, and the acceptance rate."""
    rng = np.random.default_rng(seed)
    rule = Sampling(sampling_processors(1.0), torch.Generator().manual_seed(seed))
    target_probs, draft_probs = torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)
    counts, accepted = np.zeros(V), 0
    for _ in range(trials):
        children, mult = draw_children(IID, q, k, rng)
        tokens = [0] + children                       # node 0 is the root; children are nodes 1..n
        child, token = rule._multi_draft_is(target_probs, draft_probs, list(range(1, len(tokens))), tokens,
                                            torch.tensor([1] + mult), selection)
        counts[token] += 1
        accepted += child is not None
        assert child is None or tokens[child] == token
    return counts, accepted / trials


def rule_law(p, q, k, selection):
    """r as the rule itself sees it (float32 p, q, as in a tree)."""
    return lp_law(np.float32(p).astype(np.float64), np.float32(q).astype(np.float64), k, selection)


@pytest.mark.full
# ---------------------------------------------------------------------- LP selection: exactness at one node
@pytest.mark.parametrize("k,selection", [(2, FULL), (4, TRUNCATED)], ids=["k2-full", "k4-truncated"])
def test_lp_rule_output_is_distributed_as_p_2e5_trials(k, selection):
    p, q = pq_cases()["random"]
    counts, acc = is_first_token_counts(p, q, k, EXACT_TRIALS, seed=k, selection=selection)
    assert np.abs(counts / EXACT_TRIALS - p).max() < 0.003
    assert chisquare(counts, p * EXACT_TRIALS).pvalue > 1e-3
    expected = np.minimum(p, rule_law(p, q, k, selection)).sum()          # P(accept) = sum min(p, r)
    assert abs(acc - expected) <= 4 * np.sqrt(expected * (1 - expected) / EXACT_TRIALS)
    if selection is TRUNCATED:
        assert len(selection_classes(p, q, 2, 2)) == 4                    # the tail runs were exercised


NODE_CASES = [(k, case, sel) for k in (2, 3) for case in ("q_equals_p", "q_zeros_where_p_not", "nearly_disjoint",
                                                          "q_top3") for sel in ("full", "truncated")]
NODE_CASES += [(3, "disjoint", "full")]  # p = 0 on every draft: acceptance 0, the residual is p


@pytest.mark.parametrize("k,case,sel", NODE_CASES)
def test_lp_rule_output_is_distributed_as_p_on_hand_built_q(k, case, sel):
    selection = {"full": FULL, "truncated": TRUNCATED}[sel]
    p, q = is_cases()[case]
    counts, acc = is_first_token_counts(p, q, k, NODE_TRIALS, seed=k, selection=selection)
    support = p > 0
    assert counts[~support].sum() == 0                                   # never a token p excludes
    assert chisquare(counts[support], p[support] * NODE_TRIALS).pvalue > 1e-3
    assert np.abs(counts / NODE_TRIALS - p).max() < 0.025               # >= 3.9 sigma at 6000 draws
    expected = np.minimum(p, rule_law(p, q, k, selection)).sum()
    assert abs(acc - expected) <= 4 * np.sqrt(expected * (1 - expected) / NODE_TRIALS) + 1e-6
    if case == "q_equals_p":
        assert acc == pytest.approx(1.0, abs=1e-3)                       # the optimum is 1 when q = p
    if case == "disjoint":
        assert acc == 0.0


def test_sd_against_q_instead_of_r_fails_the_node_test(monkeypatch):
    """Negative control: the same pick, served single-draft SD against q instead of its law r, is biased."""
    p, q = pq_cases()["random"]
    real = specdec.verify.acceptance.lp_selection

    def wrong(target_probs, draft_probs, k, lp_tokens, tail_classes):
        chosen = real(target_probs, draft_probs, k, lp_tokens, tail_classes)
        return dataclasses.replace(chosen, law=draft_probs.double() / draft_probs.double().sum())

    monkeypatch.setattr(specdec.verify.acceptance, "lp_selection", wrong)
    counts, _ = is_first_token_counts(p, q, 3, NODE_TRIALS)
    assert chisquare(counts, p * NODE_TRIALS).pvalue < 1e-3


# ---------------------------------------------------------------------- r is the law of the pick
def enumerated_law(p, q, k, selection) -> np.ndarray:
    """The law of the picked token by brute force: every ordered k-tuple of draws, the rule's own steps
    (set of classes hit -> class ~ beta -> one of that class's draws uniformly)."""
    chosen = lp_selection(t64(p), t64(q), k, selection.lp_tokens, selection.tail_classes)
    law = np.zeros(len(q))
    for draws in itertools.product(np.flatnonzero(q > 0), repeat=k):
        prob = np.prod(q[list(draws)] / q.sum())
        classes = chosen.class_of[list(draws)]
        beta = chosen.beta[int(np.bitwise_or.reduce(np.left_shift(1, classes)))]
        for g in np.flatnonzero(beta):
            in_class = [x for x, c in zip(draws, classes) if c == g]
            for x in in_class:
                law[x] += prob * beta[g] / len(in_class)
    return law


@pytest.mark.parametrize("case", ["random", "q_zeros_where_p_not", "nearly_disjoint"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_closed_form_r_equals_the_enumeration_of_draws(case, k):
    p, q = is_cases()[case]
    for selection in (FULL, TRUNCATED, ISSelection("lp", 1, 1)):
        r = lp_law(p, q, k, selection)
        np.testing.assert_allclose(r, enumerated_law(p, q, k, selection), atol=1e-12, err_msg=str(selection))
        assert abs(r.sum() - 1) < 1e-12 and r.min() >= 0 and (r[q == 0] == 0).all()


def test_hit_set_probabilities_sum_to_one_and_match_the_enumeration():
    mass = np.array([0.5, 0.3, 0.2])
    members, probs = hit_set_probs(mass, 3)
    brute = np.zeros(8)
    for draws in itertools.product(range(3), repeat=3):
        brute[sum(1 << d for d in set(draws))] += np.prod(mass[list(draws)])
    np.testing.assert_allclose(probs, brute, atol=1e-15)
    assert members[5].tolist() == [True, False, True]


# ---------------------------------------------------------------------- K = 1 is SpS
def test_k1_selection_is_sps():
    for case, (p, q) in is_cases().items():
        for selection in (FULL, TRUNCATED):
            r = lp_law(p, q, 1, selection)
            np.testing.assert_allclose(r, q / q.sum(), atol=1e-15, err_msg=case)
            chosen = lp_selection(t64(p), t64(q), 1, selection.lp_tokens, selection.tail_classes)
            assert chosen.acceptance(t64(p)) == pytest.approx(np.minimum(p, q).sum(), abs=1e-12)
    g = np.random.default_rng(0)                                          # a real-sized tail: 5000 tokens
    p, q = g.dirichlet(np.full(5000, 0.1)), g.dirichlet(np.full(5000, 0.1))
    chosen = lp_selection(t64(p), t64(q), 1)
    assert len(chosen.classes) == 8
    np.testing.assert_allclose(chosen.law.numpy(), q, atol=1e-15)
    assert chosen.acceptance(t64(p)) == pytest.approx(np.minimum(p, q).sum(), abs=1e-12)


# ---------------------------------------------------------------------- optimality and the baselines
def subset_optimum(p, q, k) -> float:
    """min over every S of p(S) + 1 - q(S)^k (brute force)."""
    return min(p[list(s)].sum() + 1 - q[list(s)].sum() ** k
               for size in range(len(p) + 1) for s in itertools.combinations(range(len(p)), size))


def random_pairs(n: int, seed: int):
    g = np.random.default_rng(seed)
    return [(g.dirichlet(np.full(V, 0.7)), g.dirichlet(np.full(V, 0.7))) for _ in range(n)]


def test_untruncated_lp_attains_the_optimum():
    for p, q in random_pairs(15, seed=1):
        for k in (2, 3, 4):
            best = subset_optimum(p, q, k)
            acc = np.minimum(p, lp_law(p, q, k)).sum()
            assert acc == pytest.approx(best, abs=1e-6), k
            assert optimal_acceptance_bound(t64(p), t64(q), k) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_lp_accepts_at_least_specinfer_and_kseq(k):
    """Exact acceptances on 30 random vocab-6 pairs: the paper's selection (every token its own symbol, which
    the default knobs give on 6 tokens) is never below SpecInfer or K-SEQ, and strictly above on average."""
    gains = []
    for p, q in random_pairs(30, seed=k):
        lp = np.minimum(p, lp_law(p, q, k, ISSelection())).sum()
        si, ks = accept_specinfer(t64(p), t64(q), k), accept_kseq(t64(p), t64(q), k)
        assert lp >= si - 1e-6 and lp >= ks - 1e-6, (lp, si, ks)
        gains.append(lp - max(si, ks))
    assert np.mean(gains) > 0.005


def lm_pairs(n: int, seed: int, vocab: int = 2000):
    """Softmax pairs over a long tail: target logits ~ 3 N(0, 1), draft = target + N(0, 1) noise."""
    g = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        z = 3 * g.standard_normal(vocab)
        zq = z + g.standard_normal(vocab)
        p, q = np.exp(z - z.max()), np.exp(zq - zq.max())
        pairs.append((p / p.sum(), q / q.sum()))
    return pairs


@pytest.mark.parametrize("k", [2, 4])
def test_truncated_lp_beats_specinfer_and_kseq_on_average_over_a_long_tail(k):
    """The default truncation (5 tokens + 3 tail runs) on 2000-token LM-like pairs: never below SpS
    (its chords are exact at the SpS point), and on average at least SpecInfer's and K-SEQ's acceptance."""
    rows = []
    for p, q in lm_pairs(12, seed=k):
        lp = lp_selection(t64(p), t64(q), k).acceptance(t64(p))
        assert lp >= np.minimum(p, q).sum() - 1e-6
        assert lp <= optimal_acceptance_bound(t64(p), t64(q), k) + 1e-9
        rows.append([lp, accept_specinfer(t64(p), t64(q), k), accept_kseq(t64(p), t64(q), k)])
    lp, si, ks = np.mean(rows, axis=0)
    assert lp >= si and lp >= ks, (lp, si, ks)


# ---------------------------------------------------------------------- greedy collapse
@pytest.mark.parametrize("selection", [FULL, TRUNCATED], ids=["full", "truncated"])
def test_one_hot_target_accepts_exactly_when_its_token_is_drafted(selection):
    _, q = pq_cases()["random"]
    target = int(np.argsort(q)[1])                                        # a low-q token: not the draft's top
    p = np.eye(V)[target]
    for k in (2, 4):
        acc = np.minimum(p, lp_law(p, q, k, selection)).sum()
        assert acc == pytest.approx(1 - (1 - q[target]) ** k, abs=1e-7)
    counts, acc = is_first_token_counts(p, q, 4, 2000, selection=selection)
    assert counts[target] == 2000 and abs(acc - (1 - (1 - q[target]) ** 4)) < 0.05


def test_greedy_khisti_equals_ar_on_a_tiny_model():
    target = tiny_llama(vocab=64, layers=2, seed=1)
    drafter = HFDrafter(tiny_llama(vocab=64, layers=1, seed=2), 64)
    env = dataclasses.replace(method_env(target), drafter=drafter)       # temperature 0
    khisti = build_proposer(KHISTI, env)
    khisti.reset("run")
    prompt = [1, 5, 9, 2]
    ours = run_generation(target, khisti, prompt, 24)
    ar = run_generation(target, build_proposer({"proposer": "ar"}, method_env(target)), prompt, 24)
    assert ours.output_ids == ar.output_ids


# ---------------------------------------------------------------------- the method end to end
def test_two_steps_through_the_real_tree_follow_the_target():
    """Tiny random target + tiny drafter, T = 1, a new tree per trial: p(x1) p(x2 | x1); the tree stores the
    drafter's full q and names the LP selection with the method's knobs."""
    vocab = 5
    target = tiny_llama(vocab=vocab, layers=2, seed=1)
    drafter = HFDrafter(tiny_llama(vocab=vocab, layers=1, seed=2), vocab)
    env = dataclasses.replace(method_env(target), drafter=drafter, temperature=1.0, seed=3)
    proposer = build_proposer(dict(KHISTI, lp_tokens=2, tail_classes=1), env)
    proposer.reset("run")
    trials = 2000  # one propose + verify per trial: 25 cells, sampling noise alone gives TV ~0.045
    counts, exact, accepted, tree = first_two_tokens_histogram(target, proposer, [1, 2, 3, 4, 0], trials,
                                                               fresh_tree=True)
    assert_same_distribution(counts, exact, max_tv=0.08)
    assert isinstance(tree, MultiDraftTree) and tree.kind == MULTI_DRAFT_IS and int(tree.multiplicity[0]) == 3
    assert tree.selection == ISSelection("lp", 2, 1)
    has_kids = [bool(kids) for kids in tree.children]
    assert ((tree.draft_probs[has_kids] > 0).sum(-1) == vocab).all()     # the untouched q: full support
    torch.testing.assert_close(tree.draft_probs[has_kids].sum(-1), torch.ones(sum(has_kids)))
    assert accepted > trials // 4                                            # drafts were accepted


def test_method_configs_compose_and_check_their_knobs(smollm2):
    from omegaconf import OmegaConf
    from test_configs import compose_config

    model, tok, _ = smollm2
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 2}, model, tok, vocab_size(model))
    env = dataclasses.replace(method_env(model, tok), drafter=drafter)
    cfg = OmegaConf.to_container(compose_config("method=khisti", "drafter=early_exit").method, resolve=True)
    assert cfg["name"] == "khisti" and (cfg["lp_tokens"], cfg["tail_classes"]) == (5, 3) and "top_m" not in cfg
    assert build_proposer(cfg, env).selection == ISSelection("lp", 5, 3)
    with pytest.raises(UserError, match="lp_tokens"):
        build_proposer(dict(cfg, lp_tokens=10, tail_classes=5), env)
    sir = OmegaConf.to_container(compose_config("method=khisti_sir", "drafter=early_exit").method, resolve=True)
    assert sir["name"] == "khisti_sir" and sir["top_m"] == 10
    assert build_proposer(sir, env).top_m == 10
    with pytest.raises(UserError, match="top_m or method.k"):
        build_proposer(dict(sir, top_m=40, k=8), env)


@pytest.mark.slow
def test_khisti_greedy_equals_ar_on_smollm2(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 4}, model, tok, vocab_size(model))
    proposer = build_proposer(KHISTI, dataclasses.replace(method_env(model, tok), drafter=drafter))
    for task in ("math_reasoning", "translation"):
        gen = run_generation(model, proposer, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task


# ---------------------------------------------------------------------- khisti_sir (the simplified variant)
@pytest.mark.parametrize("k,case", [(2, "random"), (3, "q_top3"), (3, "disjoint")])
def test_sir_rule_output_is_distributed_as_p(k, case):
    p, q = is_cases()[case]
    counts, acc = is_first_token_counts(p, q, k, NODE_TRIALS, seed=k, selection=SIR)
    assert chisquare(counts[p > 0], p[p > 0] * NODE_TRIALS).pvalue > 1e-3
    assert np.abs(counts / NODE_TRIALS - p).max() < 0.025
    expected = np.minimum(p, exact_r(p, q, k)).sum()
    assert abs(acc - expected) <= 4 * np.sqrt(expected * (1 - expected) / NODE_TRIALS) + 1e-9


def test_sir_with_a_wrong_r_fails_the_node_test(monkeypatch):
    p, q = is_cases()["random"]
    monkeypatch.setattr(specdec.verify.acceptance, "is_selection_law", lambda tp, dp, k: dp.double())
    counts, _ = is_first_token_counts(p, q, 3, NODE_TRIALS, selection=SIR)
    assert chisquare(counts, p * NODE_TRIALS).pvalue < 1e-3


def test_sir_r_matches_the_k2_closed_form_and_is_a_distribution():
    for case, (p, q) in is_cases().items():
        on = q > 0
        w = np.where(on, p / np.where(on, q, 1), 0.0)
        pair = lambda y, x: w[y] / (w[y] + w[x]) if w[y] + w[x] > 0 else 0.5  # noqa: E731  (both w = 0: uniform)
        closed = np.array([q[y] ** 2 + 2 * q[y] * sum(q[x] * pair(y, x) for x in range(V) if x != y and q[x] > 0)
                           for y in range(V)])
        np.testing.assert_allclose(exact_r(p, q, 2), closed, atol=1e-12, err_msg=case)
        np.testing.assert_allclose(exact_r(p, q, 1), q, atol=1e-12, err_msg=case)
        for k in (2, 3, 5):
            r = exact_r(p, q, k)
            assert abs(r.sum() - 1) < 1e-12 and r.min() >= 0 and (r[q == 0] == 0).all(), (case, k)


def test_sir_too_large_enumeration_is_a_clear_error():
    with pytest.raises(UserError, match="top_m or method.k"):
        is_selection_law(torch.ones(64) / 64, torch.ones(64) / 64, 8)      # C(71, 8) ~ 1e10 multisets


def test_sir_method_draws_from_the_top_m_law_and_names_its_selection():
    vocab = 5
    target = tiny_llama(vocab=vocab, layers=2, seed=1)
    drafter = HFDrafter(tiny_llama(vocab=vocab, layers=1, seed=2), vocab)
    env = dataclasses.replace(method_env(target), drafter=drafter, temperature=1.0, seed=3)
    proposer = build_proposer(dict(proposer="khisti_sir", k=3, length=2, top_m=3), env)
    proposer.reset("run")
    counts, exact, _, tree = first_two_tokens_histogram(target, proposer, [1, 2, 3, 4, 0], 1000, fresh_tree=True)
    assert_same_distribution(counts, exact, max_tv=0.1)
    assert isinstance(tree, MultiDraftTree) and tree.selection == SIR
    has_kids = [bool(kids) for kids in tree.children]
    assert ((tree.draft_probs[has_kids] > 0).sum(-1) == 3).all()            # the stored q is the top-3 law
    greedy = build_proposer(dict(proposer="khisti_sir", k=3, length=2), dataclasses.replace(env, temperature=0.0))
    greedy.reset("run")
    ar = build_proposer({"proposer": "ar"}, method_env(target))
    prompt = [1, 2, 3]
    assert run_generation(target, greedy, prompt, 6).output_ids == run_generation(target, ar, prompt, 6).output_ids
