"""Host synchronisations per verify step (issue 21, item 6), counted on the CPU by ``specdec.measure.syncs``: the
counter sees each kind it claims to, every method stays within its bound on a tiny random Llama (and greedy-equal
to AR while counted), and trees reach the model on its device whatever device a proposer built them on."""

from __future__ import annotations

import pytest
import torch

from conftest import method_env, run_generation, tiny_llama
from specdec.drafters import EarlyExitDrafter
from specdec.measure.syncs import KINDS, SyncCounter, count_generation, host_syncs, summarise
from specdec.models import vocab_size
from specdec.verify.acceptance import Greedy
from specdec.verify.proposer import MethodEnv, Proposer, build_proposer
from specdec.verify.target import Target
from specdec.verify.tree import DraftTree

DEVICE = torch.device("cpu")  # what model.device / env.device are here: a torch.device names "the device"
# Text-like prompts: recurring n-grams, so the retrieval methods (pld, lookahead) find drafts.
PROMPTS = [[5, 9, 13, 7, 21, 5, 9, 13, 7, 30, 41, 5, 9, 13, 2, 8, 5, 9],
           [11, 12, 40, 41, 42, 11, 12, 40, 60, 61, 11, 12, 40, 41]]
NEW_TOKENS = 32
# method -> (knobs, uses the early_exit drafter). CPU-sized knobs; kangaroo never exits early, so chains are deep.
CASES = {
    "ar": ({}, False),
    "recycle": ({}, False),                                        # the released 2.2.2 template, 81 tokens
    "recycle_cpu": ({"proposer": "recycle", "tree_nodes": 4, "dedup_siblings": True}, False),
    "pld": ({}, False),
    "lookahead": ({"decoding_length": 16, "branch_length": 6}, False),
    "eagle2": ({"budget": 12, "depth": 3, "top_k": 4}, True),
    "kangaroo": ({"max_steps": 4, "threshold": 0.0}, True),
    "sps": ({"gamma": 4}, True),
}
# Chains and static / retrieved trees: the goal, reached (one upload of a tree built from Python + one read of
# the accepted path and bonus; recycle_cpu's second read is its duplicate-sibling pruning, which sizes the tree).
AT_MOST_TWO = ("ar", "recycle", "recycle_cpu", "pld", "lookahead")
# Draft-model methods (a regression ceiling, not the goal of <= 1 per draft depth): each drafter forward costs the
# upload of its token ids and one read of its draft decision (argmax / top-k / the pool's top-k values), plus per
# step the tree's upload, the greedy read and the draft cache's compaction.
DRAFTED = ("eagle2", "kangaroo", "sps")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab=96, layers=3, seed=0)


def build(name: str, model):
    knobs, drafted = CASES[name]
    knobs = dict(knobs)
    key = knobs.pop("proposer", name)
    drafter = EarlyExitDrafter(model, 1, vocab_size(model)) if drafted else None
    env = MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=None, model=model, drafter=drafter)
    proposer = build_proposer({"name": name, "proposer": key, **knobs}, env)
    proposer.reset("run")
    return proposer


@pytest.fixture(scope="module")
def counts(model) -> dict:
    """host_syncs of every case on every prompt: name -> [report per prompt]."""
    return {name: [host_syncs(model, build(name, model), p, NEW_TOKENS) for p in PROMPTS] for name in CASES}


@pytest.fixture(scope="module")
def tiny_ar(model) -> list[list[int]]:
    """Greedy AR output of each prompt (the plain loop, not counted)."""
    return [run_generation(model, Proposer(method_env(model)), p, NEW_TOKENS).output_ids for p in PROMPTS]


# ---------------------------------------------------------------------------------------------- the counter
def count(fn) -> tuple[dict, list[str]]:
    counter = SyncCounter()
    with counter:
        counter.new_step()
        fn()
    return dict(counter.steps[0]), counter.violations


def test_the_counter_sees_each_kind_on_device_tensors_only():
    on_device = torch.arange(6, device=DEVICE)   # a factory given a torch.device: a device tensor
    assert count(lambda: int(torch.arange(3, device=DEVICE)[1]))[0] == {"scalar": 1}
    assert count(lambda: bool((torch.arange(3, device=DEVICE) > 1).any()))[0] == {"scalar": 1}
    assert count(lambda: torch.arange(3, device=DEVICE).tolist())[0] == {"tolist": 1}
    assert count(lambda: torch.tensor([1, 2], device=DEVICE))[0] == {"upload": 1}
    assert count(lambda: torch.arange(3, device=DEVICE).cpu().tolist())[0] == {"to_host": 1}  # one copy, then free
    assert count(lambda: torch.arange(3, device=DEVICE).nonzero())[0] == {"data_dependent": 1}
    assert count(lambda: on_device[on_device > 2])[0] == {"data_dependent": 1}
    assert count(lambda: on_device[[0, 2]])[0] == {"upload": 1}                 # a Python list becomes a host index
    assert count(lambda: torch.tensor([3, 4]).to(DEVICE))[0] == {"upload": 1}
    # host work is free: Python data, numpy, host tensors read back
    assert count(lambda: torch.tensor([1, 2]).tolist() + [int(torch.tensor(5))])[0] == {}
    assert count(lambda: torch.full((2,), 7, device=DEVICE).fill_(3))[0] == {}  # fills with an immediate
    reads, violations = count(lambda: on_device.numpy())
    assert reads == {"to_host": 1} and violations and "numpy" in violations[0]


def test_the_counter_flags_host_tensors_fed_to_the_model(model):
    """The detector the device contract relies on: a host-built input to a device model is a violation."""
    _, violations = count(lambda: model(input_ids=torch.tensor([[1, 2, 3]])))
    assert violations and "embedding" in violations[0]
    _, violations = count(lambda: model(input_ids=torch.tensor([[1, 2, 3]], device=DEVICE)))
    assert violations == []


def test_host_syncs_report_structure(model):
    report = host_syncs(model, Proposer(method_env(model)), PROMPTS[0], 6)
    assert report["per_step"] == [1] * 6 and report["mean"] == 1.0 and report["max"] == 1  # AR: the argmax read
    assert set(report["by_kind"]) == set(KINDS) and report["by_kind"]["scalar"] == 1.0
    assert report["steps"] == 6 and report["tree_depths"] == [0] * 6 and report["violations"] == []
    assert report["setup"].get("upload", 0) >= 1  # the prompt, counted apart from the steps


# ---------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", sorted(CASES))
def test_counted_generation_is_greedy_equal_to_ar(name, counts, tiny_ar):
    for report, reference in zip(counts[name], tiny_ar):
        assert report["output_ids"] == reference
        assert report["violations"] == []  # every tensor the model and the rule read was on its device


@pytest.mark.parametrize("name", AT_MOST_TWO)
def test_chain_and_static_tree_methods_sync_at_most_twice_per_step(name, counts):
    for report in counts[name]:
        assert report["steps"] > 0 and report["max"] <= 2, (report["per_step"], report["sites"])


@pytest.mark.parametrize("name", DRAFTED)
def test_draft_model_methods_stay_under_their_ceiling(name, counts):
    for report in counts[name]:
        forwards = report["draft_forwards"]
        assert len(forwards) == report["steps"] and max(report["tree_depths"]) >= 2
        over = [s - 2 * f for s, f in zip(report["per_step"], forwards)][1:]  # step 0 also builds Kangaroo's
        assert max(over) <= 3, (report["per_step"], forwards, report["sites"])  # layer runner (a probe forward)


# ---------------------------------------------------------------------------------------------- device contract
class HostTrees(Proposer):
    """Builds every tree on the host (``DraftTree``'s default device, the string "cpu"), as old proposers did."""

    def propose(self, ctx):
        return DraftTree.from_paths(ctx.root, [[(ctx.root + 1) % 96, 4], [7]])


def test_trees_built_on_the_host_reach_the_model_on_its_device(model):
    """The loop places every tree once (``Target.place``): the forward's inputs are device tensors (checked on
    what the model receives), nothing mixes host and device, and the move is the step's one upload."""
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        gen, counter, bracketed = count_generation(Target(model), HostTrees(method_env(model)), PROMPTS[0], 8)
    finally:
        hook.remove()
    steps = seen[1:]  # the prefill first
    received = [kw[name] for kw in steps for name in ("input_ids", "position_ids", "attention_mask")]
    report = summarise(counter, bracketed)
    assert report["violations"] == []
    assert gen.output_ids == run_generation(model, Proposer(method_env(model)), PROMPTS[0], 8).output_ids
    assert len(steps) == gen.steps and all(isinstance(t, torch.Tensor) and not counter.is_host(t) for t in received)
    assert [step["upload"] for step in counter.steps] == [1] * gen.steps  # the tree's move, one copy
    assert report["max"] <= 2                                              # + the rule's one read


def test_score_rule_and_commit_accept_a_tree_from_another_device(model):
    target = Target(model)
    target.prefill(PROMPTS[0])
    tree = DraftTree.from_paths(PROMPTS[0][-1], [[3, 4], [7, 8, 9]])           # on the host
    counter = SyncCounter()
    with counter:
        counter.new_step()
        logits = target.score(tree)
        path, bonus = Greedy()(tree, logits)
        target.commit(tree, path)
        placed = target.place(tree)
    assert counter.violations == [] and not counter.is_host(placed.tokens)
    assert target.cache_len == len(PROMPTS[0]) - 1 + len(path) and path == tree.path_to(path[-1])
    assert target.place(placed) is placed                                     # already there: no copy, same tree


# ---------------------------------------------------------------------------------------------- make bench-overhead
def test_overhead_benchmark_smoke(tmp_path):
    """``specdec.measure.overhead`` end to end at toy size: the report's structure, positive figures, AR's output
    identical to ``generate``'s, the syncs column from the counter. No timing is asserted."""
    import json

    from specdec.measure import overhead

    out = tmp_path / "overhead.json"
    report = overhead.main(["--methods", "ar,pld,recycle_cpu,kangaroo", "--rounds", "1", "--prompts", "1",
                            "--max-new-tokens", "6", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    ar = report["ar_vs_generate"]
    assert ar["identical"] and ar["harness_tokens_per_s"] > 0 and ar["generate_tokens_per_s"] > 0 and ar["ratio"] > 0
    assert list(report["methods"]) == ["ar", "pld", "recycle_cpu", "kangaroo"]
    for name, m in report["methods"].items():
        assert m["steps"] > 0 and m["mat"] >= 1.0 and m["step_ms"] > 0 and m["device_ms"] > 0, name
        assert m["verify_commit_host_ms"] > 0 and m["draft_ms"] > 0 and m["update_host_ms"] > 0, name
        assert m["host_ms"] > 0 and m["syncs_per_step"] >= 1 and isinstance(m["host_goal_met"], bool), name
    assert report["methods"]["kangaroo"]["drafting_apart"] and not report["methods"]["pld"]["drafting_apart"]
    assert report["methods"]["ar"]["syncs_per_step"] == 1.0
    assert report["target"]["vocab_size"] == 32000 and report["threads"] == 1
