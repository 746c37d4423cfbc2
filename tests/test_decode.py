"""The decode loop: AR equals ``model.generate``; oracle and random proposers are lossless; stop
tokens and length limits are applied once, exactly; the counting invariant holds."""

import random
import time

import pytest
import torch

from conftest import LOSSLESS_NEW_TOKENS, method_env, run_generation, tiny_llama
from specdec.verify.decode import Stopwatch, device_work, truncate
from specdec.verify.proposer import Proposer
from specdec.verify.tree import DraftTree


class Oracle(Proposer):
    """Drafts the known continuation plus decoy branches (the 'same' assistant of transformers' tests)."""

    def __init__(self, env, reference: list[int], depth: int = 6):
        super().__init__(env)
        self.reference, self.depth = reference, depth

    def propose(self, ctx):
        n = len(ctx.generated)
        truth = self.reference[n:n + self.depth]
        decoys = [[(t + 1) % 100 for t in truth[:3]], truth[:2] + [7, 8]]
        return DraftTree.from_paths(ctx.root, [p for p in [*decoys, truth] if p])


class RandomDrafts(Proposer):
    """Random branches (the 'random' assistant): almost nothing is accepted."""

    def __init__(self, env, seed: int = 0):
        super().__init__(env)
        self.rng = random.Random(seed)

    def propose(self, ctx):
        paths = [[self.rng.randrange(self.env.vocab_size) for _ in range(3)] for _ in range(3)]
        return DraftTree.from_paths(ctx.root, paths)


@pytest.mark.parametrize("task", ["mt_bench", "summarization", "math_reasoning"])
def test_ar_loop_equals_generate(smollm2, task_prompts, ar_outputs, task):
    model, _, _ = smollm2
    ids = torch.tensor([task_prompts[task]])
    # No explicit pad_token_id: SmolLM2's pad id is <|im_end|>, which the chat prompt itself contains,
    # and generate would mask those prompt tokens out of attention.
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=LOSSLESS_NEW_TOKENS, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ar_outputs[task]


def test_oracle_is_lossless_with_high_mat(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    for task in ("qa", "rag"):
        gen = run_generation(model, Oracle(method_env(model, tok), ar_outputs[task]), task_prompts[task],
                             LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task]
        assert sum(gen.accept_lengths) / gen.steps > 4.0
        assert max(gen.tree_sizes) > 7  # decoys were verified too


def test_random_drafts_are_lossless_with_mat_near_one(smollm2, task_prompts, ar_outputs):
    model, tok, stops = smollm2
    gen = run_generation(model, RandomDrafts(method_env(model, tok)), task_prompts["translation"],
                         LOSSLESS_NEW_TOKENS, stops)
    assert gen.output_ids == ar_outputs["translation"]
    assert sum(gen.accept_lengths) / gen.steps < 1.1


def test_ar_baseline_has_mat_exactly_one(smollm2, task_prompts):
    model, tok, stops = smollm2
    gen = run_generation(model, Proposer(method_env(model, tok)), task_prompts["qa"], 12, stops)
    assert gen.accept_lengths == [1] * gen.new_tokens and set(gen.tree_sizes) == {1}


def test_truncate_keeps_the_stop_token_and_the_length_cap():
    assert truncate([5, 6, 2, 7], room=10, stop_ids=frozenset({2})) == ([5, 6, 2], True)
    assert truncate([5, 6, 2, 7], room=2, stop_ids=frozenset({2})) == ([5, 6], False)
    assert truncate([5, 6], room=5, stop_ids=frozenset({2})) == ([5, 6], False)


@pytest.mark.parametrize("max_new_tokens", [1, 7, 64])
def test_stop_mid_step_and_length_cap(max_new_tokens):
    """A stop token inside an accepted multi-token step ends the output there; nothing after it is counted."""
    model = tiny_llama(vocab=64)
    env = method_env(model)
    prompt = [3, 9, 27, 17, 51]
    free = run_generation(model, Proposer(env), prompt, 64)
    stop = free.output_ids[5]  # a token the model emits at position 5 (and maybe earlier)
    expected = free.output_ids[:free.output_ids.index(stop) + 1][:max_new_tokens]
    gen = run_generation(model, Oracle(env, free.output_ids, depth=8), prompt, max_new_tokens, {stop})
    assert gen.output_ids == expected
    assert sum(gen.accept_lengths) == gen.new_tokens == len(expected)
    assert gen.stop_reason == ("eos" if expected[-1] == stop else "max_new_tokens")
    if max_new_tokens == 64:
        assert gen.steps < len(expected)  # the oracle did commit several tokens per step


# ---------------------------------------------------------------------------------------------- timing
class Sleepy(Proposer):
    """Known costs: 3 ms drafting, 2 ms of host learning plus 4 ms attributed to the device."""

    def __init__(self, env, reference: list[int]):
        super().__init__(env)
        self.oracle = Oracle(env, reference, depth=3)

    def propose(self, ctx):
        time.sleep(0.003)
        return self.oracle.propose(ctx)

    def observe(self, step):
        time.sleep(0.002)
        with device_work():
            time.sleep(0.004)


def test_part_times_tile_the_wall_time_and_device_work_is_split_off(monkeypatch):
    model = tiny_llama(vocab=64)
    env = method_env(model)
    prompt = [3, 9, 27, 17, 51]
    reference = run_generation(model, Proposer(env), prompt, 24).output_ids
    syncs = []
    monkeypatch.setattr(Stopwatch, "sync", lambda self: syncs.append(1))
    gen = run_generation(model, Sleepy(env, reference), prompt, 24)
    assert gen.output_ids == reference and gen.steps < 24
    assert len(syncs) == 2  # once at the start, once at the end: none per step
    parts = gen.prefill_time + gen.draft_time + gen.verify_time + gen.commit_time + gen.update_time
    assert 0 <= gen.wall_time - parts < 1e-3  # the parts tile the generation (end() and bookkeeping aside)
    assert len(gen.step_draft_times) == len(gen.step_update_times) == len(gen.step_device_times) == gen.steps
    assert sum(gen.step_draft_times) == pytest.approx(gen.draft_time)  # no device work while drafting
    assert sum(gen.step_update_times) + sum(gen.step_device_times) == pytest.approx(gen.update_time)
    assert min(gen.step_draft_times) >= 0.003 and min(gen.step_update_times) >= 0.002
    assert min(gen.step_device_times) >= 0.004
    with device_work():  # outside a generation: a plain block
        pass


def test_a_method_without_device_work_reports_zero_device_time():
    model = tiny_llama(vocab=64)
    gen = run_generation(model, Proposer(method_env(model)), [3, 9, 27], 4)
    assert gen.step_device_times == [0.0] * gen.steps and len(gen.step_draft_times) == gen.steps == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_events_time_the_parts_with_two_syncs(monkeypatch):
    model = tiny_llama(vocab=64).cuda()
    env = method_env(model)
    prompt = [3, 9, 27, 17, 51]
    reference = run_generation(model, Proposer(env), prompt, 24).output_ids
    real_sync, syncs = Stopwatch.sync, []
    monkeypatch.setattr(Stopwatch, "sync", lambda self: (syncs.append(1), real_sync(self)))
    gen = run_generation(model, Sleepy(env, reference), prompt, 24)
    assert gen.output_ids == reference and len(syncs) == 2
    parts = gen.prefill_time + gen.draft_time + gen.verify_time + gen.commit_time + gen.update_time
    assert parts == pytest.approx(gen.wall_time, rel=0.05, abs=2e-3)  # event timeline vs synced host clock
    assert min(gen.step_device_times) >= 0.0035 and min(gen.step_draft_times) >= 0.003
