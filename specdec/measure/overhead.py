"""``make bench-overhead``: the harness's own cost per verify step, measured on the CPU (issue 21, item 7).

Beside a 25 ms Vicuna-7B forward on an A100 a few hundred microseconds of host work per step vanish; beside a
1-2 ms forward they are the step. This benchmark builds that regime on the CPU: a tiny random Llama
(``TARGET``: hidden 128, 3 layers, 4 heads / 2 KV heads, MLP 344, Vicuna's 32,000-token vocabulary so the
logits, argmax and tables are full-sized; seeded, built in-process, no download) whose one-token step took
1.5-2.1 ms on this project's 2-core CPU with one torch thread (200 cached tokens, a loaded machine), and measures:

* **AR vs ``generate``**: our autoregressive loop (``specdec.verify.decode.generate`` with the root-only proposer)
  against transformers' own greedy ``model.generate`` on the same prompts and new tokens, interleaved in rotating
  order (``specdec.measure.harness.interleave``). Goal: >= 0.95x its tokens/s.
* **host ms per step of every method**: the loop's parts minus the target's forward. ``Generation`` already
  splits the proposer's host time from its ``device_work`` (``step_draft_times``, ``step_update_times``,
  ``step_device_times``); the target forward inside ``Target.score`` is timed here by forward hooks (the whole
  model, or its decoder layers and LM head when Kangaroo's verifier runs them one by one) and so is the greedy
  rule's argmax over the T x V logits (``TimedGreedy``; on this CPU ~6 ms for a 60-node tree over 32,000
  tokens, a few microseconds of device work on a GPU), so verify + commit host time = verify + commit - both
  (``device_ms``). Goal: <= 1 ms per step. Methods with a drafter (draft-model chains and
  the dynamic trees) spend their drafting in drafter forwards, device work on a GPU: their drafting is reported
  apart (``draft_ms``) and excluded from ``host_ms``.
* **syncs per step** of each method, from one counted generation (``specdec.measure.syncs``).

Prompts are synthetic (the random target has no tokenizer): seeded token ids of Spec-Bench-like lengths, built
from recurring "phrases" so the retrieval methods find drafts. Draft-model methods draft with the target's
first layer (``early_exit``, no adapter: the committed heads belong to SmolLM2).

    python -m specdec.measure.overhead --threads 1 --max-new-tokens 64 --rounds 2
    python -m specdec.measure.overhead --methods ar,pld,recycle_cpu --rounds 1

Writes ``runs/bench/overhead.json`` and prints one table. Run it alone on the machine: it times.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from specdec.drafters import EarlyExitDrafter
from specdec.measure.harness import interleave, method_config, our_generate, save_report, time_generate
from specdec.measure.syncs import host_syncs
from specdec.models import torch_threads, vocab_size
from specdec.verify.acceptance import Greedy
from specdec.verify.decode import Generation, Stopwatch, generate
from specdec.verify.proposer import MethodEnv, build_proposer, registry
from specdec.verify.target import Target

TARGET = dict(vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)
SEED = 0
PROMPT_LENGTHS = (128, 192, 256, 160, 224, 96)   # one per Spec-Bench task, of their typical size in tokens
# conf/method/<name>.yaml of every method that runs on a random target without tokenizer-built data (aded's
# ShareGPT table, rest's datastore, medusa / hydra heads are model-specific); those with a drafter draft with it.
METHODS = ("ar", "recycle", "recycle_cpu", "pld", "lookahead", "lookahead_cpu", "sps", "kangaroo", "specinfer",
           "rsd", "eagle2", "opt_tree", "dyspec")
DRAFT_EXIT_LAYER = 1
HOST_GOAL_MS, RATIO_GOAL = 1.0, 0.95


def tiny_target(seed: int = SEED):
    """The random Llama of ``TARGET`` (fp32, CPU, sdpa), greedy ``generate`` running to ``max_new_tokens``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TARGET, attn_implementation="sdpa")).eval()
    model.generation_config.eos_token_id = None   # random weights: stop on length only, as the harness here
    model.generation_config.pad_token_id = 0
    return model


def synthetic_prompts(lengths=PROMPT_LENGTHS, seed: int = SEED, vocab: int = TARGET["vocab_size"]) -> list[list[int]]:
    """Seeded prompts of ``lengths`` tokens, concatenations of 48 recurring 3-8-token phrases."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(100, vocab) for _ in range(rng.randint(3, 8))] for _ in range(48)]
    prompts = []
    for n in lengths:
        ids: list[int] = []
        while len(ids) < n:
            ids += rng.choice(phrases)
        prompts.append(ids[:n])
    return prompts


def build_method(name: str, model) -> object:
    """conf/method/<name>.yaml's proposer on the tiny target (its config defaults dropped; an early-exit drafter
    for the draft-model methods)."""
    cfg = {k: v for k, v in method_config(name).items() if k != "defaults"}
    env = MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=None, model=model, seed=SEED)
    if registry()[cfg["proposer"]].needs_drafter:
        env = dataclasses.replace(env, drafter=EarlyExitDrafter(model, DRAFT_EXIT_LAYER, env.vocab_size))
    proposer = build_proposer(cfg, env)
    proposer.reset("run")
    return proposer


class ForwardTimer:
    """Seconds the target spends in its forward inside ``Target.score`` (hooks on the whole model, and on its
    decoder layers and LM head for partial-depth verification, which calls them one by one)."""

    def __init__(self, target: Target):
        self.target, self.seconds = target, 0.0
        self._active = self._depth = 0
        self._start = 0.0

    def _enter(self, *args, **kwargs):
        if self._active:
            self._depth += 1
            if self._depth == 1:
                self._start = time.perf_counter()

    def _leave(self, *args, **kwargs):
        if self._active:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start

    @contextmanager
    def timing(self):
        model = self.target.model
        modules = [model, *model.get_decoder().layers, model.get_output_embeddings()]
        handles = [h for m in modules for h in (m.register_forward_pre_hook(self._enter),
                                                m.register_forward_hook(self._leave))]
        score = self.target.score

        def timed_score(tree):
            self._active += 1
            try:
                return score(tree)
            finally:
                self._active -= 1

        self.target.score = timed_score
        try:
            yield self
        finally:
            del self.target.score
            for h in handles:
                h.remove()


class TimedGreedy(Greedy):
    """The greedy rule with its argmax over the nodes' logits (T x V, device work on a GPU) timed apart."""

    seconds = 0.0

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        pred = super().argmax(logits)
        self.seconds += time.perf_counter() - start
        return pred


def timed_generation(target, proposer, prompt: list[int], max_new_tokens: int, clock: Stopwatch,
                     timer: ForwardTimer, rule: TimedGreedy) -> tuple[Generation, float]:
    """One greedy generation (as ``harness.our_generate``); returns it and the seconds of target forwards and
    rule argmax inside its verify part."""
    before = timer.seconds + rule.seconds
    proposer.reset("turn")
    gen = generate(target, proposer, prompt, max_new_tokens, frozenset(), rule, clock)
    return gen, timer.seconds + rule.seconds - before


def measure_method(name: str, model, prompts: list[list[int]], max_new_tokens: int, rounds: int,
                   clock: Stopwatch) -> dict:
    """Host ms per step of one method over ``rounds`` passes of ``prompts`` (one warm-up generation first)."""
    proposer, target, rule = build_method(name, model), Target(model), TimedGreedy()
    timer = ForwardTimer(target)
    our_generate(target, proposer, prompts[0], 8, frozenset(), clock)            # warm-up, untimed
    parts = {"steps": 0, "tokens": 0, "wall": 0.0, "forward": 0.0, "verify_commit": 0.0, "draft": 0.0,
             "update": 0.0, "device_work": 0.0}
    with timer.timing():
        for _ in range(rounds):
            for prompt in prompts:
                gen, device = timed_generation(target, proposer, prompt, max_new_tokens, clock, timer, rule)
                parts["steps"] += gen.steps
                parts["tokens"] += gen.new_tokens
                parts["wall"] += gen.wall_time - gen.prefill_time
                parts["forward"] += device
                parts["verify_commit"] += gen.verify_time + gen.commit_time - device
                parts["draft"] += sum(gen.step_draft_times)
                parts["update"] += sum(gen.step_update_times)
                parts["device_work"] += sum(gen.step_device_times)
    ms = {k: 1000 * parts[k] / max(parts["steps"], 1) for k in ("wall", "forward", "verify_commit", "draft",
                                                                 "update", "device_work")}
    drafting_apart = bool(getattr(proposer, "needs_drafter", False))
    host = ms["verify_commit"] + ms["update"] + (0.0 if drafting_apart else ms["draft"])
    syncs = host_syncs(model, build_method(name, model), prompts[0], max_new_tokens)
    return {"steps": parts["steps"], "mat": parts["tokens"] / max(parts["steps"], 1),
            "step_ms": ms["wall"], "device_ms": ms["forward"], "verify_commit_host_ms": ms["verify_commit"],
            "draft_ms": ms["draft"], "update_host_ms": ms["update"], "device_work_ms": ms["device_work"],
            "drafting_apart": drafting_apart, "host_ms": host, "host_goal_met": host <= HOST_GOAL_MS,
            "syncs_per_step": syncs["mean"], "syncs_max": syncs["max"]}


def ar_vs_generate(model, prompts: list[list[int]], max_new_tokens: int, rounds: int, clock: Stopwatch) -> dict:
    """Our AR loop vs ``model.generate``, interleaved; tokens/s as the mean of per-prompt rates (bench.py's)."""
    proposer, target = build_method("ar", model), Target(model)
    n = max_new_tokens

    def harness(prompt):
        gen = our_generate(target, proposer, prompt, n, frozenset(), clock)
        return gen.wall_time, gen.output_ids

    time_generate(model, prompts[0], 8, clock)                                   # warm-up both, untimed
    our_generate(target, proposer, prompts[0], 8, frozenset(), clock)
    rows = []
    systems = {"harness": harness, "generate": lambda prompt: time_generate(model, prompt, n, clock)}
    for row in interleave(systems, prompts, rounds, "ar: harness vs generate"):
        (t_h, ids_h), (t_g, ids_g) = row["runs"]["harness"], row["runs"]["generate"]
        rows.append({"prompt": row["prompt"], "tokens": len(ids_h), "harness_s": t_h, "generate_s": t_g,
                     "identical": ids_h == ids_g})
    ours = statistics.fmean(r["tokens"] / r["harness_s"] for r in rows)
    theirs = statistics.fmean(r["tokens"] / r["generate_s"] for r in rows)
    return {"harness_tokens_per_s": ours, "generate_tokens_per_s": theirs, "ratio": ours / theirs,
            "ratio_goal_met": ours / theirs >= RATIO_GOAL, "identical": all(r["identical"] for r in rows),
            "rows": rows}


def table(report: dict) -> str:
    """The printed summary: AR vs generate, then one row per method."""
    ar = report["ar_vs_generate"]
    lines = [f"AR vs generate: {ar['harness_tokens_per_s']:.1f} vs {ar['generate_tokens_per_s']:.1f} tok/s = "
             f"{ar['ratio']:.3f}x (goal >= {RATIO_GOAL}), identical outputs: {ar['identical']}",
             f"{'method':<14}{'MAT':>6}{'step ms':>9}{'dev ms':>8}{'host ms':>9}{'verify':>8}{'update':>8}"
             f"{'draft':>8}{'dev.work':>9}{'syncs':>7}  goal"]
    for name, m in report["methods"].items():
        draft = f"({m['draft_ms']:.2f})" if m["drafting_apart"] else f"{m['draft_ms']:.2f}"
        lines.append(f"{name:<14}{m['mat']:>6.2f}{m['step_ms']:>9.2f}{m['device_ms']:>8.2f}{m['host_ms']:>9.3f}"
                     f"{m['verify_commit_host_ms']:>8.3f}{m['update_host_ms']:>8.3f}{draft:>8}"
                     f"{m['device_work_ms']:>9.3f}{m['syncs_per_step']:>7.2f}  "
                     f"{'ok' if m['host_goal_met'] else 'MISS'}")
    lines.append("ms per verify step; dev = target forward + the rule's argmax; host = verify+commit host + update "
                 "host + draft (in parentheses: drafter forwards, reported apart); dev.work = the method's "
                 "device_work spans")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated conf/method names")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--prompts", type=int, default=len(PROMPT_LENGTHS), help="how many of the six prompts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/overhead.json")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args) -> dict:
    model, clock = tiny_target(), Stopwatch(torch.device("cpu"))
    prompts = synthetic_prompts()[:args.prompts]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = {"target": {**TARGET, "layers": TARGET["num_hidden_layers"], "seed": SEED, "dtype": "float32"},
              "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "prompt_lengths": [len(p) for p in prompts], "goals": {"ar_ratio": RATIO_GOAL, "host_ms": HOST_GOAL_MS},
              "ar_vs_generate": ar_vs_generate(model, prompts, args.max_new_tokens, args.rounds, clock),
              "methods": {name: measure_method(name, model, prompts, args.max_new_tokens, args.rounds, clock)
                          for name in methods}}
    out = save_report(Path(args.out), report)
    print(table(report))
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
