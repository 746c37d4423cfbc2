"""FR-Spec's frequency-ranked draft vocabulary (specdec/drafters/vocab.py, ``drafter.vocab: top-<k>``).

* Token counts of a hand-made corpus (counted once, then read from the cache) and the top-k ids with the stop ids
  forced in; bad ``drafter.vocab`` values fail in one line.
* ReducedHead: the kept rows' logits equal the full projection's, -inf elsewhere (plain, biased, prepacked).
* Every drafter that runs an LM head (early_exit / kangaroo, eagle, medusa, hydra) drafts the full drafter's logits
  on the subset and -inf elsewhere; the target's LM head is untouched; hf refuses.
* Greedy = AR on real SmolLM2 prompts with ``vocab: top-4096`` (sps + kangaroo, eagle2 + eagle).
* Sampling stays exact with a q that is zero outside the subset (tiny vocabulary, chi-square + TV).
* ``python -m specdec.measure.fr_vocab``'s measuring loop on a tiny slice.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import (LOSSLESS_NEW_TOKENS, WordTokenizer, assert_same_distribution, first_two_tokens_histogram,
                      method_env, run_generation, tiny_llama)
from torch import nn

from specdec.backends import PackedLinear
from specdec.drafters import EarlyExitDrafter, build_drafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.heads import EagleHead
from specdec.drafters.medusa import HydraDrafter, HydraHeads, MedusaDrafter, MedusaHeads
from specdec.drafters.vocab import ReducedHead, frequent_ids, parse_vocab, stop_token_ids
from specdec.errors import UserError
from specdec.models import default_cache_dir, vocab_size
from specdec.running import corpus
from specdec.verify.proposer import build_proposer

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "<eos>"]
CORPUS = ["the cat sat on the mat", "the dog sat", "a cat ran", "the cat"]


# ---------------------------------------------------------------------------------------------- counts and subset
def test_counts_of_a_hand_made_corpus_are_cached(tmp_path, monkeypatch):
    tok = WordTokenizer(WORDS)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    expected = [4, 3, 2, 1, 1, 1, 1, 1, 0]  # the cat sat on mat a dog ran <eos>
    assert corpus.count_tokens(tok, CORPUS).tolist() == expected
    first = corpus.token_counts(tmp_path / "cache", tok, str(path), progress=False)
    assert first.tolist() == expected
    monkeypatch.setattr(corpus, "count_tokens", lambda *a, **k: pytest.fail("counted again instead of the cache"))
    assert corpus.token_counts(tmp_path / "cache", tok, str(path), progress=False).tolist() == expected
    assert corpus.token_counts.__module__ == "specdec.running.corpus"


def test_top_k_ranks_by_count_then_id_and_keeps_the_stop_ids():
    counts = np.array([5, 3, 2, 1, 1, 1, 1, 1, 0])
    assert frequent_ids(counts, 3, 9).tolist() == [0, 1, 2]
    assert frequent_ids(counts, 5, 9).tolist() == [0, 1, 2, 3, 4]               # ties at 1: the smaller ids
    assert frequent_ids(counts, 3, 9, always=[8]).tolist() == [0, 1, 8]          # EOS replaces the least frequent
    assert frequent_ids(counts, 3, 9, always=[1]).tolist() == [0, 1, 2]          # already kept: nothing replaced
    assert frequent_ids(counts[:5], 6, 12).tolist() == [0, 1, 2, 3, 4, 5]        # ids past the counts count 0
    for bad in (0, 9, 20):
        with pytest.raises(UserError, match="drafter.vocab=top-"):
            frequent_ids(counts, bad, 9)
    with pytest.raises(UserError, match="stop ids"):
        frequent_ids(counts, 1, 9, always=[7, 8])


def test_vocab_values_parse_or_fail_in_one_line():
    assert parse_vocab(None) is None and parse_vocab("full") is None
    assert parse_vocab("top-8192") == 8192
    for bad in ("top-0", "top8", "8192", "top--1", "top-4k", "all"):
        with pytest.raises(UserError) as err:
            parse_vocab(bad)
        assert "\n" not in str(err.value) and "top-<k>" in str(err.value)


def test_stop_ids_come_from_tokenizer_and_generation_config():
    model = tiny_llama()
    model.generation_config.eos_token_id = [7, 9]
    tok = type("Tok", (), {"eos_token_id": 3})()
    assert stop_token_ids(model, tok) == {3, 7, 9}
    assert stop_token_ids(model, None) == {7, 9}


# ---------------------------------------------------------------------------------------------- the reduced head
@pytest.mark.parametrize("kind", ["plain", "bias", "packed"])
def test_reduced_head_equals_the_full_head_on_the_subset(kind):
    torch.manual_seed(0)
    full = nn.Linear(16, 40, bias=kind == "bias")
    if kind == "packed":
        full = PackedLinear(full)
    ids = torch.tensor([0, 3, 7, 21, 39])
    head = ReducedHead(full, ids)
    assert head.weight.shape == (5, 16) and isinstance(head.proj, PackedLinear) == (kind == "packed")
    x = torch.randn(2, 6, 16)
    with torch.inference_mode():
        ref, out = full(x), head(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out[..., ids], ref[..., ids], rtol=1e-5, atol=1e-5)
    outside = torch.ones(40, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(out[..., outside]).all()
    assert (torch.softmax(out, -1)[..., outside] == 0).all()
    with pytest.raises(ValueError, match="kept ids"):
        ReducedHead(full, torch.tensor([0, 40]))


# ---------------------------------------------------------------------------------------------- every drafter
KEEP = torch.tensor([1, 2, 5, 8, 13, 21, 34, 55])


def counts_for(ids, V=64):
    counts = np.zeros(V, np.int64)
    counts[ids] = 100 + np.arange(len(ids))
    return counts


def random_head_params(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    return module.eval().requires_grad_(False)


def drafter_pair(kind, model):
    """(full drafter, the same drafter restricted to KEEP)."""
    V = vocab_size(model)
    if kind == "early_exit":
        full = EarlyExitDrafter(model, 1, V)
    elif kind == "eagle":
        full = EagleDrafter(model, random_head_params(EagleHead(model), 1), V)
    elif kind.startswith("medusa"):
        full = MedusaDrafter(model, random_head_params(MedusaHeads(model, 3, share_lm_head=kind.endswith("shared")), 2),
                             V)
    else:
        heads = HydraHeads(model, 3, 2, arch="mlp", share_lm_head=kind.endswith("shared"))
        full = HydraDrafter(model, random_head_params(heads, 3), V)
    cut = copy.deepcopy(full) if kind.startswith(("medusa", "hydra")) else copy.copy(full)
    if kind.startswith(("medusa", "hydra")):  # deepcopy copied the target modules the heads hold: point back
        cut.heads._shared = full.heads._shared
    cut.restrict_vocab(KEEP)
    return full, cut


@pytest.mark.parametrize("kind", ["early_exit", "eagle", "medusa_own", "medusa_shared", "hydra_own", "hydra_shared"])
def test_every_lm_head_drafter_drafts_the_full_logits_on_the_subset(kind):
    model = tiny_llama(layers=3)
    before = model.get_output_embeddings().weight.clone()
    full, cut = drafter_pair(kind, model)
    tokens = [5, 6, 7, 8, 9]
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0]
    outs = []
    for drafter in (full, cut):
        drafter.begin(tokens[:-1], hidden[:-2])
        root = drafter.follow(tokens, hidden[:-1])
        children = drafter.expand([10, 11], [0, 0])          # level by level (EAGLE feeds a parent's feature)
        grandchild = drafter.expand([12], [1])
        outs.append(torch.cat([root[None], children, grandchild]))
    ref, out = outs
    torch.testing.assert_close(out[:, KEEP], ref[:, KEEP], rtol=1e-5, atol=1e-5)
    outside = torch.ones(64, dtype=torch.bool)
    outside[KEEP] = False
    assert torch.isneginf(out[:, outside]).all() and torch.isfinite(ref).all()
    assert torch.equal(model.get_output_embeddings().weight, before)          # the target never changes
    assert not isinstance(model.get_output_embeddings(), ReducedHead)


def test_build_drafter_applies_the_vocab_and_refuses_hf():
    model = tiny_llama(layers=3)
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 1, "vocab": "top-8"}, model, None, 64,
                            token_counts=lambda: counts_for(KEEP))
    assert isinstance(drafter.lm_head, ReducedHead) and drafter.lm_head.ids.tolist() == KEEP.tolist()
    plain = build_drafter({"kind": "early_exit", "exit_layer": 1, "vocab": "full"}, model, None, 64,
                          token_counts=lambda: pytest.fail("counts read for vocab=full"))
    assert plain.lm_head is model.get_output_embeddings()
    with pytest.raises(UserError, match="must keep drafter.vocab=full"):
        build_drafter({"kind": "hf", "path": "x", "vocab": "top-8"}, model, None, 64)
    with pytest.raises(UserError, match="needs the corpus token counts"):
        build_drafter({"kind": "early_exit", "exit_layer": 1, "vocab": "top-8"}, model, None, 64)
    with pytest.raises(UserError, match="drafter.vocab='top-eight'"):
        build_drafter({"kind": "early_exit", "exit_layer": 1, "vocab": "top-eight"}, model, None, 64)


def test_every_drafter_config_names_the_vocab():
    from test_configs import compose_config

    for name in ("early_exit", "kangaroo", "eagle", "medusa", "hydra", "draft_model"):
        assert compose_config(f"drafter={name}").drafter.vocab == "full", name


def test_run_identity_leaves_a_full_vocab_out():
    """Run dirs started before drafter.vocab existed resume with vocab=full; a cut vocabulary is another run."""
    from test_configs import compose_config

    from specdec.running.runner import run_identity

    full = run_identity(compose_config("method=sps", "drafter=kangaroo"))
    cut = run_identity(compose_config("method=sps", "drafter=kangaroo", "drafter.vocab=top-4096"))
    assert "vocab" not in full["drafter"] and full["drafter"]["kind"] == "early_exit"
    assert cut["drafter"]["vocab"] == "top-4096" and cut != full


# ---------------------------------------------------------------------------------------------- greedy on SmolLM2
@pytest.fixture(scope="module")
def sharegpt_counts(smollm2):
    """ShareGPT token counts of the first 300 records under SmolLM2's tokenizer (the real path, a small slice)."""
    _, tok, _ = smollm2
    return corpus.token_counts(default_cache_dir(), tok, max_records=300, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method,drafter,knobs", [("sps", "kangaroo", {"gamma": 4}),
                                                  ("eagle2", "eagle", {"budget": 12, "depth": 3, "top_k": 4})])
def test_greedy_equals_ar_with_a_top_4096_draft_vocabulary(method, drafter, knobs, smollm2, task_prompts, ar_outputs,
                                                           sharegpt_counts):
    from omegaconf import OmegaConf
    from test_configs import compose_config

    model, tok, stops = smollm2
    cfg = compose_config(f"method={method}", f"drafter={drafter}", "drafter.vocab=top-4096")
    drafter_obj = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), model, tok, vocab_size(model),
                                token_counts=lambda: sharegpt_counts)
    kept = drafter_obj.lm_head.ids
    assert kept.numel() == 4096 and set(stop_token_ids(model, tok)) <= set(kept.tolist())
    method_cfg = {**OmegaConf.to_container(cfg.method, resolve=True), **knobs}
    proposer = build_proposer(method_cfg, dataclasses.replace(method_env(model, tok), drafter=drafter_obj))
    for task in ("math_reasoning", "translation"):
        gen = run_generation(model, proposer, task_prompts[task], LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], (method, task)
        assert gen.steps < LOSSLESS_NEW_TOKENS  # the cut drafter's drafts were accepted


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.full
@pytest.mark.parametrize("method", ["sps", "specinfer"])
def test_sampling_is_exact_with_a_q_zero_outside_the_subset(method):
    """T = 1, a 6-token target drafted by its own first layer cut to 3 tokens: the first two committed tokens
    follow p(x1) p(x2 | x1), although q is zero on half the vocabulary (SpS's single-draft rule, SpecInfer's
    multi-draft rule; a new tree per trial)."""
    V = 6
    model = tiny_llama(vocab=V, layers=3, seed=4)
    keep = [0, 2, 5]
    drafter = build_drafter({"kind": "early_exit", "exit_layer": 1, "vocab": "top-3"}, model, None, V,
                            token_counts=lambda: counts_for(keep, V))
    knobs = {"gamma": 2} if method == "sps" else {"k": 2, "length": 2}
    env = dataclasses.replace(method_env(model), drafter=drafter, temperature=1.0, seed=3)
    proposer = build_proposer({"name": method, "proposer": method, **knobs}, env)
    trials = 2500  # one propose + verify per trial; sampling noise alone gives TV ~0.04 over 36 cells
    counts, exact, accepted, tree = first_two_tokens_histogram(model, proposer, [1, 2, 3, 4, 0], trials,
                                                               fresh_tree=True)
    assert_same_distribution(counts, exact, max_tv=0.08)
    outside = [t for t in range(V) if t not in keep]
    assert set(tree.tokens[1:].tolist()) <= set(keep)
    assert (tree.draft_probs[:, outside] == 0).all() and tree.draft_probs[0, keep].sum() > 0.99
    assert exact[outside].sum() > 0.2  # the target often commits a token the drafter can never propose
    assert accepted > trials // 10


# ---------------------------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_measure_tool_runs_a_tiny_slice(smollm2, task_prompts, sharegpt_counts):
    from specdec.measure import fr_vocab

    model, tok, _ = smollm2
    report = fr_vocab.measure(model, tok, sharegpt_counts, [("sps", "kangaroo")], ["4096", "full"],
                              [task_prompts["math_reasoning"]], max_new_tokens=8, rounds=1)
    summary = report["summary"]
    assert set(summary) == {"ar", "sps+kangaroo@4096", "sps+kangaroo@full"}
    for name in ("sps+kangaroo@4096", "sps+kangaroo@full"):
        s = summary[name]
        assert s["identical_to_ar"] and s["mat"] >= 1 and s["draft_ms_per_forward"] > 0 and s["ratio_to_ar"] > 0
    assert summary["sps+kangaroo@4096"]["vocab"] == "top-4096" and summary["ar"]["mat"] == 1
    assert "sps+kangaroo@4096" in fr_vocab.format_table(summary)
    with pytest.raises(UserError, match="drafter.vocab"):
        fr_vocab.measure(model, tok, sharegpt_counts, [("sps", "kangaroo")], ["4k"], [task_prompts["math_reasoning"]],
                         max_new_tokens=4, rounds=1)
