"""The decode loop: propose -> score -> accept -> commit, one verify forward per step.

Every method, the autoregressive baseline included, runs through ``generate``; so all are timed
by the same stopwatch and counted by the same truncation rule (specs/verifier.md §8):
the generated ids run up to and including the first stop id, capped at ``max_new_tokens``; tokens
past either limit are never committed, counted or shown to the proposer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .proposer import Context, Proposer, StepResult
from .target import Target


class Stopwatch:
    """Wall clock that waits for the device first (CUDA kernels run asynchronously)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


@dataclass
class Generation:
    """One generation (one turn) as measured by the loop."""

    output_ids: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)  # committed tokens per verify step
    tree_sizes: list[int] = field(default_factory=list)      # tokens per verify forward (root included)
    wall_time: float = 0.0     # prefill + all steps (Spec-Bench's wall_time); no (de)tokenization
    prefill_time: float = 0.0
    draft_time: float = 0.0    # proposer.propose
    verify_time: float = 0.0   # target forward + acceptance
    commit_time: float = 0.0   # truncation + KV-cache compaction
    update_time: float = 0.0   # proposer.observe (the method learning from the step)
    stop_reason: str = "max_new_tokens"

    @property
    def new_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)


def truncate(candidates: list[int], room: int, stop_ids: frozenset[int]) -> tuple[list[int], bool]:
    """Keep at most ``room`` tokens, ending at the first stop id (kept). Returns (kept, stopped_on_eos)."""
    kept = []
    for tok in candidates[:room]:
        kept.append(tok)
        if tok in stop_ids:
            return kept, True
    return kept, False


def generate(target: Target, proposer: Proposer, prompt_ids: list[int], max_new_tokens: int,
             stop_ids: frozenset[int], rule, clock: Stopwatch) -> Generation:
    """Generate one turn. The caller has already called ``proposer.reset("turn")``."""
    gen = Generation()
    ctx = Context(tokens=list(prompt_ids), prompt_len=len(prompt_ids), remaining=max_new_tokens)
    start = clock()
    target.prefill(ctx.tokens)
    proposer.begin(ctx)
    gen.prefill_time = clock() - start
    while ctx.remaining > 0:
        t0 = clock()
        tree = proposer.propose(ctx)
        t1 = clock()
        logits = target.score(tree)                       # [T, V] float32
        path, bonus = rule(tree, logits)
        t2 = clock()
        candidates = tree.tokens[path[1:]].tolist() + [bonus]
        kept, hit_stop = truncate(candidates, ctx.remaining, stop_ids)
        target.commit(tree, path)
        ctx.tokens.extend(kept)
        ctx.remaining -= len(kept)
        done = hit_stop or ctx.remaining == 0
        t3 = clock()
        proposer.observe(StepResult(tree, logits, path, kept, final=done))
        t4 = clock()
        gen.accept_lengths.append(len(kept))
        gen.tree_sizes.append(tree.size)
        gen.draft_time += t1 - t0
        gen.verify_time += t2 - t1
        gen.commit_time += t3 - t2
        gen.update_time += t4 - t3
        if hit_stop:
            gen.stop_reason = "eos"
            break
    proposer.end(ctx)
    gen.wall_time = clock() - start
    gen.output_ids = ctx.generated
    assert sum(gen.accept_lengths) == gen.new_tokens <= max_new_tokens
    return gen
