"""Target back ends side by side (``make bench-backends``): per (back end, dtype), t(1) and t(N)/t(1) of one
verify forward on a chain at a 256-token context, and our AR loop's tokens/s against transformers'
``generate`` on the eager fp32 model, interleaved prompt by prompt in one process (specdec/backends.py).

    python -m specdec.measure.backends --variants eager/float32,onednn/float32,compile/float32,eager/bfloat16
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from tqdm import tqdm

from specdec import EMBEDDED_MODEL
from specdec.backends import cpu_has_native_bf16
from specdec.measure.harness import interleave, our_generate, task_prompts, time_generate
from specdec.models import load_model, torch_threads
from specdec.running.prompts import stop_ids
from specdec.running.results import write_report
from specdec.verify.decode import Stopwatch
from specdec.verify.proposer import MethodEnv, Proposer
from specdec.verify.target import Target, warm
from specdec.verify.tree import DraftTree

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--variants", default="eager/float32,onednn/float32", help="comma list of backend/dtype")
    parser.add_argument("--ns", default="1,2,4,8,16,32", help="tokens per verify forward")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the six task prompts")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per N (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench/backends.json")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return bench(args)


def verify_times(targets: dict[str, Target], context: list[int], ns: list[int], repeats: int,
                 clock: Stopwatch) -> dict:
    """Seconds of ``Target.score`` on a chain of n tokens after 256 cached ones, round-robin over variants and n."""
    for target in targets.values():
        target.prefill(context[:257])
    trees = {n: DraftTree.chain(context[256], context[257:256 + n]) for n in ns}
    times = {(name, n): [] for name in targets for n in ns}
    for _ in tqdm(range(repeats), desc="t(N)"):
        for n in ns:
            for name, target in targets.items():
                start = clock()
                target.score(trees[n])
                times[name, n].append(clock() - start)
                target.cache.crop(-n)
    return times


def bench(args) -> dict:
    cpu, clock, ns = torch.device("cpu"), Stopwatch(torch.device("cpu")), [int(n) for n in args.ns.split(",")]
    reference, tok = load_model(args.model, cpu, torch.float32)  # transformers' generate, eager fp32
    variants = {v: load_model(args.model, cpu, DTYPES[v.split("/")[1]], backend=v.split("/")[0])[0]
                for v in args.variants.split(",")}
    targets = {name: Target(model) for name, model in variants.items()}
    for name, target in targets.items():
        log.info("%s: warm-up %.1f s", name, warm(target, tuple(ns)))
    stops, prompts = stop_ids(tok, reference.generation_config), task_prompts(tok)
    times = verify_times(targets, prompts[0] * (1 + 300 // len(prompts[0])), ns, args.repeats, clock)

    # AR tokens/s: our loop per variant and generate (eager fp32), interleaved, order rotated per prompt
    ar = Proposer(MethodEnv(vocab_size=0, device=cpu, tokenizer=tok))

    def ours(name):
        def run(prompt):
            gen = our_generate(targets[name], ar, prompt, args.max_new_tokens, stops, clock)
            return gen.wall_time, gen.output_ids
        return run

    systems = {"generate": lambda prompt: time_generate(reference, prompt, args.max_new_tokens, clock),
               **{name: ours(name) for name in targets}}
    rows_ar = interleave(systems, prompts, args.rounds, "AR vs generate")
    rates = {w: [len(r["runs"][w][1]) / r["runs"][w][0] for r in rows_ar] for w in systems}
    outputs = {w: [r["runs"][w][1] for r in rows_ar] for w in systems}
    gen_rate = statistics.mean(rates["generate"])
    eager_ids = outputs.get("eager/float32")
    rows = []
    for name in targets:
        med = {n: statistics.median(times[name, n]) for n in ns}
        rows.append({"variant": name, "t1_ms": 1000 * med[ns[0]],
                     **{f"t{n}/t1": med[n] / med[ns[0]] for n in ns[1:]},
                     "ar_tokens_per_s": statistics.mean(rates[name]),
                     "ar_over_generate": statistics.mean(rates[name]) / gen_rate,
                     "ar_equals_eager_fp32": None if eager_ids is None else outputs[name] == eager_ids,
                     "ar_equals_generate": all(a == b[:len(a)] for a, b in zip(outputs[name], outputs["generate"]))})
    report = {"threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "generate_tokens_per_s": gen_rate, "bf16_native": cpu_has_native_bf16(), "rows": rows}
    write_report(args.out, report, rows)
    print(f"generate (eager fp32): {gen_rate:.2f} tok/s, {torch.get_num_threads()} threads -> {args.out}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
