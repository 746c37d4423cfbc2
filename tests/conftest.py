"""Shared fixtures: the embedded SmolLM2 (fp32, CPU), one real Spec-Bench prompt per task, its greedy
autoregressive continuation (computed once per session), and a tiny random Llama built in-process."""

from __future__ import annotations

import os
import shutil
import tempfile

# Tests never write into the user's cache (~/.cache/specdec): every session gets a temporary one, set before
# any specdec import reads it (subprocesses inherit it). SPECDEC_TEST_CACHE names a kept one instead, to
# reuse the converted model and built tables between local runs.
_TEST_CACHE = os.environ.get("SPECDEC_TEST_CACHE") or tempfile.mkdtemp(prefix="specdec-test-cache-")
os.environ["SPECDEC_CACHE"] = _TEST_CACHE

import numpy as np  # noqa: E402
import pytest
import torch
from scipy.stats import chisquare

from specdec import EMBEDDED_MODEL  # noqa: E402
from specdec.verify.acceptance import make_rule
from specdec.verify.decode import Generation, Stopwatch, generate
from specdec.models import load_model, vocab_size
from specdec.running.prompts import PromptBuilder, stop_ids
from specdec.verify.proposer import Context, MethodEnv, Proposer
from specdec.verify.target import Target
from tasks import TASKS, load_questions

EMBEDDED = EMBEDDED_MODEL
LOSSLESS_NEW_TOKENS = 48  # per prompt in the greedy-equality tests


def run_generation(model, proposer: Proposer, prompt_ids: list[int], max_new_tokens: int, stops=frozenset(),
                   temperature: float = 0.0, seed: int = 0, top_k: int = 0, top_p: float = 1.0) -> Generation:
    """One generation through the shared loop (what run.py does per turn)."""
    gen = torch.Generator().manual_seed(seed)
    proposer.reset("turn")
    return generate(Target(model), proposer, prompt_ids, max_new_tokens, frozenset(stops),
                    make_rule(temperature, top_k, top_p, gen), Stopwatch(model.device), seed=seed)


def first_two_tokens_histogram(model, proposer: Proposer, prompt: list[int], trials: int, seed: int = 0,
                               fresh_tree: bool = False):
    """Counts [V, V] of the first two tokens committed by the exact sampling rule (T = 1) on the
    proposer's real first tree, scored once by the target; the rule then runs ``trials`` times on it.
    ``fresh_tree``: propose and score a new tree per trial instead (drafts drawn from q are exact only
    on average over the draws, so one fixed sampled tree cannot be reused).

    A trial that commits one token only gets its second from the target's p(. | x1) itself (what the
    next step does). Returns (counts, exact p(x1) p(x2 | x1) [V, V], trials that accepted a draft
    node, the last tree). Only for tiny vocabularies: p(. | x1) costs one forward per token."""
    vocab = vocab_size(model)
    ctx = Context(tokens=list(prompt), prompt_len=len(prompt), remaining=8)
    target = Target(model)
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
        p2 = torch.stack([torch.softmax(model(torch.tensor([prompt + [x]])).logits[0, -1].double(), -1)
                          for x in range(vocab)]).numpy()                 # [V, V]
    rule = make_rule(1.0, generator=torch.Generator().manual_seed(seed))
    rng = np.random.default_rng(seed)
    counts, accepted, tree = np.zeros((vocab, vocab)), 0, None
    for _ in range(trials):
        if tree is None or fresh_tree:
            target.prefill(ctx.tokens)
            if tree is None:
                proposer.begin(ctx)
            tree = proposer.propose(ctx)
            logits = target.score(tree)                                   # [T, V]
        path, bonus = rule(tree, logits)
        committed = tree.tokens[path[1:]].tolist() + [bonus]
        if len(committed) == 1:
            committed.append(int(rng.choice(vocab, p=p2[committed[0]] / p2[committed[0]].sum())))
        counts[committed[0], committed[1]] += 1
        accepted += len(path) > 1
    return counts, p1[:, None] * p2, accepted, tree


def assert_same_distribution(counts: np.ndarray, exact: np.ndarray, max_tv: float = 0.02):
    """Observed counts follow ``exact``: chi-square p > 1e-3 and total variation < ``max_tv``."""
    observed, expected = counts.ravel(), exact.ravel() / exact.sum()
    assert chisquare(observed, expected * observed.sum()).pvalue > 1e-3
    assert 0.5 * np.abs(observed / observed.sum() - expected).sum() < max_tv


def method_env(model, tokenizer=None, seed: int = 0) -> MethodEnv:
    return MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=tokenizer, model=model, seed=seed)


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("SPECDEC_TEST_CACHE"):
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _process_settings_restored():
    """Whatever a test changes process-wide (torch's thread count, e.g. an in-process ``main`` given
    ``--threads``) is put back, so no later test runs on other settings."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, stop ids) of the embedded default model in fp32."""
    model, tok = load_model(EMBEDDED, torch.device("cpu"), torch.float32)
    return model, tok, stop_ids(tok, model.generation_config)


@pytest.fixture(scope="session")
def smollm2_onednn():
    """(model, tokenizer) of SmolLM2 fp32 on the CPU default back end, onednn, with oneDNN for one-row forwards
    too (the load-time choice is timing-dependent; ``mkl`` is eager's kernel bit for bit, so all-oneDNN is
    the case that needs the check)."""
    from specdec.backends import PackedLinear

    model, tok = load_model(EMBEDDED, torch.device("cpu"), torch.float32, backend="onednn")
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.one_row_kernel = "onednn"
    return model, tok


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


class WordTokenizer:
    """Whitespace words -> fixed ids: corpora (ADED's tri-grams, REST's datastore) worked out by hand."""

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in t.split()] for t in texts]}

    def get_vocab(self):
        return dict(self.vocab)


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
