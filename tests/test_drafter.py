"""Drafters (specdec/drafters/base.py, specdec/verify/layers.py) and the draft-model methods end to end.

* LayerRunner: layers [0, l) then [l, L) on one cache = the model's own forward; unsupported models fail clearly.
* The drafter's KV cache after compaction (accepted draft rows kept) and after re-feed (committed tokens
  the tree did not hold) equals a fresh recomputation, for the early-exit and the HF drafter.
* Temperature 1, tiny random target + tiny random drafter: the first 3 generated tokens of every method
  follow the target's own joint law (chi-square + TV).
* Greedy: every method with drafter=early_exit reproduces AR on real SmolLM2 prompts.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import LOSSLESS_NEW_TOKENS, assert_same_distribution, method_env, run_generation, tiny_llama
from transformers import DynamicCache

from specdec.drafters import EarlyExitDrafter, HFDrafter, build_drafter
from specdec.errors import UserError
from specdec.verify.layers import LayerRunner, attention_mask, causal_ancestors
from specdec.verify.proposer import build_proposer

METHODS = {  # the shipped methods with small trees (fast tests)
    "sps": dict(proposer="sps", gamma=3),
    "specinfer": dict(proposer="specinfer", k=3, length=2),
    "spectr": dict(proposer="spectr", k=3, length=2),
    "rsd_c": dict(proposer="rsd", tree="constant", branching=[2, 2]),
    "rsd_s": dict(proposer="rsd", tree="beam", beam_width=3, depth=2),
}


# ---------------------------------------------------------------------- layers
@torch.inference_mode()
def test_split_forward_equals_the_model():
    model = tiny_llama(layers=3)
    runner = LayerRunner(model)
    ids = torch.tensor([[3, 9, 4, 1, 7, 2]])
    ref = model(input_ids=ids).logits[0]
    cache = DynamicCache()
    for chunk in (slice(0, 4), slice(4, 6)):      # prefill, then two more tokens after the cached prefix
        x, pos = ids[:, chunk], torch.arange(6)[chunk][None]
        mask = attention_mask(causal_ancestors(x.shape[1]), chunk.start, model.dtype)
        hidden = runner.run(runner.embed(x), 0, 1, pos, mask, cache)
        hidden = runner.run(hidden, 1, 3, pos, mask, cache)
    torch.testing.assert_close(runner.logits(runner.norm(hidden)), ref[4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        runner.run(hidden, 2, 5, pos, mask, cache)


def test_unsupported_model_fails_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UserError, match="Llama-style"):
        LayerRunner(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)))


# ---------------------------------------------------------------------- drafter caches
def drafters(model):
    return [EarlyExitDrafter(model, 2, 64), HFDrafter(tiny_llama(layers=1, seed=5), 64)]


def assert_same_cache(drafter, tokens):
    """The drafter's cache for ``tokens`` equals a fresh drafter's (begin + follow), and so do the root logits."""
    ours = drafter.follow(tokens)
    fresh = copy.copy(drafter)     # same model / head, new empty caches
    fresh._reset()
    fresh.begin(tokens)
    ref = fresh.follow(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for cache, ref_cache in zip(drafter.caches, fresh.caches):
        assert cache.get_seq_length() == ref_cache.get_seq_length() == len(tokens)
        for layer, ref_layer in zip(cache.layers, ref_cache.layers):
            torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer.values, ref_layer.values, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("which", [0, 1], ids=["early_exit", "hf"])
def test_cache_after_compaction_and_refeed_equals_recomputation(which):
    model = tiny_llama(layers=3)
    drafter = drafters(model)[which]
    prompt = [5, 6, 7, 8]
    drafter.begin(prompt)
    drafter.follow(prompt)
    # tree: root -> {10, 11}, 10 -> {12, 13}, 13 -> {14}; commit root, 10, 13 and a bonus 20 (compaction)
    drafter.expand([10, 11], [0, 0])
    drafter.expand([12, 13], [1, 1])
    drafter.expand([14], [4])
    tokens = prompt + [10, 13, 20]
    assert_same_cache(drafter, tokens)
    # a second step: nothing accepted (bonus only), then committed tokens that no tree held (re-feed)
    drafter.expand([30, 31], [0, 0])
    tokens = tokens + [32]
    assert_same_cache(drafter, tokens)
    assert_same_cache(drafter, tokens + [33, 34, 35])
    # a sequence that leaves the cached one (a new turn): the common prefix is kept, the rest re-fed
    assert_same_cache(drafter, prompt + [10, 40])


@torch.inference_mode()
@pytest.mark.parametrize("name", ["sps", "spectr", "rsd_s"])
def test_cache_follows_a_sampled_generation(name):
    model = tiny_llama(layers=3)
    drafter = EarlyExitDrafter(model, 1, 64)
    env = dataclasses.replace(method_env(model), drafter=drafter, temperature=1.0)
    proposer = build_proposer(METHODS[name], env)
    gen = run_generation(model, proposer, [1, 2, 3, 4], 24, temperature=1.0, seed=3)
    assert max(gen.accept_lengths) > 1          # some drafts were accepted: rows were compacted
    assert_same_cache(drafter, [1, 2, 3, 4] + gen.output_ids)


def test_missing_drafter_and_bad_configs_fail_clearly():
    model = tiny_llama(layers=3)
    with pytest.raises(UserError, match="drafter=early_exit"):
        build_proposer({"name": "sps", "proposer": "sps"}, method_env(model))
    assert build_drafter({"kind": "none"}, model, None, 64) is None
    with pytest.raises(UserError, match="exit_layer"):
        build_drafter({"kind": "early_exit", "exit_layer": 3}, model, None, 64)
    with pytest.raises(UserError, match="unknown drafter kind"):
        build_drafter({"kind": "bogus"}, model, None, 64)
    with pytest.raises(UserError, match="drafter.path"):
        build_drafter({"kind": "hf", "path": None}, model, None, 64)


def test_head_replaces_the_final_norm():
    """A head (Kangaroo's adapter, specdec/drafters/heads.py) plugs in and keeps its own cache in step."""
    heads = pytest.importorskip("specdec.drafters.heads")
    model = tiny_llama(layers=3)
    torch.manual_seed(0)
    drafter = EarlyExitDrafter(model, 1, 64, head=heads.KangarooAdapter(model, 1).eval())
    env = dataclasses.replace(method_env(model), drafter=drafter, temperature=1.0)
    gen = run_generation(model, build_proposer(METHODS["spectr"], env), [1, 2, 3, 4], 16, temperature=1.0, seed=2)
    with torch.inference_mode():
        assert_same_cache(drafter, [1, 2, 3, 4] + gen.output_ids)


# ---------------------------------------------------------------------- exactness end to end
def target_joint3(model, prompt, V):
    """Exact p(x1) p(x2|x1) p(x3|x1,x2) [V, V, V] of the target at temperature 1."""
    with torch.inference_mode():
        def p(seq):
            return torch.softmax(model(torch.tensor([seq])).logits[0, -1].double(), -1).numpy()
        joint = np.zeros((V, V, V))
        p1 = p(prompt)
        for a in range(V):
            p2 = p(prompt + [a])
            for b in range(V):
                joint[a, b] = p1[a] * p2[b] * p(prompt + [a, b])
    return joint


@pytest.mark.slow
@pytest.mark.parametrize("name", [m if m == "sps" else pytest.param(m, marks=pytest.mark.full)
                                  for m in METHODS])  # make test: sps; every rule has its own test in test_multidraft
def test_first_three_tokens_follow_the_target(name):
    V, trials = 3, 2000  # 27 joint outcomes: the expected TV at this count is ~0.05
    target = tiny_llama(vocab=V, layers=2, seed=1)
    drafter = HFDrafter(tiny_llama(vocab=V, layers=1, seed=2), V)
    env = dataclasses.replace(method_env(target), drafter=drafter, temperature=1.0, seed=7)
    proposer = build_proposer(METHODS[name], env)
    proposer.reset("run")
    prompt = [1, 2, 0]
    counts, accepted = np.zeros((V, V, V)), 0
    for trial in range(trials):
        gen = run_generation(target, proposer, prompt, 3, temperature=1.0, seed=trial)
        counts[tuple(gen.output_ids)] += 1
        accepted += gen.steps < 3
    assert accepted > trials // 4                      # drafts were accepted: the rules were exercised
    assert_same_distribution(counts, target_joint3(target, prompt, V), max_tv=0.1)


@pytest.mark.full
# ---------------------------------------------------------------------- greedy on SmolLM2
@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_greedy_equals_ar_on_smollm2(name, smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 4}, model, tok, model.get_output_embeddings().weight.shape[0])
    proposer = build_proposer(METHODS[name], dataclasses.replace(method_env(model, tok), drafter=drafter))
    for task in ("math_reasoning", "translation"):
        gen = run_generation(model, proposer, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], (name, task)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_every_draft_method_drafts_with_the_eagle_head(name, smollm2, task_prompts, ar_outputs):
    """The committed EAGLE head (it reads the target's features through Context.hidden) serves every draft
    method, not only the dynamic trees: greedy output identical to AR."""
    from omegaconf import OmegaConf
    from test_configs import compose_config

    model, tok, stops = smollm2
    cfg = OmegaConf.to_container(compose_config("drafter=eagle").drafter, resolve=True)
    drafter = build_drafter(cfg, model, tok, model.get_output_embeddings().weight.shape[0])
    proposer = build_proposer(METHODS[name], dataclasses.replace(method_env(model, tok), drafter=drafter))
    gen = run_generation(model, proposer, task_prompts["math_reasoning"], 24, stops)
    assert gen.output_ids == ar_outputs["math_reasoning"][:24], name
    assert gen.steps < 24  # the head's drafts were accepted at least once


# ---------------------------------------------------------------------- configs
def test_drafter_configs_compose_and_build(smollm2):
    from test_configs import compose_config
    from omegaconf import OmegaConf

    model, tok, _ = smollm2
    assert compose_config().drafter.kind == "none"
    cfg = OmegaConf.to_container(compose_config("method=spectr", "drafter=early_exit").drafter, resolve=True)
    drafter = build_drafter(cfg, model, tok, model.get_output_embeddings().weight.shape[0])
    assert isinstance(drafter, EarlyExitDrafter) and drafter.exit_layer == cfg["exit_layer"]
    for name in ("hf", "vicuna-68m"):   # no path / a hub model without network: one clear line
        cfg = OmegaConf.to_container(compose_config(f"drafter={name}").drafter, resolve=True)
        with pytest.raises(UserError):
            build_drafter(cfg, model, tok, 49152)


def test_each_model_names_its_draft_model(smollm2, monkeypatch):
    """The sampling family drafts with the model's own draft model (conf/model/<m>.yaml drafters.draft_model):
    SmolLM2's Kangaroo adapter builds; Vicuna's vicuna-68m without the hub fails with one line naming the
    setting and the checkpoint; a model naming none gets require_drafter's line."""
    from test_configs import compose_config
    from omegaconf import OmegaConf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, _ = smollm2
    drafter_of = lambda *o: OmegaConf.to_container(compose_config("method=sps", *o).drafter, resolve=True)  # noqa: E731
    own = build_drafter(drafter_of(), model, tok, 49152)
    assert isinstance(own, EarlyExitDrafter) and own.head is not None and own.exit_layer == 2
    vicuna = drafter_of("model=vicuna-7b")
    assert (vicuna["kind"], vicuna["path"]) == ("hf", "double7/vicuna-68m")
    with pytest.raises(UserError, match=r"^drafter.path 'double7/vicuna-68m' is not in the local Hugging Face cache"):
        build_drafter(vicuna, model, tok, 49152)
    assert drafter_of("model=llama-2-7b-chat")["kind"] == "none"
    with pytest.raises(UserError, match="this model names none"):
        build_proposer({"name": "sps", "proposer": "sps"}, method_env(model))


@pytest.mark.parametrize("method,kind,release", [("eagle2", "eagle", "yuhuili/EAGLE-Vicuna-7B-v1.3"),
                                                 ("medusa", "medusa", "FasterDecoding/medusa-vicuna-7b-v1.3"),
                                                 ("hydra", "hydra", "ankner/hydra-vicuna-7b-v1.3")])
def test_vicuna_methods_default_to_the_released_drafters(method, kind, release, smollm2, monkeypatch):
    """model=vicuna-7b: each draft-model method takes the model's released drafter; without the hub it fails at
    once with one line naming the setting and the checkpoint (here built around SmolLM2: the download fails first)."""
    from test_configs import compose_config
    from omegaconf import OmegaConf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.to_container(compose_config(f"method={method}", "model=vicuna-7b").drafter, resolve=True)
    assert (cfg["kind"], cfg["release"]) == (kind, release)
    model, tok, _ = smollm2
    with pytest.raises(UserError, match=f"drafter.release.*{release}|{release}.*drafter.release") as err:
        build_drafter(cfg, model, tok, 49152)
    assert "\n" not in str(err.value)
    on_smollm2 = OmegaConf.to_container(compose_config(f"method={method}").drafter, resolve=True)
    assert on_smollm2["release"] is None and on_smollm2["head"].startswith("specdec/assets/")
