"""analysis.token_acceptance: the per-rule acceptance probabilities it reports are those of the shipped rules.

The exact formulas (SpecInfer, K-SEQ, Khisti et al.'s LP selection, the harness's SIR variant) are checked
against an enumeration or against the shipped rule's Monte Carlo rate on test_multidraft's hand-built p and
q; RSD's Monte Carlo against an enumeration of ordered draws without replacement; one node's report has
every rule, with khisti = SpS at K = 1 and nothing above the optimum.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from test_khisti import is_cases, is_first_token_counts
from test_multidraft import first_token_counts

from methods.khisti_sir import truncate_top_m
from specdec.verify.acceptance import ISSelection
from specdec.drafters import EarlyExitDrafter
from analysis.token_acceptance import (RULES, accept_khisti, accept_kseq, accept_rsd, accept_sir, accept_specinfer,
                                      clustered_mean, node_acceptance, summarize)
from specdec.verify.tree import IID_KSEQ

TRIALS = 6_000
CASES = ["random", "q_zeros_where_p_not", "p_zeros_where_q_not", "nearly_disjoint", "q_top3"]


def pq(case):
    p, q = is_cases()[case]
    return torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)


def within_noise(rate: float, exact: float, trials: int = TRIALS) -> bool:
    """|rate - exact| within 4.5 binomial standard errors (a floor of 1e-3 for exact rates of 0 or 1)."""
    return abs(rate - exact) <= 4.5 * max(math.sqrt(exact * (1 - exact) / trials), 1e-3)


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


@pytest.mark.parametrize("case", CASES)
def test_specinfer_closed_form_equals_the_enumeration_of_draws(case):
    p, q = pq(case)
    for k in (1, 2, 3):
        assert accept_specinfer(p, q, k) == pytest.approx(specinfer_acceptance(p.double().numpy(),
                                                                               q.double().numpy(), k), abs=1e-6)


@pytest.mark.parametrize("case", ["random", "q_zeros_where_p_not", "q_top3"])
def test_kseq_khisti_and_sir_formulas_match_the_shipped_rules(case):
    p, q = pq(case)
    p64, q64 = p.double().numpy(), q.double().numpy()
    _, kseq_rate = first_token_counts(IID_KSEQ, p64, q64, 3, TRIALS)
    assert within_noise(kseq_rate, accept_kseq(p, q, 3)), (kseq_rate, accept_kseq(p, q, 3))
    for lp_tokens, tail_classes in ((5, 3), (2, 1)):
        _, lp_rate = is_first_token_counts(p64, q64, 3, TRIALS, selection=ISSelection("lp", lp_tokens, tail_classes))
        exact = accept_khisti(p, q, 3, lp_tokens, tail_classes)
        assert within_noise(lp_rate, exact), (lp_rate, exact)
    _, sir_rate = is_first_token_counts(p64, q64, 3, TRIALS, selection=ISSelection("sir"))
    assert within_noise(sir_rate, accept_sir(p, q, 3)), (sir_rate, accept_sir(p, q, 3))


def rsd_acceptance(p: np.ndarray, q: np.ndarray, k: int) -> float:
    """RSD's acceptance by enumeration: every ordered tuple of k distinct draws without replacement."""
    total = 0.0
    for draws in itertools.permutations(np.flatnonzero(q), min(k, int((q > 0).sum()))):
        prob, residual, remaining, reject = 1.0, p, q.copy(), 1.0
        for x in draws:
            prob *= remaining[x]
            reject *= 1 - min(1.0, residual[x] / remaining[x])
            leftover = np.maximum(residual - remaining, 0)
            if leftover.sum() <= 0:
                break
            residual = leftover / leftover.sum()
            remaining = remaining.copy()
            remaining[x] = 0
            if remaining.sum() <= 0:
                break
            remaining = remaining / remaining.sum()
        total += prob * (1 - reject)
    return total


@pytest.mark.parametrize("case", ["random", "q_zeros_where_p_not", "nearly_disjoint"])
def test_rsd_monte_carlo_matches_the_enumeration(case):
    p, q = pq(case)
    rate = accept_rsd(p, q, 2, TRIALS, torch.Generator().manual_seed(0))
    exact = rsd_acceptance(p.double().numpy(), q.double().numpy(), 2)
    assert within_noise(rate, exact), (rate, exact)


def test_every_rule_accepts_surely_when_q_is_p_and_never_when_disjoint():
    p, _ = pq("random")
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3):
        rates = [accept_specinfer(p, p, k), accept_kseq(p, p, k), accept_khisti(p, p, k), accept_sir(p, p, k),
                 accept_rsd(p, p, k, 200, gen)]
        assert rates == pytest.approx([1.0] * 5, abs=1e-6)
    half = torch.tensor([1, 1, 1, 0, 0, 0.0])
    p_half, q_half = half * p / (half * p).sum(), (1 - half) * p / ((1 - half) * p).sum()
    rates = [accept_specinfer(p_half, q_half, 3), accept_kseq(p_half, q_half, 3), accept_khisti(p_half, q_half, 3),
             accept_sir(p_half, q_half, 3), accept_rsd(p_half, q_half, 3, 200, gen)]
    assert rates == pytest.approx([0.0] * 5, abs=1e-9)


def test_node_report_has_every_rule_khisti_is_sps_at_k1_and_none_beats_the_optimum():
    """One LM-like node over 1000 tokens (a long tail): every rule reported; at K = 1 khisti is SpS exactly
    and khisti_sir is SpS against the top-M q; no rule exceeds ``optimal`` (RSD up to its Monte Carlo noise)."""
    g = np.random.default_rng(4)
    z = 3 * g.standard_normal(1000)
    p = torch.softmax(torch.tensor(z), -1).float()
    q = torch.softmax(torch.tensor(z + g.standard_normal(1000)), -1).float()
    ks = [1, 2, 4]
    rates = node_acceptance(p, q, ks, top_m=10, trials=100, generator=torch.Generator().manual_seed(0))
    assert set(rates) == set(RULES)
    sps = float(torch.minimum(p.double(), q.double() / q.double().sum()).sum())
    assert rates["khisti"][0] == pytest.approx(sps, abs=1e-9)
    assert rates["khisti"][0] == pytest.approx(rates["specinfer"][0], abs=1e-6)  # SpS (specinfer: q unnormalised)
    assert rates["khisti_sir"][0] == pytest.approx(float(torch.minimum(p, truncate_top_m(q, 10)).sum()), abs=1e-6)
    for i in range(len(ks)):
        for rule in ("specinfer", "spectr", "khisti", "khisti_sir"):
            assert rates[rule][i] <= rates["optimal"][i] + 1e-9, (rule, ks[i])
        assert rates["rsd"][i] <= rates["optimal"][i] + 0.1
    assert rates["khisti"][1] > rates["specinfer"][1] and rates["khisti"][2] > rates["khisti"][1]


def test_truncate_top_m_keeps_the_m_largest_renormalised():
    q = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert torch.allclose(truncate_top_m(q, 2), torch.tensor([0, 4 / 7, 0, 3 / 7]))


def test_teacher_forced_rows_equal_the_drafter_followed_step_by_step():
    model = tiny_llama()
    ids = [5, 9, 2, 33, 17, 8]
    drafter = EarlyExitDrafter(model, 1, 64)
    forced = drafter.teacher_forced(ids)                                          # [6, V]
    for i in range(1, len(ids)):
        drafter.begin(ids[:i])
        assert torch.allclose(drafter.follow(ids[:i]), forced[i - 1], atol=1e-5)


def test_clustered_mean_and_paired_summary():
    values, clusters = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0, 0, 1, 1])
    mean, se = clustered_mean(values, clusters)
    # cluster totals of deviations: +1, -1 -> sqrt(2 * 2) / 4 = 0.5
    assert mean == 0.5 and se == pytest.approx(0.5)
    rates = {"specinfer": np.array([[0.5], [0.6], [0.4]]), "spectr": np.array([[0.6], [0.7], [0.5]]),
             "khisti": np.array([[0.6], [0.7], [0.5]]), "rsd": np.array([[0.5], [0.6], [0.4]])}
    row = summarize(rates, np.array([0, 1, 2]), [4])[0]  # a report without khisti_sir / optimal (older runs)
    assert row["K"] == 4 and row["spectr-specinfer"] == pytest.approx(0.1)
    assert math.isnan(row["z spectr-specinfer"])  # a constant difference has no spread to measure it against
    assert row["khisti-spectr"] == pytest.approx(0.0) and row["spectr"] == pytest.approx(0.6)
    assert "khisti_sir" not in row and "khisti-khisti_sir" not in row
    rates.update(khisti_sir=np.array([[0.55], [0.6], [0.45]]), optimal=np.array([[0.7], [0.8], [0.6]]))
    row = summarize(rates, np.array([0, 1, 2]), [4])[0]
    assert row["khisti-khisti_sir"] == pytest.approx(0.2 / 3) and row["optimal-khisti"] == pytest.approx(0.1)
