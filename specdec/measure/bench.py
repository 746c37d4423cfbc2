"""Harness overhead benchmark: a method through the harness loop vs transformers' own ``model.generate``.

``--method ar`` compares plain greedy decoding; ``--method pld`` compares our prompt lookup decoding with
``generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=3)`` (transformers' PLD). Same prompts (the
first question of each Spec-Bench task), same greedy settings, interleaved (alternating which goes first)
so machine noise hits both alike. Prints the tokens/s ratio and writes ``runs/bench/<method>_vs_generate.json``.

    python -m specdec.measure.bench --method ar --max-new-tokens 64 --rounds 2
    python -m specdec.measure.bench --method pld --max-new-tokens 128 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specdec import EMBEDDED_MODEL
from specdec.measure.harness import (interleave, method_config, our_generate, save_report, task_prompts,
                                     time_generate)
from specdec.models import load_model, resolve_device, resolve_dtype, torch_threads, vocab_size
from specdec.running.prompts import stop_ids
from specdec.verify.decode import Stopwatch
from specdec.verify.proposer import MethodEnv, build_proposer
from specdec.verify.target import Target

# ``generate`` arguments equivalent to a method's YAML knobs (transformers' prompt lookup = our pld).
GENERATE_KWARGS = {
    "ar": lambda cfg: {},
    "pld": lambda cfg: {"prompt_lookup_num_tokens": cfg["num_pred_tokens"],
                        "max_matching_ngram_size": cfg["max_ngram_size"]},
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(GENERATE_KWARGS), default="ar", help="conf/method/<method>.yaml")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None, help="default runs/bench/<method>_vs_generate.json")
    args = parser.parse_args(argv)
    with torch_threads(args.threads):
        return bench(args)


def bench(args) -> dict:
    device = resolve_device(args.device)
    model, tok = load_model(args.model, device, resolve_dtype(args.dtype, device))
    stops, clock = stop_ids(tok, model.generation_config), Stopwatch(device)
    method_cfg = method_config(args.method)
    generate_kwargs = GENERATE_KWARGS[args.method](method_cfg)
    target = Target(model)
    proposer = build_proposer(method_cfg, MethodEnv(vocab_size(model), device, tok, model=model))
    prompts = task_prompts(tok)
    n = args.max_new_tokens

    def harness(prompt: list[int]) -> tuple[float, list[int]]:
        gen = our_generate(target, proposer, prompt, n, stops, clock)
        return gen.wall_time, gen.output_ids

    systems = {"harness": harness, "generate": lambda prompt: time_generate(model, prompt, n, clock, **generate_kwargs)}
    time_generate(model, prompts[0], 8, clock, **generate_kwargs)  # warm-up both paths
    our_generate(target, proposer, prompts[0], 8, stops, clock)
    rows = []
    for row in interleave(systems, prompts, args.rounds, f"{args.method}: harness vs generate"):
        (t_h, ids_h), (t_g, ids_g) = row["runs"]["harness"], row["runs"]["generate"]
        rows.append({"prompt": row["prompt"], "tokens": len(ids_h), "harness_s": t_h, "generate_s": t_g,
                     "identical": ids_h == ids_g[:len(ids_h)] and len(ids_g) == len(ids_h)})
    harness_rate = statistics.mean(r["tokens"] / r["harness_s"] for r in rows)
    generate_rate = statistics.mean(r["tokens"] / r["generate_s"] for r in rows)
    report = {"method": args.method, "harness_tokens_per_s": harness_rate, "generate_tokens_per_s": generate_rate,
              "ratio": harness_rate / generate_rate,
              "median_pair_ratio": statistics.median(r["generate_s"] / r["harness_s"] for r in rows),
              "identical": all(r["identical"] for r in rows), "threads": torch.get_num_threads(),
              "device": str(device), "dtype": str(model.dtype), "max_new_tokens": args.max_new_tokens, "rows": rows}
    out = save_report(args.out or f"runs/bench/{args.method}_vs_generate.json", report)
    print(f"{args.method}: harness {harness_rate:.2f} tok/s vs generate {generate_rate:.2f} tok/s: "
          f"ratio {report['ratio']:.3f}x "
          f"(median paired {report['median_pair_ratio']:.3f}x), identical outputs: {report['identical']} -> {out}")
    return report


if __name__ == "__main__":
    main()
