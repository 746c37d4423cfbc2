"""Half precision is honest: a greedy method's divergence from AR in bf16 sits at a near tie of the target
(``specdec.models.NEAR_TIE_GAP``), never at a wide gap; in fp32 the ids are identical."""

from types import SimpleNamespace

import pytest
import torch

from conftest import EMBEDDED, method_env, run_generation
from specdec.models import load_model
from specdec.models import NEAR_TIE_GAP
from specdec.running.runner import Answer, Runner
from specdec.verify.proposer import Proposer, build_proposer


def divergence(model, method_gens, ar_gens, prompts):
    runner = SimpleNamespace(model=model, device=model.device, dtype=model.dtype)
    wrap = lambda gens: Answer([""] * len(gens), gens, prompts)  # noqa: E731
    return Runner.divergence(runner, wrap(method_gens), wrap(ar_gens))


def test_a_wide_gap_is_not_a_near_tie(smollm2, task_prompts):
    """A hand-made divergence at a confident position is reported as diverged (the check can fail)."""
    model, tok, stops = smollm2
    prompt = task_prompts["translation"]
    ar = run_generation(model, Proposer(method_env(model, tok)), prompt, 8, stops)
    fake = SimpleNamespace(**{**ar.__dict__, "output_ids": ar.output_ids[:3] + [(ar.output_ids[3] + 1) % 1000] +
                              ar.output_ids[4:]})
    out = divergence(model, [fake], [ar], [prompt])
    assert out["position"] == 3 and not out["identical"]
    assert out["top2_logit_gap"] > NEAR_TIE_GAP[torch.float32] and not out["near_tie"]


@pytest.mark.full
def test_bf16_recycle_diverges_only_at_near_ties(task_prompts):
    model, tok = load_model(EMBEDDED, torch.device("cpu"), torch.bfloat16)
    env = method_env(model, tok)
    recycle = build_proposer({"name": "recycle", "proposer": "recycle"}, env)
    outcomes = []
    for prompt in task_prompts.values():
        ar = run_generation(model, Proposer(env), prompt, 48)
        ours = run_generation(model, recycle, prompt, 48)
        outcomes.append(divergence(model, [ours], [ar], [prompt]))
    assert all(o["identical"] or o["near_tie"] for o in outcomes), outcomes
