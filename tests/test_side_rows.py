"""Side rows (docs/verifier.md §10.1): extra query rows scored in the same forward as the draft tree, whose
logits go back to the proposer and which leave no trace. Checked on a tiny fp32 Llama: the tree's logits are
those of a forward without them, each side row's logits are those of a plain forward of its visible context,
the cache after a commit is a fresh prefill of the committed tokens, and greedy decoding with random side rows
attached to every step is AR."""

import copy
import random

import pytest
import torch
from transformers import DynamicCache

from conftest import method_env, run_generation, tiny_llama
from specdec.errors import UserError
from specdec.verify.proposer import Proposer
from specdec.verify.target import ShallowStates, Target
from specdec.verify.tree import DraftTree, SideRows

PREFIX = list(range(5, 17))
PARENTS = [-1, 0, 0, 1, 1, 3, 2, 5]  # root, two branches, a depth-3 chain under the first, one child under the second


def random_tree(vocab: int = 64, seed: int = 0) -> DraftTree:
    g = torch.Generator().manual_seed(seed)
    return DraftTree.from_lists(torch.randint(0, vocab, (len(PARENTS),), generator=g).tolist(), PARENTS)


def hanging_chains(tree: DraftTree, spec: list[tuple[int, int]], vocab: int = 64, seed: int = 1):
    """Side rows as chains hanging off tree nodes: ``spec`` = [(tree node, chain length), ...]. Chain k's row i sees
    the node's root path and the chain's rows 0..i; its positions continue the node's depth. Returns the side rows
    and, per side row, its visible context as (tokens, offsets) in causal order (what a plain forward needs)."""
    rng = random.Random(seed)
    tokens, offsets, sees_tree, sees_side, contexts = [], [], [], [], []
    tree_tokens, depth = tree.token_list, tree.depth_list
    for node, length in spec:
        path = tree.path_to(node)
        chain = []
        for i in range(length):
            row = len(tokens)
            tokens.append(rng.randrange(vocab))
            offsets.append(depth[node] + 1 + i)
            sees_tree.append(path)
            sees_side.append(list(chain))
            chain.append(row)
            contexts.append(([tree_tokens[j] for j in path] + [tokens[r] for r in chain],
                             [depth[j] for j in path] + [offsets[r] for r in chain]))
    wanted = list(range(len(tokens)))
    return SideRows.from_lists(tokens, offsets, tree.size, sees_tree, sees_side, wanted), contexts


def lade_grid_example():
    """The worked example of a lookahead window (N = 4, W = 3) with two 3-token candidates: tree = the root and
    the candidates as chains; side rows = the window cells a1, a2 (level 0), b0..b2 (level 1), c0..c2 (level 2).
    Cell (l, j) sits at offset l + j and sees the root, a1..aj and the cells (1..l, j)."""
    root, x, y = 40, [41, 42, 43], [44, 45, 46]
    tree = DraftTree.from_lists([root, *x, *y], [-1, 0, 1, 2, 0, 4, 5])
    grid = {(0, 1): 50, (0, 2): 51, (1, 0): 52, (1, 1): 53, (1, 2): 54, (2, 0): 55, (2, 1): 56, (2, 2): 57}
    cells = list(grid)
    index = {cell: i for i, cell in enumerate(cells)}
    sees_side, contexts = [], []
    for level, col in cells:
        level0 = [(0, k) for k in range(1, col + 1)]
        column = [(m, col) for m in range(1, level + 1)]
        sees_side.append([index[c] for c in level0 + column])
        chain = level0 + column                              # causal order: positions 1..col, then col+1..col+level
        contexts.append(([root] + [grid[c] for c in chain], [0] + [m + k for m, k in chain]))
    side = SideRows.from_lists([grid[c] for c in cells], [l + j for l, j in cells], tree.size,
                               [[0]] * len(cells), sees_side, wanted=[index[(2, j)] for j in range(3)])
    return tree, side, contexts, [index[(2, j)] for j in range(3)]


def with_side(tree: DraftTree, side: SideRows) -> DraftTree:
    return DraftTree.from_lists(tree.token_list, tree.parent_list, side=side)


def plain_logits(model, prefix: list[int], tokens: list[int], offsets: list[int]) -> torch.Tensor:
    """Logits after the last token of ``prefix + tokens``, by a causal forward; ``tokens`` sit at P + offsets."""
    P = len(prefix)
    positions = list(range(P)) + [P + o for o in offsets]
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix + tokens]), position_ids=torch.tensor([positions])).logits[0, -1]


def scored(model, tree: DraftTree):
    target = Target(model)
    target.prefill(PREFIX + [tree.token_list[0]])
    return target, target.score(tree)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_logits_are_unchanged_by_side_rows(attn):
    model = tiny_llama(attn=attn)
    tree = random_tree()
    side, _ = hanging_chains(tree, [(0, 3), (3, 2), (6, 4)])
    _, alone = scored(model, tree)
    target, logits = scored(model, with_side(tree, side))
    assert logits.shape == alone.shape
    assert torch.allclose(logits, alone, atol=1e-5, rtol=0), (logits - alone).abs().max()
    assert target.cache_len == len(PREFIX) + tree.size + side.size


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_side_logits_equal_a_plain_forward_of_their_visible_context(attn):
    model = tiny_llama(attn=attn)
    tree = random_tree(seed=3)
    side, contexts = hanging_chains(tree, [(0, 3), (5, 2), (4, 1)], seed=4)
    target, _ = scored(model, with_side(tree, side))
    assert target.side_logits.shape == (side.size, 64)
    for row, (tokens, offsets) in enumerate(contexts):
        ref = plain_logits(model, PREFIX, tokens, offsets)
        assert torch.allclose(target.side_logits[row], ref, atol=1e-5, rtol=0), (row, (target.side_logits[row] - ref).abs().max())


def test_a_lookahead_window_as_side_rows():
    """The 2-D window layout (cells seeing the root, level 0 to their column and their own column below them),
    with only the top level's logits wanted: each equals the plain forward of its context."""
    model = tiny_llama()
    tree, side, contexts, wanted = lade_grid_example()
    _, alone = scored(model, tree)
    target, logits = scored(model, with_side(tree, side))
    assert torch.allclose(logits, alone, atol=1e-5, rtol=0)
    assert target.side_logits.shape == (len(wanted), 64)
    for k, row in enumerate(wanted):
        tokens, offsets = contexts[row]
        assert torch.allclose(target.side_logits[k], plain_logits(model, PREFIX, tokens, offsets), atol=1e-5, rtol=0)


def test_a_different_visibility_changes_the_side_logits():
    """The check above can fail: the same side tokens seeing less give other logits."""
    model = tiny_llama()
    tree, side, contexts, wanted = lade_grid_example()
    blind = SideRows.from_lists(side.tokens.tolist(), side.offsets.tolist(), tree.size, [[0]] * side.size,
                                [[] for _ in range(side.size)], wanted)
    target, _ = scored(model, with_side(tree, blind))
    tokens, offsets = contexts[wanted[-1]]
    assert not torch.allclose(target.side_logits[-1], plain_logits(model, PREFIX, tokens, offsets), atol=1e-3)


def causal_cache(model, tokens: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("path", [[0, 1, 3, 5, 7], [0, 2, 6], [0]])
def test_commit_leaves_no_trace_of_side_rows(path):
    model = tiny_llama()
    tree = random_tree(seed=5)
    side, _ = hanging_chains(tree, [(0, 4), (2, 3)], seed=6)
    target, _ = scored(model, with_side(tree, side))
    before = copy.deepcopy(target.cache)
    target.commit(with_side(tree, side), path)
    kept = PREFIX + [tree.token_list[i] for i in path]
    assert target.cache_len == len(kept)
    for ours, ref in zip(target.cache.layers, causal_cache(model, kept).layers):
        assert ours.keys.shape[-2] == len(kept)
        assert torch.allclose(ours.keys, ref.keys, atol=1e-5) and torch.allclose(ours.values, ref.values, atol=1e-5)
    assert before.get_seq_length() == len(PREFIX) + tree.size + side.size  # the side rows were cached, then dropped


class RandomSideRows(Proposer):
    """A random draft tree (sometimes root only) with random side rows every step: random tokens, offsets that
    repeat tree positions, random visibility of tree rows and other side rows, random wanted rows. Checks that
    the loop hands back exactly the wanted rows' logits."""

    def __init__(self, env, seed=0):
        super().__init__(env)
        self.rng = random.Random(seed)
        self.seen = []

    def propose(self, ctx):
        rng, V = self.rng, self.env.vocab_size
        paths = [[rng.randrange(V) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(0, 3))]
        tree = DraftTree.from_paths(ctx.root, paths, self.env.device)
        T, S = tree.size, rng.randint(1, 9)
        sees_tree = [sorted(rng.sample(range(T), rng.randint(0, T))) for _ in range(S)]
        sees_side = [sorted(rng.sample(range(S), rng.randint(0, S))) for _ in range(S)]
        wanted = rng.sample(range(S), rng.randint(1, S))
        side = SideRows.from_lists([rng.randrange(V) for _ in range(S)], [rng.randint(0, 5) for _ in range(S)], T,
                                   sees_tree, sees_side, wanted, self.env.device)
        return DraftTree.from_lists(tree.token_list, tree.parent_list, self.env.device, side=side)

    def observe(self, step):
        assert step.side_logits.shape == (len(step.tree.side.wanted), self.env.vocab_size)
        self.seen.append(step.tree.forward_rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_with_random_side_rows_equals_ar(seed):
    model = tiny_llama(vocab=48, seed=seed)
    prompt = [3, 7, 11, 3, 7, 19, 23, 3, 7]
    ar = run_generation(model, Proposer(method_env(model)), prompt, 24)
    proposer = RandomSideRows(method_env(model), seed=seed)
    gen = run_generation(model, proposer, prompt, 24)
    assert gen.output_ids == ar.output_ids
    assert gen.tree_sizes == proposer.seen and min(gen.tree_sizes) >= 2  # every forward carried side rows


def test_bad_side_rows_are_refused():
    tree = random_tree()
    with pytest.raises(ValueError, match="outside"):
        SideRows.from_lists([1], [1], tree.size, [[tree.size]], [[]], [0])  # a tree row that does not exist
    with pytest.raises(ValueError, match="wanted"):
        SideRows.from_lists([1], [1], tree.size, [[0]], [[]], [])
    side = SideRows.from_lists([1], [1], tree.size + 1, [[0]], [[]], [0])  # built for another tree size
    with pytest.raises(ValueError, match="side rows see"):
        with_side(tree, side)


def test_partial_depth_verification_refuses_side_rows():
    model = tiny_llama()
    tree = random_tree()
    side, _ = hanging_chains(tree, [(0, 2)])
    shallow = ShallowStates(1, torch.zeros(1, tree.size, 32), ())
    target = Target(model)
    target.prefill(PREFIX + [tree.token_list[0]])
    both = DraftTree.from_lists(tree.token_list, tree.parent_list, side=side, shallow=shallow)
    with pytest.raises(UserError, match="side rows"):
        target.score(both)
