"""specdec.token_acceptance: the per-rule acceptance probabilities it reports are those of the shipped rules.

The exact formulas (SpecInfer, K-SEQ, Khisti et al.'s IS) are checked against an enumeration or against the
shipped rule's Monte Carlo rate on test_multidraft's hand-built p and q; RSD's Monte Carlo against an
enumeration of ordered draws without replacement.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from test_khisti import is_cases, is_first_token_counts, specinfer_acceptance
from test_multidraft import first_token_counts

from methods.khisti import truncate_top_m
from specdec.drafter import EarlyExitDrafter
from specdec.token_acceptance import accept_is, accept_kseq, accept_rsd, accept_specinfer, clustered_mean, summarize
from specdec.tree import IID_KSEQ

TRIALS = 6_000
CASES = ["random", "q_zeros_where_p_not", "p_zeros_where_q_not", "nearly_disjoint", "q_top3"]


def pq(case):
    p, q = is_cases()[case]
    return torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)


def within_noise(rate: float, exact: float, trials: int = TRIALS) -> bool:
    """|rate - exact| within 4.5 binomial standard errors (a floor of 1e-3 for exact rates of 0 or 1)."""
    return abs(rate - exact) <= 4.5 * max(math.sqrt(exact * (1 - exact) / trials), 1e-3)


@pytest.mark.parametrize("case", CASES)
def test_specinfer_closed_form_equals_the_enumeration_of_draws(case):
    p, q = pq(case)
    for k in (1, 2, 3):
        assert accept_specinfer(p, q, k) == pytest.approx(specinfer_acceptance(p.double().numpy(),
                                                                               q.double().numpy(), k), abs=1e-6)


@pytest.mark.parametrize("case", ["random", "q_zeros_where_p_not", "q_top3"])
def test_kseq_and_is_formulas_match_the_shipped_rules(case):
    p, q = pq(case)
    _, kseq_rate = first_token_counts(IID_KSEQ, p.double().numpy(), q.double().numpy(), 3, TRIALS)
    assert within_noise(kseq_rate, accept_kseq(p, q, 3)), (kseq_rate, accept_kseq(p, q, 3))
    _, is_rate = is_first_token_counts(p.double().numpy(), q.double().numpy(), 3, TRIALS)
    assert within_noise(is_rate, accept_is(p, q, 3)), (is_rate, accept_is(p, q, 3))


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
        rates = [accept_specinfer(p, p, k), accept_kseq(p, p, k), accept_is(p, p, k), accept_rsd(p, p, k, 200, gen)]
        assert rates == pytest.approx([1.0] * 4, abs=1e-6)
    half = torch.tensor([1, 1, 1, 0, 0, 0.0])
    p_half, q_half = half * p / (half * p).sum(), (1 - half) * p / ((1 - half) * p).sum()
    rates = [accept_specinfer(p_half, q_half, 3), accept_kseq(p_half, q_half, 3),
             accept_is(p_half, q_half, 3), accept_rsd(p_half, q_half, 3, 200, gen)]
    assert rates == pytest.approx([0.0] * 4, abs=1e-9)


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
    row = summarize(rates, np.array([0, 1, 2]), [4])[0]
    assert row["K"] == 4 and row["spectr-specinfer"] == pytest.approx(0.1)
    assert math.isnan(row["z spectr-specinfer"])  # a constant difference has no spread to measure it against
    assert row["khisti-spectr"] == pytest.approx(0.0) and row["spectr"] == pytest.approx(0.6)
