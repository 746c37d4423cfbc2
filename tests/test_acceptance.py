"""Acceptance rules on hand-made logits: the greedy path, and a statistical test per sampling rule
that the committed tokens are distributed exactly as the target's (docs/verifier.md §12.7).

The synthetic target over a 6-token vocabulary has p(. | root) and p(. | x) for every first token x.
A two-level draft tree is verified; whatever the step does not commit of the first two tokens is
completed by sampling p itself (that is what the next step would do). The joint distribution of
(token 1, token 2) over many trials must match p(x) p(y | x): a chi-square test plus a TV bound.
"""

import numpy as np
import pytest
import torch
from conftest import assert_same_distribution
from scipy.stats import chisquare

from specdec.verify.acceptance import Greedy, Sampling, make_rule, sampling_processors
from specdec.verify.tree import CHAIN_SAMPLED, DETERMINISTIC, IID, DraftTree

V = 6
TRIALS = 30_000


def test_greedy_deepest_matching_path_and_bonus():
    #        0(root)
    #      /   \
    #     1(a)  2(b)
    #    /  \     \
    #  3(c) 4(d)  5(e)
    a, b, c, d, e = 1, 2, 3, 4, 5
    tree = DraftTree(torch.tensor([0, a, b, c, d, e]), torch.tensor([-1, 0, 0, 1, 1, 2]))
    logits = torch.full((6, V), -1.0)
    argmax = {0: a, 1: d, 2: e, 3: 0, 4: c, 5: 0}  # root->a, a->d accepted; bonus at d = c
    for node, tok in argmax.items():
        logits[node, tok] = 5.0
    assert Greedy()(tree, logits) == ([0, 1, 4], c)
    logits[0] = -1.0
    logits[0, 5] = 5.0  # root argmax is no child: nothing accepted, bonus 5
    assert Greedy()(tree, logits) == ([0], 5)


def test_greedy_ties_take_the_smallest_index():
    tree = DraftTree(torch.tensor([0, 1, 1]), torch.tensor([-1, 0, 0]))  # duplicate siblings
    logits = torch.zeros(3, V)
    logits[:, 1] = 3.0
    assert Greedy()(tree, logits)[0] == [0, 1]


def test_processors_follow_generate_order():
    procs = sampling_processors(0.7, top_k=3, top_p=0.9)
    assert [type(p).__name__ for p in procs] == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert isinstance(make_rule(0.0), Greedy) and isinstance(make_rule(0.5), Sampling)


def synthetic_target(seed: int):
    """p1 [V] = p(. | root); p2 [V, V] = p(. | x)."""
    g = np.random.default_rng(seed)
    p1 = g.dirichlet(np.ones(V))
    p2 = g.dirichlet(np.ones(V), size=V)
    return p1, p2


def draft_distributions(seed: int):
    """q1 [V] = q(. | root); q2 [V, V] = q(. | x): what a sampled drafter draws children from."""
    g = np.random.default_rng(seed + 100)
    return g.dirichlet(np.ones(V)), g.dirichlet(np.ones(V), size=V)


# A fixed deterministic two-level tree (e.g. a retrieved draft): root -> {2, 4}, 2 -> {1, 3}, 4 -> {5, 0}
FIXED_TREE = DraftTree(torch.tensor([0, 2, 4, 1, 3, 5, 0]), torch.tensor([-1, 0, 0, 1, 1, 2, 2]))


def sample_tree(kind: str, q1, q2, rng: np.random.Generator):
    """Draw a draft tree the way a sampled drafter would (q stored with it)."""
    draft_probs = torch.zeros(16, V)
    if kind == CHAIN_SAMPLED:  # root -> x ~ q1 -> y ~ q2[x]
        x = rng.choice(V, p=q1)
        y = rng.choice(V, p=q2[x])
        draft_probs[0], draft_probs[1] = torch.tensor(q1), torch.tensor(q2[x])
        return DraftTree(torch.tensor([0, x, y]), torch.tensor([-1, 0, 1]), kind=CHAIN_SAMPLED,
                         draft_probs=draft_probs[:3].float())
    # IID: 3 i.i.d. draws at the root (repeats merged, multiplicity counted), 2 i.i.d. under each
    firsts = rng.choice(V, size=3, p=q1)
    tokens, parents, mult, probs = [0], [-1], [1], [torch.tensor(q1)]
    order = list(dict.fromkeys(firsts.tolist()))
    first_nodes = {}
    for x in order:
        first_nodes[x] = len(tokens)
        tokens.append(x); parents.append(0); mult.append(int((firsts == x).sum())); probs.append(torch.tensor(q2[x]))
    for x in order:
        seconds = rng.choice(V, size=2, p=q2[x])
        for y in dict.fromkeys(seconds.tolist()):
            tokens.append(y); parents.append(first_nodes[x]); mult.append(int((seconds == y).sum()))
            probs.append(torch.zeros(V))
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), kind=IID,
                     draft_probs=torch.stack(probs).float(), multiplicity=torch.tensor(mult))


def tree_logits(tree: DraftTree, p1, p2) -> torch.Tensor:
    """Target logits at every node: log p(. | path). Depth >= 2 rows only shape token 3 (not tested)."""
    rows = []
    for node in range(tree.size):
        path = tree.path_to(node)[1:]
        rows.append(np.log(p2[int(tree.tokens[path[0]])] if len(path) == 1 else p1))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def joint_counts(kind: str, seed: int, rule_cls=Sampling) -> tuple[np.ndarray, np.ndarray]:
    p1, p2 = synthetic_target(seed)
    q1, q2 = draft_distributions(seed)
    rng = np.random.default_rng(seed + 7)
    gen = torch.Generator().manual_seed(seed)
    rule = rule_cls(sampling_processors(1.0), gen)
    counts = np.zeros((V, V))
    for _ in range(TRIALS):
        tree = FIXED_TREE if kind == DETERMINISTIC else sample_tree(kind, q1, q2, rng)
        path, bonus = rule(tree, tree_logits(tree, p1, p2))
        committed = tree.tokens[path[1:]].tolist() + [bonus]
        if len(committed) < 2:  # the next step would sample token 2 from p(. | token 1)
            committed.append(int(rng.choice(V, p=p2[committed[0]])))
        counts[committed[0], committed[1]] += 1
    return counts, p1[:, None] * p2


@pytest.mark.parametrize("kind", [DETERMINISTIC, CHAIN_SAMPLED, IID])
def test_sampling_rule_keeps_the_target_distribution(kind):
    counts, exact = joint_counts(kind, seed=3)
    assert_same_distribution(counts, exact)


class AlwaysAccept(Sampling):
    """A wrong rule (accepts every draft) — the statistical test must reject it."""

    def _specinfer(self, target_probs, draft_probs, kids, tokens, multiplicity):
        return kids[0], tokens[kids[0]]


def test_the_distribution_test_detects_a_biased_rule():
    counts, exact = joint_counts(CHAIN_SAMPLED, seed=3, rule_cls=AlwaysAccept)
    assert chisquare(counts.ravel(), exact.ravel() * TRIALS).pvalue < 1e-6


def test_top_k_is_applied_per_node():
    """Under top-k sampling the rule never emits a token outside the target's top-k."""
    gen = torch.Generator().manual_seed(0)
    rule = Sampling(sampling_processors(1.0, top_k=2), gen)
    tree = DraftTree(torch.tensor([0, 5]), torch.tensor([-1, 0]))
    logits = torch.tensor([[3.0, 2.5, 0, 0, 0, 0.1]] * 2)
    seen = {rule(tree, logits)[1] for _ in range(300)}
    assert seen <= {0, 1} and len(seen) == 2
