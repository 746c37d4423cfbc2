"""FR-Spec's frequency-ranked draft vocabulary (Zhao et al. 2025, arXiv 2502.14856) measured: per draft vocabulary
size k, the draft milliseconds per drafter forward, MAT and the tokens/s ratio to the paired AR, for drafters that
run the target's LM head (specdec/drafters/vocab.py, docs/fr_spec.md).

    python -m specdec.measure.fr_vocab                                  # make bench-fr-vocab
    python -m specdec.measure.fr_vocab --ks 4096,full --pairs sps:kangaroo --max-new-tokens 32

Every system -- AR and each (method, drafter, k) -- runs once per prompt (the first question of each Spec-Bench task,
turn 1), in an order rotating from prompt to prompt (``specdec.measure.harness.interleave``), greedy. The draft time
is the proposer's ``propose`` (host clock on CPU, device timeline on CUDA), divided by the drafter forwards made
inside it. Every output is checked identical to AR's. Writes ``runs/bench/fr_vocab.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specdec import EMBEDDED_MODEL, PROJECT_ROOT
from specdec.drafters import build_drafter
from specdec.measure.harness import interleave, our_generate, save_report, task_prompts
from specdec.models import default_cache_dir, load_model, resolve_device, resolve_dtype, torch_threads, vocab_size
from specdec.running.corpus import token_counts
from specdec.running.prompts import stop_ids
from specdec.verify.decode import Stopwatch
from specdec.verify.proposer import MethodEnv, Proposer, build_proposer
from specdec.verify.target import Target

KS = "4096,8192,16384,full"
PAIRS = "sps:kangaroo,eagle2:eagle"  # method:drafter


def composed(method: str, drafter: str, vocab: str) -> tuple[dict, dict]:
    """(method config, drafter config) as ``run.py method=<method> drafter=<drafter> drafter.vocab=<vocab>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", f"drafter={drafter}", f"drafter.vocab={vocab}"])
    return OmegaConf.to_container(cfg.method, resolve=True), OmegaConf.to_container(cfg.drafter, resolve=True)


def vocab_value(k: str) -> str:
    """``--ks`` entry -> ``drafter.vocab`` value (``build_drafter`` refuses a bad one in one line)."""
    return "full" if k == "full" else f"top-{k}"


def counting_forwards(proposer: Proposer) -> list[int]:
    """Count the drafter forwards made inside ``proposer.propose`` (the timed draft phase) into the returned cell."""
    cell, propose, drafter = [0], proposer.propose, proposer.drafter

    def counted(ctx):
        before = drafter.forwards
        tree = propose(ctx)
        cell[0] += drafter.forwards - before
        return tree

    proposer.propose = counted
    return cell


def build_systems(model, tok, counts, pairs: list[tuple[str, str]], ks: list[str], max_new_tokens: int,
                  stops, clock) -> tuple[dict, dict]:
    """name -> callable(prompt) returning one run's record, and name -> its settings."""
    target = Target(model)
    V = vocab_size(model)
    ar = Proposer(MethodEnv(V, model.device, tok, model=model))

    def run(proposer: Proposer, forwards: list[int] | None):
        def one(prompt):
            before = forwards[0] if forwards else 0
            gen = our_generate(target, proposer, prompt, max_new_tokens, stops, clock)
            return {"ids": gen.output_ids, "wall_s": gen.wall_time, "steps": gen.steps, "draft_s": gen.draft_time,
                    "forwards": (forwards[0] - before) if forwards else 0}
        return one

    systems, settings = {"ar": run(ar, None)}, {"ar": {"method": "ar"}}
    for method, drafter_name in pairs:
        for k in ks:
            method_cfg, drafter_cfg = composed(method, drafter_name, vocab_value(k))
            drafter = build_drafter(drafter_cfg, model, tok, V, default_cache_dir(), lambda: counts)
            env = MethodEnv(V, model.device, tok, model=model, drafter=drafter, cache_dir=str(default_cache_dir()))
            proposer = build_proposer(method_cfg, env)
            name = f"{method}+{drafter_name}@{k}"
            systems[name] = run(proposer, counting_forwards(proposer))
            settings[name] = {"method": method, "drafter": drafter_name, "vocab": vocab_value(k)}
    return systems, settings


def summarize(rows: list[dict], settings: dict) -> dict:
    """Per system: MAT, draft ms per forward, tokens/s, the ratio to AR's tokens/s, identical to AR."""
    out = {}
    ar_rate = statistics.mean(len(r["runs"]["ar"]["ids"]) / r["runs"]["ar"]["wall_s"] for r in rows)
    for name, cfg in settings.items():
        runs = [r["runs"][name] for r in rows]
        rate = statistics.mean(len(x["ids"]) / x["wall_s"] for x in runs)
        forwards = sum(x["forwards"] for x in runs)
        out[name] = {**cfg, "mat": sum(len(x["ids"]) for x in runs) / sum(x["steps"] for x in runs),
                     "draft_ms_per_forward": 1e3 * sum(x["draft_s"] for x in runs) / forwards if forwards else None,
                     "tokens_per_s": rate, "ratio_to_ar": rate / ar_rate,
                     "identical_to_ar": all(r["runs"][name]["ids"] == r["runs"]["ar"]["ids"] for r in rows)}
    return out


def format_table(summary: dict) -> str:
    lines = [f"{'system':28} {'MAT':>5} {'draft ms/fwd':>12} {'tok/s':>7} {'x AR':>6} identical"]
    for name, s in summary.items():
        ms = "-" if s["draft_ms_per_forward"] is None else f"{s['draft_ms_per_forward']:.2f}"
        lines.append(f"{name:28} {s['mat']:5.2f} {ms:>12} {s['tokens_per_s']:7.2f} {s['ratio_to_ar']:6.3f} "
                     f"{s['identical_to_ar']}")
    return "\n".join(lines)


def measure(model, tok, counts, pairs, ks, prompts, max_new_tokens: int, rounds: int) -> dict:
    """Warm every system up once, then ``rounds`` interleaved passes over ``prompts``; the report."""
    device = model.device
    stops, clock = stop_ids(tok, model.generation_config), Stopwatch(device)
    systems, settings = build_systems(model, tok, counts, pairs, ks, max_new_tokens, stops, clock)
    for system in systems.values():  # untimed warm-up (first-call allocations, oneDNN kernels)
        system(prompts[0])
    rows = interleave(systems, prompts, rounds, "fr_vocab")
    summary = summarize(rows, settings)
    return {"summary": summary, "max_new_tokens": max_new_tokens, "rounds": rounds, "prompts": len(prompts),
            "threads": torch.get_num_threads(), "device": str(device), "dtype": str(model.dtype),
            "rows": [{"prompt": r["prompt"], "order": r["order"],
                      "runs": {n: {k: v for k, v in x.items() if k != "ids"} | {"tokens": len(x["ids"])}
                               for n, x in r["runs"].items()}} for r in rows]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--ks", default=KS, help="draft vocabulary sizes (comma list; 'full' = no cut)")
    parser.add_argument("--pairs", default=PAIRS, help="method:drafter pairs (comma list)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the six task prompts")
    parser.add_argument("--max-records", type=int, default=None, help="ShareGPT records counted (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default="auto", help="target back end (run.py's default: auto)")
    parser.add_argument("--out", default="runs/bench/fr_vocab.json")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",")]
    ks = [k.strip() for k in args.ks.split(",")]
    with torch_threads(args.threads):
        device = resolve_device(args.device)
        model, tok = load_model(args.model, device, resolve_dtype(args.dtype, device), backend=args.backend)
        counts = token_counts(default_cache_dir(), tok, max_records=args.max_records)
        report = measure(model, tok, counts, pairs, ks, task_prompts(tok), args.max_new_tokens, args.rounds)
    report |= {"max_records": args.max_records, "backend": getattr(model, "specdec_backend", args.backend)}
    print(format_table(report["summary"]))
    print(f"wrote {save_report(args.out, report)}")
    return report


if __name__ == "__main__":
    main()
