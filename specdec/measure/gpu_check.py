"""``make gpu-check``: the verifier's invariants, every method's greedy equality and the GPU-specific figures, on
random Vicuna-shaped fp16 models built in-process (no network, no checkpoint, no data set). Writes one JSON report.

    python -m specdec.measure.gpu_check                                   # CUDA, Vicuna-7B shape with 8 layers
    python -m specdec.measure.gpu_check --device cpu --size tiny          # the same checks, tiny, fp32 (tests)
    python -m specdec.measure.gpu_check --sections tree_vs_paths,methods  # a subset

The target is a random ``LlamaForCausalLM`` of Vicuna-7B-v1.3's shape (hidden 4096, 32 heads, MLP 11008, vocabulary
32000, 2048 positions) with ``--layers`` decoder layers (default 8 of the 32: building and running all 32 would take
most of the 8-minute budget; every check here is per layer, so fewer layers change no code path). The HF drafter is
a random model of Vicuna-68M's shape (Spec-Bench's SpS drafter). ``--size tiny`` is a 4-layer, 64-wide model for CPU.

Sections (docs/gpu_check.md says what each shows); each is one function returning a dict with ``pass`` and its
numbers; an exception fails that section only, and the exit code is 1 if any section failed:

* ``tree_vs_paths``  tree logits = each root-to-leaf path run alone, prefixes x trees of 2/16/61/81 nodes, under every
                     SDPA kernel (``torch.nn.attention.sdpa_kernel``): max difference, NaN, kernels that refuse a mask
* ``compaction``     commit = a fresh prefill of the kept tokens (cache rows and the next step's logits)
* ``methods``        every ``conf/method/*.yaml``: greedy ``generate`` vs AR (identical, or the first divergence at a
                     near-tie) and accept lengths summing to the tokens
* ``drafters``       the EAGLE head, Kangaroo's ``score_from`` (partial-depth verification), an HF drafter at T = 1
* ``syncs``          host-device syncs per verify step (CUDA: ``torch.cuda.set_sync_debug_mode``)
* ``speed``          AR through the harness vs ``model.generate`` tokens/s, and t(N)/t(1) of one verify forward
* ``memory``         peak memory of a long Token Recycling generation (1024 tokens on the GPU)

Runs on a stock CUDA image (torch, transformers, numpy, numba, pandas): it imports no hydra, omegaconf, datasets or
wandb (method YAMLs are read with PyYAML, a dependency of transformers), and tests/test_gpu_check.py runs it on CPU
with those blocked.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from specdec import PROJECT_ROOT
from specdec.drafters import EarlyExitDrafter, HFDrafter
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.heads import EagleHead, KangarooAdapter
from specdec.errors import UserError, print_error
from specdec.models import DTYPES, NEAR_TIE_GAP, resolve_device, resolve_dtype
from specdec.verify.acceptance import Greedy, make_rule
from specdec.verify.decode import Generation, Stopwatch, generate
from specdec.verify.proposer import Context, MethodEnv, Proposer, build_proposer, registry
from specdec.verify.target import Target
from specdec.verify.tree import DraftTree

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)      # lmsys/vicuna-7b-v1.3
VICUNA_68M = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_key_value_heads=12,
                  num_hidden_layers=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=2048)
TINY_DRAFT = dict(TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


@dataclass(frozen=True)
class Size:
    """One model size and the workload sized for it."""

    target: dict
    draft: dict
    layers: int
    prefixes: tuple[int, ...]        # tree_vs_paths / compaction: tokens cached before the tree
    new_tokens: int                  # methods, drafters: tokens per generation
    sync_tokens: int                 # syncs: tokens per generation
    memory_tokens: int               # memory: tokens of the recycle generation
    speed_tokens: int                # speed: tokens per AR / generate run
    speed_context: int               # speed: cached tokens under the t(N) forwards


SIZES = {
    "vicuna-7b": Size(VICUNA_7B, VICUNA_68M, 8, (16, 512, 1900), 128, 32, 1024, 128, 512),
    "tiny": Size(TINY, TINY_DRAFT, 4, (16, 300), 32, 8, 96, 32, 64),
}
TREE_NODES = (2, 16, 61, 81)                  # tree sizes (root included): a chain pair, small, EAGLE-2's 60+1, TR's 81
SPEED_NS = (1, 2, 4, 8, 16, 32, 64)
PROMPT_TOKENS = 64
EXIT_LAYER = 2                                # Kangaroo's released exit layer
# Logit differences within REL_TOL[dtype] x max(1, max |logit|) count as rounding (a wrong mask, position or row
# moves logits by about their own spread, ~1 here); a greedy divergence whose two tokens' target logits differ by
# less than NEAR_TIE_GAP[dtype] (specdec.models: the runs' own threshold and its measurement) is a near-tie (the two
# paths round differently), a wider one a verifier bug.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TIE_GAP = NEAR_TIE_GAP


# --------------------------------------------------------------------------------------------- models and set-up

def random_llama(shape: dict, layers: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A seeded random ``LlamaForCausalLM``, initialised on ``device`` (fast on a GPU), sdpa attention, no EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{"num_hidden_layers": layers, **shape}, attn_implementation="sdpa",
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # generate runs to max_new_tokens, as the harness without stop ids
    model.generation_config.pad_token_id = 0
    return model


def method_configs() -> dict[str, dict]:
    """``conf/method/*.yaml`` as plain dicts (PyYAML: no hydra/omegaconf on a stock image). A Hydra ``defaults``
    entry overriding the drafter becomes ``_drafter`` (eagle, kangaroo)."""
    import yaml

    configs = {}
    for path in sorted((PROJECT_ROOT / "conf" / "method").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        for entry in cfg.pop("defaults", None) or []:
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if "drafter" in key:
                        cfg["_drafter"] = value
        configs[path.stem] = cfg
    for key in sorted(registry()):  # a registered proposer without a YAML runs on its defaults
        if not any(cfg.get("proposer") == key for cfg in configs.values()):
            configs[key] = {"name": key, "proposer": key}
    return configs


# Knobs changed for random models: ADED's tri-gram table is built from a corpus with the target's tokenizer; a
# random model has neither, so its search runs on the online boost alone (``empty_table``, a named knob).
OVERRIDES = {"aded": {"empty_table": True}}
# Proposers a random model cannot run at all (recorded as skipped, with the reason).
SKIPPED = {"rest": "drafts from a datastore built from a text corpus with the target's tokenizer; a random model "
                   "has neither (and a stock image has no corpus)"}


@dataclass
class Setup:
    """What every section reads: the models, the prompt, the settings; drafters and proposers are built lazily."""

    device: torch.device
    dtype: torch.dtype
    size: Size
    size_name: str
    layers: int
    seed: int
    model: object
    draft_model: object
    memory_tokens: int
    tie_gap: float
    rel_tol: float
    heads: dict = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return self.model.config.vocab_size

    def prompt(self, n: int = PROMPT_TOKENS, seed: int = 0) -> list[int]:
        """Random ids whose second half repeats the first (so lookup methods find matches)."""
        rng = random.Random(self.seed * 7919 + seed)
        half = [rng.randrange(self.vocab) for _ in range((n + 1) // 2)]
        return (half + half)[:n]

    def env(self, drafter=None, temperature: float = 0.0) -> MethodEnv:
        return MethodEnv(vocab_size=self.vocab, device=self.device, tokenizer=None, model=self.model, seed=self.seed,
                         drafter=drafter, temperature=temperature)

    def head(self, kind: str):
        """One random head per kind, shared by the drafters built on it (a head holds no per-generation state)."""
        if kind not in self.heads:
            torch.manual_seed(self.seed + len(kind))
            if kind == "eagle":
                head = EagleHead(self.model)
            elif kind == "kangaroo":
                head = KangarooAdapter(self.model, EXIT_LAYER)
            else:  # Medusa-1 / Hydra heads (specdec/drafters/medusa.py)
                from specdec.drafters.medusa import HydraHeads, MedusaHeads

                head = {"medusa": MedusaHeads, "hydra": HydraHeads}[kind](self.model)
            self.heads[kind] = head.eval().requires_grad_(False)
        return self.heads[kind]

    def drafter(self, kind: str):
        """A drafter of ``kind`` (a ``conf/drafter`` name) around the target, its trained weights random."""
        if kind == "eagle":
            return EagleDrafter(self.model, self.head("eagle"), self.vocab)
        if kind in ("kangaroo", "early_exit"):
            return EarlyExitDrafter(self.model, EXIT_LAYER, self.vocab, self.head("kangaroo"))
        if kind in ("medusa", "hydra"):
            from specdec.drafters.medusa import DRAFTER_CLASSES

            return DRAFTER_CLASSES[kind](self.model, self.head(kind), self.vocab)
        if kind in ("hf", "vicuna-68m", "draft_model"):  # draft_model: the model's own, Vicuna's is vicuna-68m
            return HFDrafter(self.draft_model, self.vocab)
        raise UserError(f"gpu_check builds no random drafter of kind {kind!r}")

    def proposer(self, cfg: dict, temperature: float = 0.0, **knobs) -> Proposer:
        """The proposer of a method config with the drafter its YAML names (eagle, kangaroo), else, if it drafts
        with a model, the random Vicuna-68M-shaped HF drafter."""
        cfg = {**cfg, **OVERRIDES.get(cfg["proposer"], {}), **knobs}
        kind = cfg.pop("_drafter", None)
        cls = registry()[cfg["proposer"]]
        drafter = self.drafter(kind or "hf") if kind or cls.needs_drafter else None
        return build_proposer(cfg, self.env(drafter, temperature))


def run_greedy(setup: Setup, proposer: Proposer, prompt: list[int], tokens: int, target: Target | None = None,
               rule=None) -> Generation:
    proposer.reset("turn")
    return generate(target or Target(setup.model), proposer, prompt, tokens, frozenset(), rule or Greedy(),
                    Stopwatch(setup.device))


def random_tree(nodes: int, vocab: int, seed: int, device) -> DraftTree:
    """A random tree of ``nodes`` (root included) in topological order: half the nodes continue the previous one
    (deep branches), half hang under a uniformly drawn earlier node (wide levels)."""
    rng = random.Random(seed)
    parents = [-1] + [i - 1 if rng.random() < 0.5 else rng.randrange(i) for i in range(1, nodes)]
    tokens = [rng.randrange(vocab) for _ in range(nodes)]
    return DraftTree(torch.tensor(tokens, device=device), torch.tensor(parents, device=device))


def leaves(tree: DraftTree) -> list[int]:
    return [i for i, kids in enumerate(tree.children) if not kids]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------- tree vs paths

def sdpa_kernels(device: torch.device) -> dict:
    """The SDPA kernels to force, by name (None: torch's own choice, what a run uses)."""
    from torch.nn.attention import SDPBackend

    kernels = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        kernels["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return kernels


def required_kernels(device: torch.device) -> set[str]:
    """Kernels that must run tree masks: torch's choice and MATH everywhere, memory-efficient on CUDA (the kernel
    torch picks for a masked fp16 call there). Flash attention takes no arbitrary mask: expected to refuse."""
    return {"default", "math"} | ({"efficient"} if device.type == "cuda" else set())


@torch.inference_mode()
def tree_error(setup: Setup, prefix: list[int], tree: DraftTree) -> dict:
    """Tree logits (one verify forward) vs each root-to-leaf path run alone from scratch: max |difference|."""
    model, target = setup.model, Target(setup.model)
    target.prefill(prefix + [int(tree.tokens[0])])
    logits = target.score(tree)                                                 # [T, V]
    if not bool(torch.isfinite(logits).all()):
        return {"nan": True, "max_diff": None, "tol": None}
    worst, scale = 0.0, 1.0
    tokens = tree.tokens.tolist()
    for leaf in leaves(tree):
        path = tree.path_to(leaf)
        ids = torch.tensor([prefix + [tokens[i] for i in path]], device=setup.device)
        alone = model(input_ids=ids, logits_to_keep=len(path)).logits[0].float()  # [len(path), V]
        worst = max(worst, max_diff(logits[path], alone))
        scale = max(scale, float(alone.abs().max()))
    return {"nan": False, "max_diff": worst, "tol": setup.rel_tol * scale}


def section_tree_vs_paths(setup: Setup) -> dict:
    """Every (SDPA kernel, prefix length, tree size): the tree's logits equal its paths' (within rounding)."""
    from torch.nn.attention import sdpa_kernel

    kernels, required = sdpa_kernels(setup.device), required_kernels(setup.device)
    prompt = setup.prompt(max(setup.size.prefixes), seed=1)
    results, ok = {}, True
    for name, kernel in kernels.items():
        rows, refused = [], None
        for P in setup.size.prefixes:
            for nodes in TREE_NODES:
                tree = random_tree(nodes, setup.vocab, seed=P * 1000 + nodes, device=setup.device)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        if kernel is None:
                            row = tree_error(setup, prompt[:P], tree)
                        else:
                            with sdpa_kernel([kernel]):
                                row = tree_error(setup, prompt[:P], tree)
                except RuntimeError as err:  # "No available kernel": this kernel cannot run the call
                    refused = str(err).strip().splitlines()[0][:300]
                    break
                rows.append({"prefix": P, "nodes": nodes, **row})
            if refused:
                break
        if refused:
            status = "refused"
        elif any(r["nan"] for r in rows):
            status = "nan"
        elif any(r["max_diff"] > r["tol"] for r in rows):
            status = "mismatch"
        else:
            status = "ok"
        kernel_ok = status == "ok" or (status == "refused" and name not in required)
        ok &= kernel_ok
        results[name] = {"status": status, "pass": kernel_ok, "required": name in required,
                         "max_diff": max((r["max_diff"] for r in rows if r["max_diff"] is not None), default=None),
                         "refused": refused, "cases": rows}
    return {"pass": ok, "prefixes": list(setup.size.prefixes), "trees": list(TREE_NODES), "kernels": results}


# --------------------------------------------------------------------------------------------- compaction

def cache_rows(target: Target) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in target.cache.layers]


def paths_to_commit(tree: DraftTree, seed: int) -> list[list[int]]:
    """Root only, the longest prefix of the flattening (nothing moves), the deepest path, a random node's path."""
    flat = 1
    while flat < tree.size and tree.parent_list[flat] == flat - 1:
        flat += 1
    deepest = int(tree.depth.argmax())
    chosen = [[0], list(range(flat)), tree.path_to(deepest), tree.path_to(random.Random(seed).randrange(tree.size))]
    return [list(p) for p in dict.fromkeys(tuple(p) for p in chosen)]


@torch.inference_mode()
def compaction_case(setup: Setup, prefix: list[int], tree: DraftTree, path: list[int]) -> dict:
    committed = Target(setup.model)
    committed.prefill(prefix + [int(tree.tokens[0])])
    committed.score(tree)
    before = cache_rows(committed)
    committed.commit(tree, path)
    kept = prefix + tree.tokens[path].tolist()
    keep = torch.cat([torch.arange(len(prefix)), len(prefix) + torch.tensor(path)]).to(setup.device)
    exact = all(torch.equal(layer.keys, k.index_select(-2, keep))
                and torch.equal(layer.values, v.index_select(-2, keep))
                for layer, (k, v) in zip(committed.cache.layers, before))
    nxt = (kept[-1] * 31 + 7) % setup.vocab                                     # the next step's root
    fresh = Target(setup.model)
    fresh.prefill(kept + [nxt])                                                 # cache = kept, causally
    rows = max(max(max_diff(a.keys, b.keys), max_diff(a.values, b.values))
               for a, b in zip(committed.cache.layers, fresh.cache.layers))
    scale = max(1.0, max(float(b.keys.abs().max()) for b in fresh.cache.layers))
    step = DraftTree.root_only(nxt, setup.device)
    theirs = fresh.score(step)
    logits = max_diff(committed.score(step), theirs)
    tol_logits = setup.rel_tol * max(1.0, float(theirs.abs().max()))
    same_len = committed.cache_len == fresh.cache_len == len(kept) + 1
    ok = exact and same_len and rows <= setup.rel_tol * scale and logits <= tol_logits
    return {"prefix": len(prefix), "nodes": tree.size, "path": path, "pass": ok, "rows_equal_index_select": exact,
            "cache_max_diff": rows, "next_logits_max_diff": logits, "tol": tol_logits}


def section_compaction(setup: Setup) -> dict:
    """Commit + compaction leaves the cache a fresh prefill of the kept tokens would (and the same next logits)."""
    prompt = setup.prompt(max(setup.size.prefixes), seed=2)
    cases = []
    for P in (min(setup.size.prefixes), max(setup.size.prefixes)):
        for nodes in (16, 81):
            tree = random_tree(nodes, setup.vocab, seed=P + nodes, device=setup.device)
            cases += [compaction_case(setup, prompt[:P], tree, path) for path in paths_to_commit(tree, seed=P)]
    return {"pass": all(c["pass"] for c in cases), "cases": cases}


# --------------------------------------------------------------------------------------------- methods vs AR

@torch.inference_mode()
def divergence(setup: Setup, prompt: list[int], ours: list[int], ref: list[int]) -> dict | None:
    """None if identical, else the first differing position and the target's logit gaps there (a near-tie hints
    at rounding, a wide gap at a verifier bug)."""
    if ours == ref:
        return None
    pos = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    ids = torch.tensor([prompt + ref[:pos]], device=setup.device)
    logits = setup.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    top2 = logits.topk(2).values
    chosen = float(logits[ref[pos]] - logits[ours[pos]]) if pos < min(len(ours), len(ref)) else float("inf")
    return {"position": pos, "top2_logit_gap": float(top2[0] - top2[1]), "chosen_logit_gap": finite(chosen),
            "near_tie": abs(chosen) <= setup.tie_gap}  # either side far ahead would be a bug (AR's too)


def section_methods(setup: Setup) -> dict:
    """Every method config's greedy generation against AR through the same loop, on one random prompt."""
    prompt, n = setup.prompt(), setup.size.new_tokens
    reference = run_greedy(setup, Proposer(setup.env()), prompt, n).output_ids
    rows, accepted_any = {}, False
    for name, cfg in method_configs().items():
        if cfg["proposer"] in SKIPPED:
            rows[name] = {"pass": True, "skipped": SKIPPED[cfg["proposer"]]}
            continue
        start = time.perf_counter()
        try:
            proposer = setup.proposer(cfg)
            gen = run_greedy(setup, proposer, prompt, n)
        except Exception as err:  # noqa: BLE001 - one method's failure is recorded, the others still run
            rows[name] = {"pass": False, "error": f"{type(err).__name__}: {err}"[:500]}
            continue
        diverged = divergence(setup, prompt, gen.output_ids, reference)
        sums = sum(gen.accept_lengths) == gen.new_tokens == n
        accepted_any |= max(gen.accept_lengths) > 1
        rows[name] = {"pass": sums and (diverged is None or diverged["near_tie"]), "identical": diverged is None,
                      "divergence": diverged, "accept_lengths_sum_to_tokens": sums, "new_tokens": gen.new_tokens,
                      "steps": gen.steps, "mat": gen.new_tokens / max(1, gen.steps),
                      "max_tree_size": max(gen.tree_sizes), "warm_sizes": list(proposer.tree_sizes()),
                      "seconds": round(time.perf_counter() - start, 3)}
    ok = all(r["pass"] for r in rows.values()) and accepted_any
    return {"pass": ok, "new_tokens": n, "tie_gap": setup.tie_gap, "overrides": OVERRIDES,
            "some_method_accepted_drafts": accepted_any, "methods": rows}


# --------------------------------------------------------------------------------------------- drafter paths

def watch_finite(drafter) -> dict:
    """Count draft-logit tensors returned by ``drafter.follow`` / ``expand`` holding NaN or +inf (-inf is the
    padding of a smaller draft vocabulary); wraps the instance's methods."""
    seen = {"calls": 0, "nonfinite": 0}

    def wrap(method):
        def call(*args, **kwargs):
            out = method(*args, **kwargs)
            if out is not None:
                seen["calls"] += 1
                seen["nonfinite"] += int(bool(torch.isnan(out).any() or torch.isposinf(out).any()))
            return out
        return call

    drafter.follow, drafter.expand = wrap(drafter.follow), wrap(drafter.expand)
    return seen


def eagle_check(setup: Setup, prompt: list[int], reference: list[int]) -> dict:
    """EAGLE-2 on a random EAGLE head: the head reads the target's features; greedy output = AR."""
    proposer = setup.proposer(method_configs()["eagle2"])
    seen = watch_finite(proposer.drafter)
    gen = run_greedy(setup, proposer, prompt, len(reference))
    diverged = divergence(setup, prompt, gen.output_ids, reference)
    ok = (seen["calls"] > 0 and seen["nonfinite"] == 0 and max(gen.tree_sizes) > 1
          and (diverged is None or diverged["near_tie"]))
    return {"pass": ok, "draft_calls": seen["calls"], "nonfinite_draft_logits": seen["nonfinite"],
            "max_tree_size": max(gen.tree_sizes), "mat": gen.new_tokens / gen.steps, "divergence": diverged}


@torch.inference_mode()
def kangaroo_check(setup: Setup, prompt: list[int], reference: list[int]) -> dict:
    """Kangaroo's partial-depth verification (``Target.score_from`` from the drafter's layer-ℓ states) gives the
    full forward's logits on the same tree; greedy output = AR. η = 0 so every step drafts the full γ chain."""
    cfg = method_configs()["kangaroo"]
    proposer = setup.proposer(cfg, threshold=0.0)
    tree_checks = []
    for seed in range(3):
        ids = setup.prompt(48, seed=10 + seed)
        partial, full = Target(setup.model), Target(setup.model)
        partial.prefill(ids)
        full.prefill(ids)
        proposer.reset("turn")
        ctx = Context(tokens=list(ids), prompt_len=len(ids), remaining=64)
        proposer.begin(ctx)
        tree = proposer.propose(ctx)
        via_shallow = partial.score(tree)
        plain = full.score(DraftTree(tree.tokens, tree.parents))
        tree_checks.append({"nodes": tree.size, "shallow": tree.shallow is not None,
                            "max_diff": max_diff(via_shallow, plain),
                            "tol": setup.rel_tol * max(1.0, float(plain.abs().max()))})
    gen = run_greedy(setup, proposer, prompt, len(reference))
    diverged = divergence(setup, prompt, gen.output_ids, reference)
    ok = (all(c["shallow"] and c["nodes"] > 2 and c["max_diff"] <= c["tol"] for c in tree_checks)
          and (diverged is None or diverged["near_tie"]))
    return {"pass": ok, "exit_layer": EXIT_LAYER, "score_from_vs_full": tree_checks,
            "mat": gen.new_tokens / gen.steps, "divergence": diverged}


def hf_sampling_check(setup: Setup, prompt: list[int], tokens: int) -> dict:
    """SpS with the random HF drafter at T = 1 (exact speculative sampling): the drafter's q rows are
    distributions, the committed tokens are in the vocabulary and the accept lengths sum to the tokens."""
    proposer = setup.proposer(method_configs()["sps"], temperature=1.0)
    bad_q, trees = [0], [0]
    propose = proposer.propose

    def checked(ctx):
        tree = propose(ctx)
        trees[0] += 1
        if tree.draft_probs is not None and tree.size > 1:
            rows = tree.draft_probs[:-1].float()                     # nodes with a child (a chain: all but the leaf)
            bad_q[0] += int(not bool(torch.isfinite(rows).all()) or float((rows.sum(-1) - 1).abs().max()) > 1e-3)
        return tree

    proposer.propose = checked
    rule = make_rule(1.0, generator=torch.Generator().manual_seed(setup.seed))
    gen = run_greedy(setup, proposer, prompt, tokens, rule=rule)
    in_vocab = all(0 <= t < setup.vocab for t in gen.output_ids)
    sums = sum(gen.accept_lengths) == gen.new_tokens == tokens
    ok = in_vocab and sums and bad_q[0] == 0 and max(gen.tree_sizes) > 1
    return {"pass": ok, "temperature": 1.0, "trees": trees[0], "bad_draft_prob_rows": bad_q[0], "in_vocab": in_vocab,
            "accept_lengths_sum_to_tokens": sums, "mat": gen.new_tokens / gen.steps}


def section_drafters(setup: Setup) -> dict:
    prompt, n = setup.prompt(seed=3), setup.size.new_tokens
    reference = run_greedy(setup, Proposer(setup.env()), prompt, n).output_ids
    checks = {}
    for name, check in (("eagle_head", lambda: eagle_check(setup, prompt, reference)),
                        ("kangaroo_score_from", lambda: kangaroo_check(setup, prompt, reference)),
                        ("hf_drafter_t1", lambda: hf_sampling_check(setup, prompt, n))):
        checks[name] = guarded(check)
    return {"pass": all(c["pass"] for c in checks.values()), **checks}


# --------------------------------------------------------------------------------------------- syncs per step

def count_cuda_syncs(setup: Setup, proposer: Proposer, prompt: list[int], tokens: int) -> dict:
    """Synchronising CUDA calls during one generation, counted from ``set_sync_debug_mode("warn")``'s warnings."""
    run_greedy(setup, proposer, prompt, tokens)                                  # warm: allocator, lazy buffers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gen = run_greedy(setup, proposer, prompt, tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"total": syncs, "steps": gen.steps, "mean": syncs / max(1, gen.steps)}


def section_syncs(setup: Setup) -> dict:
    """Host-device syncs per verify step, per method. CUDA: counted by torch's sync debug mode (AR must show at
    least one per step: reading the greedy token). CPU: ``specdec.measure.syncs.host_syncs`` when present."""
    prompt, n = setup.prompt(seed=4), setup.size.sync_tokens
    configs = {name: cfg for name, cfg in method_configs().items() if cfg["proposer"] not in SKIPPED}
    if setup.device.type == "cuda":
        counter = "torch.cuda.set_sync_debug_mode"

        def count(cfg):
            return {"pass": True, **count_cuda_syncs(setup, setup.proposer(cfg), prompt, n)}
    else:
        try:
            from specdec.measure.syncs import host_syncs
        except ImportError:
            return {"pass": True, "status": "skipped", "reason": "CPU: specdec.measure.syncs.host_syncs not available"}
        counter = "specdec.measure.syncs.host_syncs (CPU proxy)"

        def count(cfg):  # a host/device mix (a "violation") would raise on CUDA
            counted = host_syncs(setup.model, setup.proposer(cfg), prompt, n)
            return {"pass": not counted.get("violations"), **counted}
    rows = {name: guarded(lambda cfg=cfg: count(cfg)) for name, cfg in configs.items()}
    counted = rows.get("ar", {}).get("mean", 0) >= 1
    return {"pass": counted and all(r["pass"] for r in rows.values()), "counter": counter, "tokens": n,
            "ar_counted": counted, "methods": rows}


# --------------------------------------------------------------------------------------------- speed

def hf_generate(setup: Setup, prompt: list[int], tokens: int, clock: Stopwatch) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt], device=setup.device)
    start = clock()
    with torch.inference_mode():
        out = setup.model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return clock() - start, out[0, len(prompt):].tolist()


@torch.inference_mode()
def verify_latency(setup: Setup, context: int, ns=SPEED_NS, repeats: int = 5, warmup: int = 2) -> dict:
    """Median seconds of one verify forward (``Target.score`` of an N-token chain) at ``context`` cached tokens."""
    clock, target = Stopwatch(setup.device), Target(setup.model)
    ids = setup.prompt(context + 1 + max(ns), seed=5)
    target.prefill(ids[:context + 1])
    trees = {n: DraftTree.chain(ids[context], ids[context + 1:context + n], device=setup.device) for n in ns}
    times = {n: [] for n in ns}
    for rep in range(warmup + repeats):
        for n in ns:                                       # round-robin: drift hits every N alike
            start = clock()
            target.score(trees[n])
            elapsed = clock() - start
            target.cache.crop(-n)
            if rep >= warmup:
                times[n].append(elapsed)
    return {n: statistics.median(t) for n, t in times.items()}


def section_speed(setup: Setup, rounds: int = 2) -> dict:
    """AR through the harness vs ``model.generate`` (interleaved, alternating which goes first), and t(N)/t(1)."""
    prompt, n, clock = setup.prompt(seed=6), setup.size.speed_tokens, Stopwatch(setup.device)
    ar = Proposer(setup.env())

    def harness() -> tuple[float, list[int]]:
        gen = run_greedy(setup, ar, prompt, n)
        return gen.wall_time, gen.output_ids

    systems = {"harness": harness, "generate": lambda: hf_generate(setup, prompt, n, clock)}
    run_greedy(setup, ar, prompt, 8)                       # warm both paths
    hf_generate(setup, prompt, 8, clock)
    rates, outputs = {name: [] for name in systems}, {}
    for i in range(2 * rounds):
        for name in (list(systems) if i % 2 == 0 else list(systems)[::-1]):
            seconds, outputs[name] = systems[name]()
            rates[name].append(len(outputs[name]) / seconds)
    t = verify_latency(setup, setup.size.speed_context)
    harness_rate, hf_rate = statistics.mean(rates["harness"]), statistics.mean(rates["generate"])
    ok = all(math.isfinite(x) and x > 0 for x in [harness_rate, hf_rate, *t.values()])
    return {"pass": ok, "tokens": n, "rounds": rounds, "harness_ar_tokens_per_s": harness_rate,
            "generate_tokens_per_s": hf_rate, "ratio": harness_rate / hf_rate,
            "generate_divergence": divergence(setup, prompt, outputs["generate"], outputs["harness"]),
            "context": setup.size.speed_context, "t_ms": {str(k): 1000 * v for k, v in t.items()},
            "t_over_t1": {str(k): v / t[1] for k, v in t.items()}}


# --------------------------------------------------------------------------------------------- memory

def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize


def max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def section_memory(setup: Setup) -> dict:
    """Peak memory of one Token Recycling generation (2.2.2 tree, 81 tokens per verify) of ``memory_tokens``."""
    proposer = setup.proposer(method_configs()["recycle"])
    prompt, n = setup.prompt(seed=7), setup.memory_tokens
    weights = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(setup.device)
        before = torch.cuda.memory_allocated(setup.device)
        gen = run_greedy(setup, proposer, prompt, n)
        peak = torch.cuda.max_memory_allocated(setup.device)
        figures = {"counter": "torch.cuda.max_memory_allocated", "allocated_before_gb": before / 1e9,
                   "peak_gb": peak / 1e9, "peak_over_before_gb": (peak - before) / 1e9}
    else:
        before = max_rss_mb()
        gen = run_greedy(setup, proposer, prompt, n)
        figures = {"counter": "resource ru_maxrss (process peak, CPU)", "max_rss_before_mb": before,
                   "max_rss_after_mb": max_rss_mb()}
    kv = kv_bytes_per_token(setup.model) * (len(prompt) + n + max(gen.tree_sizes))
    return {"pass": gen.new_tokens == n, "method": "recycle", "tokens": n, "new_tokens": gen.new_tokens,
            "mat": gen.new_tokens / gen.steps, "weights_gb": weights / 1e9, "kv_cache_at_end_gb": kv / 1e9, **figures}


# --------------------------------------------------------------------------------------------- the run

SECTIONS: dict[str, Callable[[Setup], dict]] = {
    "tree_vs_paths": section_tree_vs_paths, "compaction": section_compaction, "methods": section_methods,
    "drafters": section_drafters, "syncs": section_syncs, "speed": section_speed, "memory": section_memory,
}


def guarded(check: Callable[[], dict]) -> dict:
    """Run one check; an exception becomes a failed result with its message and the last traceback lines."""
    start = time.perf_counter()
    try:
        result = check()
    except Exception as err:  # noqa: BLE001 - a failing section does not stop the others
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result = {"pass": False, "error": f"{type(err).__name__}: {err}"[:1000], "traceback": tail}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def environment(setup: Setup) -> dict:
    import transformers

    env = {"device": str(setup.device), "dtype": str(setup.dtype).removeprefix("torch."), "size": setup.size_name,
           "layers": setup.layers, "seed": setup.seed,
           "target_shape": {**setup.size.target, "num_hidden_layers": setup.layers}, "draft_shape": setup.size.draft,
           "rel_tol": setup.rel_tol, "tie_gap": setup.tie_gap,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cuda": torch.version.cuda}}
    if setup.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(setup.device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def build_setup(args) -> Setup:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    size = SIZES[args.size]
    layers = args.layers or size.layers
    if layers <= EXIT_LAYER:
        raise UserError(f"--layers {layers}: Kangaroo's exit layer is {EXIT_LAYER}, so the target needs more layers")
    model = random_llama(size.target, layers, device, dtype, args.seed)
    draft = random_llama(size.draft, size.draft["num_hidden_layers"], device, dtype, args.seed + 1)
    return Setup(device, dtype, size, args.size, layers, args.seed, model, draft,
                 args.memory_tokens or size.memory_tokens, args.tie_gap or TIE_GAP[dtype], REL_TOL[dtype])


def run(args) -> dict:
    """Build the models, run the chosen sections (each guarded), return the report."""
    started = time.perf_counter()
    names = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    setup = build_setup(args)
    report = {"schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **environment(setup),
              "build_seconds": round(time.perf_counter() - started, 2), "sections": {}}
    for name in names:
        report["sections"][name] = result = guarded(lambda: SECTIONS[name](setup))
        print(f"{name:14s} {'pass' if result['pass'] else 'FAIL'}  ({result['seconds']:.1f} s)"
              + (f"  {result['error']}" if "error" in result else ""), flush=True)
    report["pass"] = all(r["pass"] for r in report["sections"].values())
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def plain_json(value):
    """NaN / inf as strings (strict JSON), tuples as lists, anything else unknown as its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specdec.measure.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="vicuna-7b",
                        help="vicuna-7b (shape, --layers of them) or tiny (CPU tests)")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), " + ", ".join(DTYPES))
    parser.add_argument("--layers", type=int, default=None, help="target decoder layers (vicuna-7b: 8 of 32; tiny: 4)")
    parser.add_argument("--memory-tokens", type=int, default=None, help="tokens of the memory section's recycle run")
    parser.add_argument("--tie-gap", type=float, default=None, help="logit gap below which a divergence is a near-tie")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gpu_check/report.json")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except UserError as err:
        return print_error(err)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plain_json(report), indent=1) + "\n")
    failed = [name for name, r in report["sections"].items() if not r["pass"]]
    verdict = "passed" if not failed else "FAILED: " + ", ".join(failed)
    print(f"gpu-check {verdict} in {report['seconds']:.0f} s -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
