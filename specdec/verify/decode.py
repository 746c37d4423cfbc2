"""The decode loop: propose -> score -> accept -> commit, one verify forward per step.

Every method, the autoregressive baseline included, runs through ``generate``; so all are timed
by the same stopwatch and counted by the same truncation rule (docs/verifier.md §8):
the generated ids run up to and including the first stop id, capped at ``max_new_tokens``; tokens
past either limit are never committed, counted or shown to the proposer.

Timing without per-part syncs: the device is synchronised once when a generation starts and once
when it ends. In between, every part boundary is a ``Mark`` (host clock, plus a CUDA event recorded
on the stream on a GPU), and the per-part times are read after the final sync. A sync per boundary
(five per step) would stall the host each time, a cost paid per step, i.e. more often by the baseline
(more steps) than by the method, biasing the paired ratio. On CPU the marks are ``perf_counter`` only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from specdec.verify.proposer import Context, Proposer, StepResult
from specdec.verify.target import Target


class Mark(NamedTuple):
    host: float                              # time.perf_counter() when marked
    event: Optional[torch.cuda.Event] = None  # CUDA only: an event recorded on the stream at that point


class Stopwatch:
    """Marks part boundaries; CUDA events on a GPU (no sync per mark), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __call__(self) -> float:
        """A synchronised wall-clock reading (for callers timing a whole call, e.g. ``specdec.measure.bench``)."""
        self.sync()
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> Mark:
        if not self.cuda:
            return Mark(time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return Mark(time.perf_counter(), event)

    @staticmethod
    def seconds(start: Mark, end: Mark) -> float:
        """Time between two marks on the device's timeline (both events must have completed: sync first)."""
        if start.event is None:
            return end.host - start.host
        return start.event.elapsed_time(end.event) / 1000.0


@dataclass
class _DeviceWork:
    """Spans a method attributed to device work during one generation (see ``device_work``)."""

    clock: Stopwatch
    where: Optional[tuple[int, int]] = None           # (step, part) running: part 0 = propose, 1 = observe
    spans: list = field(default_factory=list)         # (step, part, start Mark, end Mark)


_ACTIVE: ContextVar[Optional[_DeviceWork]] = ContextVar("specdec_device_work", default=None)


@contextmanager
def device_work():
    """Attribute the enclosed part of ``propose``/``observe`` to the target's device, not to the host proposer
    time: e.g. Token Recycling's top-k over every tree node's logits. Outside ``generate`` it does nothing.

        with device_work():
            top = torch.topk(logits, k).indices
    """
    active = _ACTIVE.get()
    if active is None or active.where is None:
        yield
        return
    where, start = active.where, active.clock.mark()
    try:
        yield
    finally:
        active.spans.append((*where, start, active.clock.mark()))


@dataclass
class Generation:
    """One generation (one turn) as measured by the loop. Part times are on the device's timeline (CUDA
    events; = host clock on CPU) and sum, with the prefill, to the wall time minus ``proposer.end``."""

    output_ids: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)  # committed tokens per verify step
    tree_sizes: list[int] = field(default_factory=list)      # tokens per verify forward (root and side rows included)
    wall_time: float = 0.0     # prefill + all steps (Spec-Bench's wall_time); no (de)tokenization
    prefill_time: float = 0.0
    draft_time: float = 0.0    # proposer.propose
    verify_time: float = 0.0   # target forward + acceptance
    commit_time: float = 0.0   # truncation + KV-cache compaction
    update_time: float = 0.0   # proposer.observe (the method learning from the step)
    # Per verify step, host seconds (perf_counter) of propose / observe minus their ``device_work`` spans,
    # and the seconds of those spans (device timeline): the proposer's own cost at any target speed.
    step_draft_times: list[float] = field(default_factory=list)
    step_update_times: list[float] = field(default_factory=list)
    step_device_times: list[float] = field(default_factory=list)
    stop_reason: str = "max_new_tokens"   # eos | max_new_tokens | context (the runner's context_policy=stop)
    prompt_tokens: int = 0     # set by the runner: the turn's prompt length
    past_context: int = 0      # set by the runner: committed positions past the target's trained length

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
             stop_ids: frozenset[int], rule, clock: Stopwatch, seed: int = 0) -> Generation:
    """Generate one turn. The caller has already called ``proposer.reset("turn")``; ``seed`` (per question
    and turn) seeds the proposer's random streams (``Context.seed``)."""
    gen = Generation()
    ctx = Context(tokens=list(prompt_ids), prompt_len=len(prompt_ids), remaining=max_new_tokens, seed=seed)
    clock.sync()
    start = clock.mark()
    target.keep_hidden = proposer.wants_hidden
    target.prefill(ctx.tokens)
    ctx.hidden = target.hidden  # None unless the proposer reads the target's features (EAGLE heads)
    proposer.begin(ctx)
    marks = [clock.mark()]  # part boundaries: end of prefill, then 4 per step (chained, so parts tile the time)
    work = _DeviceWork(clock)
    token = _ACTIVE.set(work)
    try:
        while ctx.remaining > 0:
            work.where = (gen.steps, 0)
            tree = target.place(proposer.propose(ctx))        # on the model's device (a copy only if it is not)
            drafted = clock.mark()
            logits = target.score(tree)                       # [T, V] float32
            path, bonus = rule(tree, logits)
            verified = clock.mark()
            tokens = tree.token_list                          # the rule has read them (greedy) or they were known
            kept, hit_stop = truncate([tokens[i] for i in path[1:]] + [bonus], ctx.remaining, stop_ids)
            target.commit(tree, path)
            ctx.tokens.extend(kept)
            if ctx.hidden is not None:  # the new tokens[:-1] rows: the root and the accepted nodes kept
                ctx.hidden = torch.cat([ctx.hidden, target.hidden.index_select(0, tree.path_index(path)[:len(kept)])])
            ctx.remaining -= len(kept)
            done = hit_stop or ctx.remaining == 0
            committed = clock.mark()
            work.where = (gen.steps, 1)
            proposer.observe(StepResult(tree, logits, path, kept, final=done, side_logits=target.side_logits))
            marks += [drafted, verified, committed, clock.mark()]
            gen.accept_lengths.append(len(kept))
            gen.tree_sizes.append(tree.forward_rows)          # side rows included: the forward's width
            if hit_stop:
                gen.stop_reason = "eos"
                break
        work.where = None
        proposer.end(ctx)
    finally:
        _ACTIVE.reset(token)
    clock.sync()
    gen.wall_time = time.perf_counter() - start.host
    _fill_times(gen, clock, start, marks, work.spans)
    gen.output_ids = ctx.generated
    assert sum(gen.accept_lengths) == gen.new_tokens <= max_new_tokens
    return gen


def _fill_times(gen: Generation, clock: Stopwatch, start: Mark, marks: list[Mark], spans: list) -> None:
    """Part times from the chained marks (read after the final sync): step i owns marks[4i : 4i+5]."""
    seconds = clock.seconds
    gen.prefill_time = seconds(start, marks[0])
    host_in_work = [[0.0, 0.0] for _ in range(gen.steps)]   # [step][part] host seconds inside device_work
    gen.step_device_times = [0.0] * gen.steps
    for step, part, a, b in spans:
        host_in_work[step][part] += b.host - a.host
        gen.step_device_times[step] += seconds(a, b)
    for i in range(gen.steps):
        m0, m1, m2, m3, m4 = marks[4 * i: 4 * i + 5]
        gen.draft_time += seconds(m0, m1)
        gen.verify_time += seconds(m1, m2)
        gen.commit_time += seconds(m2, m3)
        gen.update_time += seconds(m3, m4)
        gen.step_draft_times.append(m1.host - m0.host - host_in_work[i][0])
        gen.step_update_times.append(m4.host - m3.host - host_in_work[i][1])
