"""Kangaroo (methods/kangaroo.py): greedy output identical to AR on real SmolLM2 prompts for exits 1, 2, 4,
both verification modes, chain and tree; the layer-ℓ verifier entry equals a full forward; the drafter's
caches stay on the committed prefix (draft logits after many steps = a fresh recomputation); sampling
keeps the target's distribution (tiny model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import (LOSSLESS_NEW_TOKENS, assert_same_distribution, first_two_tokens_histogram,
                      method_env, run_generation, tiny_llama)

from specdec.verify.acceptance import make_rule
from specdec.verify.decode import Stopwatch, generate
from specdec.drafters import EarlyExitDrafter, build_drafter
from specdec import PROJECT_ROOT
from specdec.drafters.heads import KangarooAdapter, save_head
from specdec.models import vocab_size
from specdec.verify.proposer import Context, build_proposer
from specdec.verify.target import Target
from specdec.training.train import init_from_target

ASSET = PROJECT_ROOT / "specdec" / "assets" / "kangaroo-smollm2-135m-l2"


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory) -> dict[int, str]:
    """Adapter per exit layer: the committed one for ℓ = 2, untrained ones (target-initialised) elsewhere."""
    model = smollm2[0]
    out = tmp_path_factory.mktemp("adapters")
    paths = {}
    for layer in (1, 2, 4):
        if layer == 2 and ASSET.with_suffix(".json").exists():
            paths[layer] = str(ASSET)
            continue
        head = KangarooAdapter(model, layer)
        init_from_target(head, model)
        paths[layer] = str(save_head(head, out / f"l{layer}", "smollm2-135m"))
    return paths


def kangaroo(model, tok, adapter, temperature=0.0, **knobs):
    drafter = build_drafter({"kind": "early_exit", "adapter": adapter}, model, tok, vocab_size(model))
    env = dataclasses.replace(method_env(model, tok), drafter=drafter, temperature=temperature)
    return build_proposer({"name": "kangaroo", "proposer": "kangaroo", **knobs}, env)


CASES = [(layer, reuse, mode) for layer in (1, 2, 4) for reuse in (True, False) for mode in ("chain", "tree")]


@pytest.mark.parametrize("case", [pytest.param(i, marks=() if CASES[i][:2] == (2, True) else pytest.mark.full)
                                  for i in range(len(CASES))])  # make test: exit layer 2, as released
def test_greedy_equals_ar(case, smollm2, task_prompts, ar_outputs, adapters):
    """Each combination on one real Spec-Bench prompt (round robin over the six tasks); η = 0.3 so that
    both exits happen (γ-long drafts and early stops)."""
    layer, reuse, mode = CASES[case]
    model, tok, stops = smollm2
    task = sorted(task_prompts)[case % len(task_prompts)]
    proposer = kangaroo(model, tok, adapters[layer], reuse_shallow=reuse, draft_mode=mode, threshold=0.3)
    gen = run_generation(model, proposer, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
    assert gen.output_ids == ar_outputs[task], (layer, reuse, mode, task)
    stats = proposer.stats()
    assert stats["reuse_shallow"] is reuse and stats["exit_layer"] == layer
    assert stats["verify"].startswith("layers [") == reuse
    assert max(gen.tree_sizes) > (6 if mode == "tree" else 1)


def test_layer_entry_equals_full_forward_and_caches_match(smollm2, task_prompts, adapters):
    """The same draft tree scored from layer ℓ on the drafter's states and by the full model: same logits,
    and after the commit both target caches hold the same rows at every depth."""
    model, tok, _ = smollm2
    prompt = task_prompts[sorted(task_prompts)[0]]
    proposer = kangaroo(model, tok, adapters[2], threshold=0.0, draft_mode="tree", tree_topk=2, max_steps=3)
    ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=32)
    proposer.begin(ctx)
    tree = proposer.propose(ctx)
    assert tree.shallow is not None and tree.size == 1 + 2 * 3
    full, partial = Target(model), Target(model)
    full.prefill(prompt)
    partial.prefill(prompt)
    plain = dataclasses.replace(tree, shallow=None)
    full_logits, partial_logits = full.score(plain), partial.score(tree)              # [T, V]
    torch.testing.assert_close(partial_logits, full_logits, atol=1e-3, rtol=1e-4)
    assert (partial_logits.argmax(-1) == full_logits.argmax(-1)).all()
    path = [0, 1, 3]  # root -> first child -> its first child
    full.commit(plain, path)
    partial.commit(tree, path)
    assert partial.cache_len == full.cache_len == len(prompt) - 1 + len(path)
    for a, b in zip(full.cache.layers, partial.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(b.values, a.values, atol=1e-3, rtol=1e-4)


def test_draft_logits_after_many_steps_equal_a_fresh_recomputation(smollm2, task_prompts, adapters):
    """After a whole generation (accepts, rejects, early exits), the drafter's shallow and adapter caches
    hold exactly the committed prefix: its logits equal a new drafter's run over the same tokens. Every
    verify forward is one step (the drafter's re-feed of the bonus token is not a target step)."""
    model, tok, stops = smollm2
    prompt = task_prompts[sorted(task_prompts)[1]]
    proposer = kangaroo(model, tok, adapters[2], threshold=0.3)
    scores = []

    class CountingTarget(Target):
        def score(self, tree):
            scores.append(tree.size)
            return super().score(tree)

    proposer.reset("turn")
    gen = generate(CountingTarget(model), proposer, prompt, 40, frozenset(), make_rule(0.0), Stopwatch(model.device))
    assert len(scores) == gen.steps and scores == gen.tree_sizes
    assert any(n > 1 for n in gen.accept_lengths)  # some drafts were accepted: compaction was exercised
    tokens = list(prompt) + gen.output_ids
    drafter = proposer.drafter
    followed = drafter.follow(tokens)                                                 # [V]
    assert drafter.caches[0].get_seq_length() == drafter.caches[1].get_seq_length() == len(tokens)
    fresh = EarlyExitDrafter(model, 2, vocab_size(model), drafter.head)
    fresh.begin(tokens)
    torch.testing.assert_close(followed, fresh.follow(tokens), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("rule", ["chain_sampled", "deterministic"])
def test_sampling_is_exact(rule):
    """Tiny model, T = 1: the first two committed tokens follow p(x1) p(x2 | x1) with drafts drawn from
    the adapter's q (single-draft rule, a new tree per trial) or argmax drafts (sample-and-follow on the
    one real tree), verified from layer ℓ on the drafter's states."""
    V = 5
    model = tiny_llama(vocab=V, layers=3, seed=4)
    head = KangarooAdapter(model, 1)
    torch.manual_seed(0)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    drafter = EarlyExitDrafter(model, 1, V, head.eval())
    env = dataclasses.replace(method_env(model), drafter=drafter, temperature=1.0)
    proposer = build_proposer({"name": "kangaroo", "proposer": "kangaroo", "threshold": 0.0, "max_steps": 3,
                               "sampling_rule": rule}, env)
    prompt = [1, 2, 3, 4, 0]
    if rule == "chain_sampled":
        trials = 2500  # one propose + verify per trial: kept small; the chi-square test carries the check
        counts, exact, accepted, tree = first_two_tokens_histogram(model, proposer, prompt, trials, fresh_tree=True)
        assert_same_distribution(counts, exact, max_tv=0.08)  # sampling noise alone: TV ~0.04 (25 cells)
    else:
        trials = 20_000
        counts, exact, accepted, tree = first_two_tokens_histogram(model, proposer, prompt, trials)
        assert_same_distribution(counts, exact)
    assert tree.size == 4 and tree.shallow is not None and tree.kind == rule
    assert accepted > trials // 20


def test_configs_compose_with_the_trained_adapter(smollm2):
    """`python run.py method=kangaroo` picks drafter=kangaroo (the committed adapter); drafter=... wins."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["method=kangaroo"])
        other = compose("config", overrides=["method=kangaroo", "drafter=early_exit"])
    assert cfg.drafter.name == "kangaroo" and other.drafter.name == "early_exit"
    if not ASSET.with_suffix(".json").exists():
        pytest.skip("the trained adapter is not in specdec/assets yet")
    model, tok, _ = smollm2
    from omegaconf import OmegaConf

    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), model, tok, vocab_size(model))
    assert drafter.head is not None and drafter.exit_layer == 2
    env = dataclasses.replace(method_env(model, tok), drafter=drafter)
    assert build_proposer(OmegaConf.to_container(cfg.method), env).stats()["adapter"]
    for layer in (1, 4):  # the l sweep's adapters: drafter.exit_layer picks the one trained for that layer
        with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base=None):
            swept = compose("config", overrides=["method=kangaroo", f"drafter.exit_layer={layer}"])
        drafter = build_drafter(OmegaConf.to_container(swept.drafter, resolve=True), model, tok, vocab_size(model))
        assert drafter.head is not None and drafter.exit_layer == layer


def test_reset_stats_zeroes_counters_after_warm_up():
    """Kangaroo's counters (steps, early exits, drafts) and the drafter's forward count are stats: after a
    warm-up generation ``reset("run")`` leaves them, ``reset_stats()`` (the runner, before the first timed
    question) zeroes them all, and the next generation counts from zero."""
    V = 5
    model = tiny_llama(vocab=V, layers=3, seed=4)
    drafter = EarlyExitDrafter(model, 1, V, KangarooAdapter(model, 1).eval())
    env = dataclasses.replace(method_env(model), drafter=drafter)
    proposer = build_proposer({"name": "kangaroo", "proposer": "kangaroo", "threshold": 0.6, "max_steps": 3}, env)
    prompt = [1, 2, 3, 4, 0]
    run_generation(model, proposer, prompt, 12)
    warm = proposer.stats()
    assert warm["drafts_per_step"] > 0 and warm["early_exit_share"] > 0 and warm["draft_forwards"] > 0
    for scope in ("turn", "question", "run"):
        proposer.reset(scope)
    assert proposer.stats() == warm
    proposer.reset_stats()
    zeroed = proposer.stats()
    assert zeroed["drafts_per_step"] == zeroed["early_exit_share"] == zeroed["draft_forwards"] == 0
    gen = run_generation(model, proposer, prompt, 12)
    assert proposer._counts["steps"] == sum(size > 1 for size in gen.tree_sizes)
