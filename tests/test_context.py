"""``context_policy`` (specdec/running/context.py): Spec-Bench generates past the trained length; we extend by
default, stop at it, or refuse, and record per turn how far a turn went past it. A tiny random Llama trained
for 128 positions answers real Spec-Bench prompts (SmolLM2's tokenizer)."""

import json
import shutil

import pytest
import torch

from conftest import EMBEDDED, tiny_llama
from specdec.errors import UserError
from specdec.models import cached_embedded_copy, default_cache_dir
from specdec.running.context import ContextPolicy, computes_positions
from test_run import QUESTIONS, read_answers, run_cli, tiny_args

CONTEXT = 128


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama-128")
    tiny_llama(vocab=49152, context=CONTEXT).save_pretrained(out)
    tokenizer_dir = cached_embedded_copy(EMBEDDED, default_cache_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def two_questions(tmp_path_factory):
    """Question 161 (translation: a prompt under 128 tokens) and 241 (summarization: a long article)."""
    lines = QUESTIONS.read_text().splitlines()
    path = tmp_path_factory.mktemp("task") / "q.jsonl"
    path.write_text(lines[80] + "\n" + lines[160] + "\n")
    return path


def test_policy_caps_and_refusals():
    model = tiny_llama(context=CONTEXT)
    assert computes_positions(model)
    extend, stop, refuse = (ContextPolicy.of(model, p) for p in ("extend", "stop", "refuse"))
    assert extend.new_token_cap(1, 100, 64) == 64
    assert stop.new_token_cap(1, 100, 64) == 28 and stop.new_token_cap(1, 200, 64) == 0
    assert refuse.new_token_cap(1, 64, 64) == 64
    with pytest.raises(UserError, match="question 7: prompt of 100 tokens .* trained length of 128"):
        refuse.new_token_cap(7, 100, 64)
    assert extend.past(100, 64) == 36 and extend.past(60, 64) == 0
    with pytest.raises(UserError, match="context_policy must be one of"):
        ContextPolicy.of(model, "wrap")


def test_learned_positions_cannot_extend():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert not computes_positions(gpt2)
    with pytest.raises(UserError, match="positions are learned"):
        ContextPolicy.of(gpt2, "extend").new_token_cap(1, 30, 8)
    assert ContextPolicy.of(gpt2, "stop").new_token_cap(1, 30, 8) == 2


def test_extend_generates_past_the_trained_length_and_records_it(short_context_model, two_questions, tmp_path):
    """Greedy recycle past 128 positions stays identical to AR; each turn records how far it went past."""
    run_dir = tmp_path / "extend"
    run_cli(*tiny_args(short_context_model, run_dir, "logger=none", "method=recycle", f"task.path={two_questions}",
                       "max_new_tokens=24", "task.per_category=null"))
    records = {r["question_id"]: r for r in read_answers(run_dir)}
    for record in records.values():
        choice = record["choices"][0]
        assert record["lossless"]["identical"]
        for prompt, new, past in zip(choice["prompt_tokens"], choice["new_tokens"], choice["past_context"]):
            assert past == max(0, prompt + new - CONTEXT)
    long_turn = records[241]["choices"][0]
    assert long_turn["prompt_tokens"][0] > CONTEXT and long_turn["new_tokens"][0] == 24
    assert long_turn["past_context"][0] == long_turn["prompt_tokens"][0] + 24 - CONTEXT
    summary = json.loads((run_dir / "summary.json").read_text())
    past_turns = sum(p > 0 for r in records.values() for p in r["choices"][0]["past_context"])
    assert summary["tasks"]["overall"]["turns_past_context"] == past_turns >= 1
    assert summary["tasks"]["overall"]["turns_stopped_at_context"] == 0


def test_stop_ends_the_turn_at_the_trained_length(short_context_model, two_questions, tmp_path):
    run_dir = tmp_path / "stop"
    run_cli(*tiny_args(short_context_model, run_dir, "logger=none", "method=pld", "context_policy=stop",
                       f"task.path={two_questions}", "max_new_tokens=24", "task.per_category=null"))
    turns = [(p, n, s, past) for r in read_answers(run_dir) for p, n, s, past in
             zip(*(r["choices"][0][k] for k in ("prompt_tokens", "new_tokens", "stop_reason", "past_context")))]
    assert all(p + n <= CONTEXT or n == 0 for p, n, _, _ in turns)          # no new token past the length
    assert all(past == max(0, p + n - CONTEXT) for p, n, _, past in turns)   # a prompt past it still counts
    stopped = [(p, n) for p, n, s, _ in turns if s == "context"]
    assert stopped and all(n == max(0, CONTEXT - p) for p, n in stopped)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tasks"]["overall"]["turns_stopped_at_context"] == len(stopped)
