"""Proposer cost per verify step on real SmolLM2 steps: host milliseconds of ``propose`` + ``observe``
(mean, p95), with the device work a method attributes through ``specdec.verify.decode.device_work`` (Token
Recycling's top-k over the tree's logits) reported separately. Issue 14, "Proposer cost at GPU speed".

    python -m analysis.proposer_cost                                 # released sizes, 6 tasks x 64 tokens
    python -m analysis.proposer_cost --methods aded pld --new-tokens 128 --dump /tmp/drafts.pkl

Each method runs through the shared loop (``specdec.verify.decode.generate``) on the first Spec-Bench question
of every task, greedy, one torch thread; one untimed warm-up generation first. ``--dump`` writes every
proposed tree (tokens, parents) so two implementations can be compared draft by draft.
"""

from __future__ import annotations

import argparse
import pickle

import numpy as np
from specdec import EMBEDDED_MODEL, PROJECT_ROOT
import torch
from omegaconf import OmegaConf

from specdec.verify.acceptance import Greedy
from specdec.verify.decode import Stopwatch, generate
from specdec.models import default_cache_dir, load_model, vocab_size
from specdec.measure.harness import task_prompts
from specdec.running.prompts import stop_ids
from specdec.verify.proposer import MethodEnv, build_proposer
from specdec.verify.target import Target

CONF = PROJECT_ROOT / "conf" / "method"


class Recorded:
    """Wraps a proposer and keeps every drafted tree (tokens, parents); timing is the decode loop's own."""

    def __init__(self, proposer):
        self.inner, self.trees = proposer, []

    def propose(self, ctx):
        tree = self.inner.propose(ctx)
        self.trees.append((tree.tokens.tolist(), tree.parents.tolist()))
        return tree

    def __getattr__(self, name):
        return getattr(self.inner, name)


def profile(method: str, model, tok, prompts: list[list[int]], new_tokens: int, overrides: dict) -> dict:
    cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / f"{method}.yaml")), **overrides}
    env = MethodEnv(vocab_size=vocab_size(model), device=model.device, tokenizer=tok, model=model,
                    cache_dir=str(default_cache_dir()))
    proposer = Recorded(build_proposer(cfg, env))
    stops, clock, target = stop_ids(tok, model.generation_config), Stopwatch(model.device), Target(model)
    proposer.reset("run")
    proposer.reset("turn")
    generate(target, proposer, prompts[0], 16, stops, Greedy(), clock)  # warm-up (kept state, as Spec-Bench)
    proposer.trees.clear()
    gens = []
    for ids in prompts:
        proposer.reset("question"); proposer.reset("turn")
        gens.append(generate(target, proposer, ids, new_tokens, stops, Greedy(), clock))
    steps = sum(g.steps for g in gens)
    host = np.array([d + u for g in gens for d, u in zip(g.step_draft_times, g.step_update_times)])  # [steps]
    device = np.array([t for g in gens for t in g.step_device_times])                              # [steps]
    return {"method": method, "steps": steps, "mat": sum(g.new_tokens for g in gens) / steps,
            "host_ms_mean": 1e3 * host.mean(), "host_ms_p95": 1e3 * np.percentile(host, 95),
            "device_ms_mean": 1e3 * device.mean(), "trees": proposer.trees}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.proposer_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["recycle", "lookahead", "pld", "aded"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dump", default=None, help="pickle {method: [(tokens, parents) per step]} here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method knob overrides (all methods)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the command line's setting
    model, tok = load_model(EMBEDDED_MODEL, torch.device("cpu"), torch.float32)
    prompts = task_prompts(tok)  # the six prompts every benchmark uses (specdec/measure/harness.py)
    overrides = {k: OmegaConf.create({"v": v}).v for k, v in (s.split("=", 1) for s in args.set)}
    rows, dump = [], {}
    for method in args.methods:
        known = set(OmegaConf.load(CONF / f"{method}.yaml"))
        row = profile(method, model, tok, prompts, args.new_tokens, {k: v for k, v in overrides.items() if k in known})
        dump[method] = row.pop("trees")
        rows.append(row)
        print(f"{method:12s} steps {row['steps']:4d}  MAT {row['mat']:.2f}  host ms/step mean {row['host_ms_mean']:.3f}"
              f"  p95 {row['host_ms_p95']:.3f}  device ms/step {row['device_ms_mean']:.3f}", flush=True)
    if args.dump:
        with open(args.dump, "wb") as fh:
            pickle.dump(dump, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
