"""Token-level acceptance of the multi-draft rules on real (p, q) pairs (issue 10; docs/spectr_multidraft.md §9).

End-to-end block efficiency (``make bench-multidraft``) compares rules on different sampled texts: with ~650
verify steps per run MAT's standard error is ~0.03, as large as the gaps the papers report between SpecTr and
SpecInfer (Khisti et al., Dolly: token-level acceptance .625 vs .620 at K = 2). Here every rule sees the same
pairs, so the comparison is paired: p is the target's next-token law and q the drafter's, both teacher-forced
along text the target sampled itself, under the run's temperature / top-k / top-p; for each K, the probability
that a rule accepts one of K children drafted at a node:

* SpS (K = 1) and SpecInfer (K i.i.d. draws, multi-round rejection): exact. A draw from q is accepted with
  probability sum min(r_j, q) against the residual r_j, and r_{j+1} = norm((r_j - q)^+) does not depend on the
  draws, so P(accept) = 1 - prod_j (1 - sum min(r_j, q)).
* SpecTr's K-SEQ: exact, 1 - (1 - beta)^K with beta = sum min(q, p / rho*) (the rule's own ``kseq_rho``).
  (The rule's descent into a child matched by the residual sample adds no token at this node: not counted.)
* ``khisti``, Khisti et al.'s LP-optimised selection over a truncated alphabet (K i.i.d. draws from the full
  q, as ``methods/khisti.py`` drafts): exact, sum min(p, r) with r the law of the pick (``lp_selection``).
* ``khisti_sir``, the harness's simplified variant (q cut to its top M, as ``methods/khisti_sir.py`` drafts,
  self-normalised IS pick): exact, sum min(p, r) with r the law of the pick (``is_selection_law``).
* ``optimal``: no rule over K i.i.d. draws of q does better than min_S p(S) + 1 - q(S)^K
  (``optimal_acceptance_bound``; Khisti et al.'s Section 3 optimum, attained by the untruncated LP).
* RSD (K distinct draws without replacement, recursive rejection): Monte Carlo of the shipped rule
  (``Sampling._recursive``), ``--trials`` per pair and K.

``tests/test_token_acceptance.py`` checks each exact formula against the shipped rule's Monte Carlo rate.

    python -m analysis.token_acceptance --drafter kangaroo --ks 1,2,4,8 -> runs/bench/token_acceptance.json
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import torch

from methods.khisti_sir import truncate_top_m
from methods.rsd import gumbel

from specdec import PROJECT_ROOT
from specdec.verify.acceptance import (Sampling, is_selection_law, kseq_rho, lp_selection, optimal_acceptance_bound,
                         processed_probs, sampling_processors)
from specdec.running.results import clustered_ratio_se

log = logging.getLogger(__name__)

RULES = ("specinfer", "spectr", "khisti", "khisti_sir", "rsd", "optimal")
PAIRS = (("spectr", "specinfer"), ("khisti", "spectr"), ("khisti", "specinfer"), ("khisti", "khisti_sir"),
         ("rsd", "specinfer"), ("optimal", "khisti"))  # (hi, lo): the papers' orderings as paired differences


# ---------------------------------------------------------------- acceptance at one node, per rule
def accept_specinfer(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """SpecInfer's rule (SpS for k = 1) with k i.i.d. draws from q: P(some draft is accepted), exact."""
    residual, p_reject = p.double(), 1.0
    q = q.double()
    for _ in range(k):
        p_reject *= 1.0 - float(torch.minimum(residual, q).sum())
        leftover = (residual - q).clamp_min(0)
        if float(leftover.sum()) <= 1e-12:  # the residual was q: this round accepted surely
            break
        residual = leftover / leftover.sum()
    return 1.0 - p_reject


def accept_kseq(p: torch.Tensor, q: torch.Tensor, k: int) -> float:
    """SpecTr's K-SEQ with k i.i.d. draws from q: 1 - (1 - beta(rho*))^k, exact."""
    rho = kseq_rho(p, q, k)
    beta = float(torch.minimum(q.double(), p.double() / rho).sum())
    return 1.0 - (1.0 - beta) ** k


def accept_khisti(p: torch.Tensor, q: torch.Tensor, k: int, lp_tokens: int = 5, tail_classes: int = 3) -> float:
    """Khisti et al.'s LP-optimised selection with k i.i.d. draws from the full q: sum min(p, r), exact."""
    return lp_selection(p, q, k, lp_tokens, tail_classes).acceptance(p)


def accept_sir(p: torch.Tensor, q_top: torch.Tensor, k: int) -> float:
    """khisti_sir's self-normalised IS pick with k i.i.d. draws from ``q_top`` (top-M q): sum min(p, r), exact."""
    return float(torch.minimum(p.double(), is_selection_law(p, q_top, k)).sum())


def accept_rsd(p: torch.Tensor, q: torch.Tensor, k: int, trials: int, generator: torch.Generator) -> float:
    """RSD's recursive rule over k distinct draws from q without replacement (Gumbel top-k): the shipped
    ``Sampling._recursive``, ``trials`` times; the fraction of trials that accepted a draft."""
    rule = Sampling(sampling_processors(1.0), generator)
    log_q, support = q.double().log(), int((q > 0).sum())
    accepted = 0
    for _ in range(trials):
        drawn = torch.topk(log_q + gumbel(q.shape, generator), min(k, support)).indices.tolist()  # as methods/rsd.py
        tokens = [0] + drawn                                       # node 0 is the root, children 1..k
        child, _ = rule._recursive(p, q, list(range(1, len(tokens))), tokens)
        accepted += child is not None
    return accepted / trials


def node_acceptance(p: torch.Tensor, q: torch.Tensor, ks: list[int], top_m: int, trials: int,
                    generator: torch.Generator, lp_tokens: int = 5, tail_classes: int = 3) -> dict[str, list[float]]:
    """{rule: [P(accept) for k in ks]} at one node (p, q float32 [V])."""
    q_top = truncate_top_m(q, top_m)  # the top-M q methods/khisti_sir.py draws from
    return {"specinfer": [accept_specinfer(p, q, k) for k in ks],
            "spectr": [accept_kseq(p, q, k) for k in ks],
            "khisti": [accept_khisti(p, q, k, lp_tokens, tail_classes) for k in ks],
            "khisti_sir": [accept_sir(p, q_top, k) for k in ks],
            "rsd": [accept_rsd(p, q, k, trials, generator) for k in ks],
            "optimal": [optimal_acceptance_bound(p, q, k) for k in ks]}


# ---------------------------------------------------------------- pairs along sampled text
@torch.inference_mode()
def sample_text(model, prompt: list[int], new_tokens: int, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator, stops: frozenset[int]) -> list[int]:
    """The target's own continuation of ``prompt``, sampled token by token under the given settings."""
    from transformers import DynamicCache

    cache, ids, out = DynamicCache(config=model.config), torch.tensor([prompt], device=model.device), []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1:]
        token = int(torch.multinomial(processed_probs(logits.cpu(), temperature, top_k, top_p)[0], 1,
                                      generator=generator))
        out.append(token)
        if token in stops:
            break
        ids = torch.tensor([[token]], device=model.device)
    return out


@torch.inference_mode()
def pairs_along(model, drafter, prompt: list[int], continuation: list[int], temperature: float, top_k: int,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, q) float32 [n, V] before each continuation token, teacher-forced on prompt + continuation."""
    ids = prompt + continuation
    rows = slice(len(prompt) - 1, len(ids) - 1)
    target_logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, rows].float().cpu()
    draft_logits = drafter.teacher_forced(ids)[rows].cpu()
    return (processed_probs(target_logits, temperature, top_k, top_p),
            processed_probs(draft_logits, temperature, top_k, top_p))


# ---------------------------------------------------------------- summary
def clustered_mean(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """Mean over pairs and its standard error with each text as one cluster (pairs along a text correlate)."""
    ids = np.unique(clusters)
    return float(values.mean()), clustered_ratio_se([values[clusters == c].sum() for c in ids],
                                                    [(clusters == c).sum() for c in ids])


def summarize(rates: dict[str, np.ndarray], clusters: np.ndarray, ks: list[int]) -> list[dict]:
    """Rows per K: each rule's mean acceptance +- SE, and the papers' orderings as paired differences with z."""
    rows = []
    for i, k in enumerate(ks):
        row = {"K": k}
        for rule in [rule for rule in RULES if rule in rates]:
            row[rule], row[f"{rule} se"] = clustered_mean(rates[rule][:, i], clusters)
        for hi, lo in [(hi, lo) for hi, lo in PAIRS if hi in rates and lo in rates]:
            diff, se = clustered_mean(rates[hi][:, i] - rates[lo][:, i], clusters)
            row[f"{hi}-{lo}"], row[f"z {hi}-{lo}"] = diff, diff / se if se and se > 0 else math.nan
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    """Sample texts with the target, teacher-force target and drafter along them, and report every rule's
    token-level acceptance vs K on the same (p, q) pairs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from specdec.drafters import build_drafter
    from specdec.models import load_model
    from specdec.running.prompts import PromptBuilder, stop_ids
    from specdec.running.results import write_report
    from tasks import load_questions

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model config name")
    parser.add_argument("--drafter", default="kangaroo", help="a conf/drafter config name")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench task")
    parser.add_argument("--new-tokens", type=int, default=64, help="sampled tokens per prompt (= pairs)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-m", type=int, default=10, help="khisti_sir's draft alphabet (methods/khisti_sir.py)")
    parser.add_argument("--lp-tokens", type=int, default=5, help="khisti's single LP tokens s (methods/khisti.py)")
    parser.add_argument("--tail-classes", type=int, default=3, help="khisti's tail runs (methods/khisti.py)")
    parser.add_argument("--trials", type=int, default=16, help="RSD Monte Carlo trials per pair and K (~5 ms each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench/token_acceptance.json")
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        raise SystemExit("error: token-level acceptance is a sampling quantity: use --temperature > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    conf = PROJECT_ROOT / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"drafter={args.drafter}"])
    cpu = torch.device("cpu")
    model, tok = load_model(cfg.model.path, cpu, torch.float32)
    drafter = build_drafter(OmegaConf.to_container(cfg.drafter, resolve=True), model, tok, model.config.vocab_size)
    stops, builder = stop_ids(tok, model.generation_config), PromptBuilder(tok)
    generator = torch.Generator().manual_seed(args.seed)
    rates: dict[str, list[list[float]]] = {rule: [] for rule in RULES}
    clusters, tasks = [], []
    questions = list(load_questions(per_category=args.per_category))
    for text, question in enumerate(tqdm(questions, desc="texts")):
        prompt = builder.ids(question["turns"][:1], [])
        continuation = sample_text(model, prompt, args.new_tokens, args.temperature, args.top_k, args.top_p,
                                   generator, stops)
        p_rows, q_rows = pairs_along(model, drafter, prompt, continuation, args.temperature, args.top_k, args.top_p)
        for p, q in zip(p_rows, q_rows):
            for rule, values in node_acceptance(p, q, ks, args.top_m, args.trials, generator, args.lp_tokens,
                                                args.tail_classes).items():
                rates[rule].append(values)
            clusters.append(text)
            tasks.append(question["task"])
    arrays = {rule: np.array(values) for rule, values in rates.items()}
    rows = summarize(arrays, np.array(clusters), ks)
    report = {"model": args.model, "drafter": args.drafter, "temperature": args.temperature, "top_k": args.top_k,
              "top_p": args.top_p, "top_m": args.top_m, "lp_tokens": args.lp_tokens,
              "tail_classes": args.tail_classes, "rsd_trials": args.trials, "seed": args.seed,
              "texts": len(questions), "pairs": len(clusters), "ks": ks, "rows": rows,
              "per_task": {task: {rule: arrays[rule][np.array(tasks) == task].mean(0).tolist() for rule in RULES}
                           for task in dict.fromkeys(tasks)}}
    write_report(args.out, report, rows, floatfmt=".4f")
    print(f"{len(clusters)} (p, q) pairs along {len(questions)} sampled texts -> {args.out}")
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
