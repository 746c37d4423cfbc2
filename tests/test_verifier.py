"""The shared tree verifier (docs/verifier.md §12): mask, positions, one-forward scoring equal to
running every node's path on its own, and KV compaction equal to recomputation."""

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_llama
from specdec.verify.target import Target
from specdec.verify.tree import DraftTree

# root, two depth-1 branches, a depth-3 chain under the first, one child under the second
PARENTS = [-1, 0, 0, 1, 1, 3, 2, 5]


def random_tree(vocab: int, parents=PARENTS, seed: int = 0) -> DraftTree:
    g = torch.Generator().manual_seed(seed)
    return DraftTree(torch.randint(0, vocab, (len(parents),), generator=g), torch.tensor(parents))


def test_tree_derived_buffers():
    tree = random_tree(50)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3, 2, 4]
    assert tree.children == [[1, 2], [3, 4], [6], [5], [], [7], [], []]
    assert tree.path_to(7) == [0, 1, 3, 5, 7]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        for j in tree.path_to(i):
            expected[i, j] = True
    assert torch.equal(tree.ancestors, expected)


def test_tree_rejects_bad_order():
    with pytest.raises(ValueError, match="topological"):
        DraftTree(torch.tensor([1, 2, 3]), torch.tensor([-1, 2, 0])).depth


def test_from_paths_merges_prefixes_in_bfs_order():
    tree = DraftTree.from_paths(9, [[1, 2, 3], [1, 4], [5]])
    assert tree.tokens.tolist() == [9, 1, 5, 2, 4, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    capped = DraftTree.from_paths(9, [[1, 2, 3], [1, 4], [5]], max_nodes=3)
    assert capped.tokens.tolist() == [9, 1, 5, 2]


def test_mask_rows_see_prefix_and_ancestors_only():
    model = tiny_llama()
    target = Target(model)
    tree = random_tree(64)
    mask = target.tree_mask(tree, prefix_len=5)
    assert mask.shape == (1, 1, 8, 13) and mask.dtype == model.dtype and mask.is_floating_point()
    visible = mask[0, 0] == 0
    assert visible[:, :5].all()
    assert torch.equal(visible[:, 5:], tree.ancestors)
    assert (mask[0, 0][~visible] == torch.finfo(model.dtype).min).all()


def path_logits(model, prefix: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits after the last token of prefix + tokens, by a plain causal forward."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix + tokens])).logits[0, -1].float()


def check_tree_equals_paths(model, prefix: list[int], tree: DraftTree, atol: float):
    target = Target(model)
    target.prefill(prefix + [int(tree.tokens[0])])  # cache = prefix, root = tree.tokens[0]
    P = target.cache_len
    assert P == len(prefix)
    logits = target.score(tree)
    assert target.cache_len == P + tree.size
    tokens = tree.tokens.tolist()
    for node in range(tree.size):
        alone = path_logits(model, prefix, [tokens[i] for i in tree.path_to(node)])
        assert torch.allclose(logits[node], alone, atol=atol), (node, (logits[node] - alone).abs().max())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_logits_equal_each_path_alone_tiny(attn):
    model = tiny_llama(attn=attn)
    check_tree_equals_paths(model, list(range(3, 20)), random_tree(64), atol=1e-4)


def test_tree_logits_equal_each_path_alone_smollm2(smollm2, task_prompts):
    model, _, _ = smollm2
    prompt = task_prompts["qa"]
    check_tree_equals_paths(model, prompt[:-1], random_tree(49152, seed=1), atol=1e-3)


def causal_cache(model, tokens: list[int]) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return cache


def check_compaction_equals_recomputation(model, path: list[int], vocab: int = 64):
    """Score a random tree after a 12-token prefix, commit ``path``: the cache equals a causal forward of the
    kept tokens, and the tail-only copy equals a full index_select of the pre-commit cache."""
    prefix, tree = list(range(5, 17)), random_tree(vocab)
    target = Target(model)
    target.prefill(prefix + [int(tree.tokens[0])])
    target.score(tree)
    before = copy.deepcopy(target.cache)
    target.commit(tree, path)
    kept = prefix + tree.tokens[path].tolist()
    keep_index = torch.cat([torch.arange(len(prefix)), len(prefix) + torch.tensor(path)])
    for ours, ref, old in zip(target.cache.layers, causal_cache(model, kept).layers, before.layers):
        assert ours.keys.shape[-2] == len(kept) == target.cache_len
        assert torch.allclose(ours.keys, ref.keys, atol=1e-5) and torch.allclose(ours.values, ref.values, atol=1e-5)
        assert torch.equal(ours.keys, old.keys.index_select(-2, keep_index))
        assert torch.equal(ours.values, old.values.index_select(-2, keep_index))


@pytest.mark.parametrize("path", [[0, 1, 3, 5, 7], [0, 2, 6], [0, 1], [0]])
def test_compaction_equals_recomputation(path):
    check_compaction_equals_recomputation(tiny_llama(), path)


def test_positions_are_prefix_plus_depth():
    model = tiny_llama()
    seen = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(pos=kw["position_ids"]), with_kwargs=True)
    target = Target(model)
    target.prefill(list(range(10)))
    tree = random_tree(64)
    target.score(tree)
    hook.remove()
    assert seen["pos"].tolist() == [(9 + tree.depth).tolist()]


def test_flash_attention_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="tree masks"):
        Target(model)
