"""The verifier on other architectures (issue 13): tiny random Llama, Qwen2 (q/k/v biases), Mistral
(sliding window on every layer) and Gemma3 (sliding + full layers, scaled embeddings, soft caps),
on each CPU back end: tree logits equal each path alone, KV compaction equals recomputation,
greedy generation with drafts equals AR, and a sliding window that would be exceeded is refused."""

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from conftest import method_env, run_generation
from specdec.backends import apply_backend
from specdec.errors import UserError
from specdec.verify.proposer import Proposer
from specdec.verify.target import Target
from test_decode import RandomDrafts
from test_verifier import check_compaction_equals_recomputation, check_tree_equals_paths, random_tree

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def tiny(arch: str, window: int = 64, backend: str = "eager", seed: int = 0):
    """A random fp32 model of ``arch``; ``window`` = sliding window of the sliding layers."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=window))
    elif arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=window,
                                                   layer_types=["sliding_attention", "full_attention"],
                                                   final_logit_softcapping=30.0))
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "sdpa"
    return apply_backend(model.eval(), backend)


ARCHS = ["llama", "qwen2", "mistral", "gemma3"]
BACKENDS = ["eager", "onednn"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_equal_each_path_alone(arch, backend):
    check_tree_equals_paths(tiny(arch, backend=backend), list(range(3, 20)), random_tree(VOCAB), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compaction_equals_recomputation(arch, backend):
    check_compaction_equals_recomputation(tiny(arch, backend=backend), [0, 1, 3, 5, 7], VOCAB)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_drafted_generation_equals_ar(arch, backend):
    model = tiny(arch, backend=backend)
    env = method_env(model)
    prompt = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]
    ar = run_generation(model, Proposer(env), prompt, 24).output_ids
    drafted = run_generation(model, RandomDrafts(env, seed=1), prompt, 24)
    assert drafted.output_ids == ar and max(drafted.tree_sizes) > 1


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_exceeding_the_sliding_window_is_refused(arch):
    """window 16 keeps 15 rows: a 10-token prompt fits, drafting on past 15 cached tokens does not."""
    model = tiny(arch, window=16)
    env = method_env(model)
    with pytest.raises(UserError, match="sliding-window attention keeps 15 tokens"):
        run_generation(model, RandomDrafts(env, seed=1), [3, 14, 15, 9, 26, 5, 35, 8, 9, 7], 24)
    with pytest.raises(UserError, match="sliding-window"):
        Target(model).prefill(list(range(20)))


def test_commit_refuses_a_cache_that_lost_rows():
    """A cache filled past the window outside ``score`` (here by hand) cannot be compacted."""
    model = tiny("mistral", window=8)
    target = Target(model)
    target.prefill([1, 2, 3])
    tree = random_tree(VOCAB, parents=[-1, 0, 0])
    with torch.inference_mode():  # 2 cached + 3 tree + 6 more rows: past the 7 kept rows
        model(input_ids=tree.tokens[None], past_key_values=target.cache, use_cache=True)
        model(input_ids=torch.arange(6)[None], past_key_values=target.cache, use_cache=True)
    with pytest.raises(UserError, match="cannot be compacted"):
        target.commit(tree, [0, 2])
