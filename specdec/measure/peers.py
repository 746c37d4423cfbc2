"""A peer on the same weights: llama.cpp beside our harness on the embedded GGUF (issue 13).

Four systems on the six Spec-Bench prompts (first question of each task, first turn, our chat
template, so every system sees the same prompt ids), greedy, interleaved prompt by prompt with the
order rotated so a shared machine's noise hits all alike:

* ``llama.cpp``      - ``llama_cpp.Llama.generate`` (llama-cpp-python 0.3.36), plain decoding;
* ``llama.cpp+pld``  - the same with ``LlamaPromptLookupDecoding`` as its draft model;
* ``ours ar``        - our decode loop, a root-only tree per step (``conf/method/ar.yaml``);
* ``ours pld``       - our ``methods/pld.py`` (``conf/method/pld.yaml``).

Both prompt-lookup drafters take ``num_pred_tokens`` and ``max_ngram_size`` from
``conf/method/pld.yaml`` (10 and 3: transformers' / Spec-Bench's 10 draft tokens; llama.cpp's own
default n-gram size would be 2), so the two families draft alike.

The weights differ in precision: llama.cpp runs the Q4_1 file as is (its kernels also quantise
activations), we run the dequantised fp32 copy. Raw tokens/s across families are therefore not
comparable; each family's own ratio (its PLD over its plain decoding) is.

What is timed: every generation starts from an empty cache. The prefill (the prompt minus its last
token, which is what our loop's ``Target.prefill`` does; llama.cpp is made to do the same with
``Llama.eval`` and then reuses that prefix inside ``generate``) is timed apart; "decode" is the
rest, from scoring the prompt's last token to the last new token (every new token, the first
included). Stopping as our loop: up to and including the first stop id, at most ``max_new_tokens``.

    python -m specdec.measure.peers --max-new-tokens 64 --rounds 1 --threads 1     # make bench-peers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from specdec import EMBEDDED_MODEL
from specdec.errors import UserError, print_error
from specdec.measure.harness import interleave, method_config, our_generate, save_report, task_turns
from specdec.models import embedded_gguf, load_model, torch_threads, vocab_size
from specdec.running.prompts import PromptBuilder, stop_ids
from specdec.verify.decode import Stopwatch
from specdec.verify.proposer import MethodEnv, build_proposer
from specdec.verify.target import Target
# system -> (family, the family's plain system it is compared with)
SYSTEMS = {"llama.cpp": ("llama.cpp", "llama.cpp"), "llama.cpp+pld": ("llama.cpp", "llama.cpp"),
           "ours ar": ("ours", "ours ar"), "ours pld": ("ours", "ours ar")}
INSTALL_HINT = "llama-cpp-python is not installed; the peers benchmark needs it: pip install -e '.[peers]'"


def require_llama_cpp():
    """(``Llama``, ``LlamaPromptLookupDecoding``), or a ``UserError`` naming the extra to install."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return Llama, LlamaPromptLookupDecoding


@dataclass
class Run:
    """One timed generation."""

    output_ids: list[int]
    prefill_s: float  # the prompt minus its last token
    decode_s: float   # the last prompt token onwards, up to the last new token


def llama_generate(llm, prompt_ids: list[int], max_new_tokens: int, stops: frozenset[int]) -> Run:
    """Greedy llama.cpp generation from an empty cache; prefill of ``prompt_ids[:-1]`` timed apart."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids[:-1])  # clears the KV cache first (eval removes everything past n_tokens = 0)
    prefilled = time.perf_counter()
    out: list[int] = []
    # generate() finds prompt_ids[:-1] cached and evaluates only the last prompt token (then drafts, if any).
    # temp=0 -> llama.cpp's greedy sampler; repeat_penalty=1 -> no penalty.
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if token in stops or len(out) >= max_new_tokens:
            break
    return Run(out, prefilled - start, time.perf_counter() - prefilled)


def ours_generate(target, proposer, prompt_ids: list[int], max_new_tokens: int, stops: frozenset[int],
                  clock) -> Run:
    """Our decode loop (``specdec.verify.decode.generate``), greedy."""
    gen = our_generate(target, proposer, prompt_ids, max_new_tokens, stops, clock)
    return Run(gen.output_ids, gen.prefill_time, gen.wall_time - gen.prefill_time)


def first_divergence(a: list[int], b: list[int]) -> Optional[int]:
    """None if ``a == b``, else the first index where they differ (the shorter length if one is a prefix)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(rows: list[dict]) -> list[dict]:
    """Per system: mean decode and end-to-end tokens/s over runs (Spec-Bench's mean of per-question rates),
    the speedup over its family's plain system (ratio of those means), and on how many runs its output ids
    equal that plain system's on the same run. ``rows[i]["runs"][system]`` = ``asdict(Run)``."""
    def rate(run: dict, with_prefill: bool) -> float:
        return len(run["output_ids"]) / (run["decode_s"] + (run["prefill_s"] if with_prefill else 0.0))

    decode = {s: statistics.mean(rate(r["runs"][s], False) for r in rows) for s in SYSTEMS}
    table = []
    for system, (family, plain) in SYSTEMS.items():
        same = [first_divergence(r["runs"][system]["output_ids"], r["runs"][plain]["output_ids"]) is None
                for r in rows]
        table.append({"system": system, "family": family,
                      "decode_tokens_per_s": decode[system],
                      "e2e_tokens_per_s": statistics.mean(rate(r["runs"][system], True) for r in rows),
                      "speedup_vs_own_plain": decode[system] / decode[plain],
                      "equals_own_plain": f"{sum(same)}/{len(same)}",
                      "mean_new_tokens": statistics.mean(len(r["runs"][system]["output_ids"]) for r in rows)})
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="an embedded: GGUF spec (both families read it)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and llama.cpp threads")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the six prompts")
    parser.add_argument("--backend", default="auto", help="our target back end (specdec.backends)")
    parser.add_argument("--out", default="runs/bench/peers.json")
    args = parser.parse_args(argv)
    try:
        report = bench(args)
    except UserError as err:
        return print_error(err)
    import pandas as pd

    print(pd.DataFrame(report["table"]).to_markdown(index=False, floatfmt=".3f"))
    print(f"{report['threads']} thread(s), {args.max_new_tokens} new tokens, {len(report['rows'])} runs; "
          f"decode = from the last prompt token on; llama.cpp runs Q4_1, ours fp32 -> {args.out}")
    return 0


def bench(args) -> dict:
    Llama, LlamaPromptLookupDecoding = require_llama_cpp()  # fail before any weights are read
    if not args.model.startswith("embedded:"):
        raise UserError(f"--model must be an embedded: GGUF spec (llama.cpp reads the GGUF file), not {args.model!r}")
    with torch_threads(args.threads):
        return _bench(args, Llama, LlamaPromptLookupDecoding)


def _bench(args, Llama, LlamaPromptLookupDecoding) -> dict:
    """``bench`` with llama.cpp's classes at hand and our threads set."""
    cpu = torch.device("cpu")
    model, tok = load_model(args.model, cpu, torch.float32, backend=args.backend)
    builder, stops, clock = PromptBuilder(tok), stop_ids(tok, model.generation_config), Stopwatch(cpu)
    questions = task_turns()
    prompts = [builder.ids(q, []) for q in questions]

    cfgs = {m: method_config(m) for m in ("ar", "pld")}
    env = MethodEnv(vocab_size(model), cpu, tok, model=model)
    target, ar, pld = Target(model), build_proposer(cfgs["ar"], env), build_proposer(cfgs["pld"], env)
    gguf = str(embedded_gguf(args.model))
    n_ctx = max(map(len, prompts)) + args.max_new_tokens + cfgs["pld"]["num_pred_tokens"] + 16
    llama_kw = dict(model_path=gguf, n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    llm_plain = Llama(**llama_kw)
    # A draft model turns on llama-cpp-python's per-token logits, but its score buffer is sized by the
    # constructor's logits_all (n_batch rows otherwise): prompts over 512 tokens overflow it (0.3.36).
    llm_pld = Llama(**llama_kw, logits_all=True, draft_model=LlamaPromptLookupDecoding(
        max_ngram_size=cfgs["pld"]["max_ngram_size"], num_pred_tokens=cfgs["pld"]["num_pred_tokens"]))
    # The same prompt ids reach llama.cpp: check that its tokenizer agrees on the chat text.
    texts = [tok.apply_chat_template(builder.messages(q, []), tokenize=False, add_generation_prompt=True)
             for q in questions]
    tokenizer_agrees = [llm_plain.tokenize(t.encode(), add_bos=False, special=True) == p
                        for t, p in zip(texts, prompts)]

    systems = {
        "llama.cpp": lambda p, n: llama_generate(llm_plain, p, n, stops),
        "llama.cpp+pld": lambda p, n: llama_generate(llm_pld, p, n, stops),
        "ours ar": lambda p, n: ours_generate(target, ar, p, n, stops, clock),
        "ours pld": lambda p, n: ours_generate(target, pld, p, n, stops, clock),
    }
    assert list(systems) == list(SYSTEMS)
    for run in systems.values():  # warm-up, untimed
        run(prompts[0], 8)
    timed = {name: (lambda prompt, run=run: asdict(run(prompt, args.max_new_tokens))) for name, run in systems.items()}
    rows = []
    for row in interleave(timed, prompts, args.rounds, "llama.cpp vs ours"):
        runs, prompt = row["runs"], prompts[row["prompt"]]
        ids = {name: run["output_ids"] for name, run in runs.items()}
        rows.append({"prompt": row["prompt"], "prompt_tokens": len(prompt), "order": row["order"], "runs": runs,
                     # None = identical ids; else the first position where they differ
                     "llama_pld_vs_plain_first_divergence": first_divergence(ids["llama.cpp+pld"], ids["llama.cpp"]),
                     "ours_pld_vs_ar_first_divergence": first_divergence(ids["ours pld"], ids["ours ar"]),
                     "llama_plain_vs_ours_ar_first_divergence": first_divergence(ids["llama.cpp"], ids["ours ar"])})
    import llama_cpp

    report = {"table": summarize(rows), "threads": torch.get_num_threads(), "max_new_tokens": args.max_new_tokens,
              "rounds": args.rounds, "gguf": Path(gguf).name, "llama_cpp_python": llama_cpp.__version__,
              "our_backend": getattr(model, "specdec_backend", "eager"),
              "weights": {"llama.cpp": "Q4_1 GGUF as is", "ours": "dequantised fp32 copy of the GGUF"},
              "pld": {k: cfgs["pld"][k] for k in ("num_pred_tokens", "max_ngram_size")},
              "timed": "decode_s: from scoring the last prompt token to the last new token; prefill_s: the prompt "
                       "minus its last token; each generation from an empty cache",
              "llama_tokenizer_agrees": tokenizer_agrees, "rows": rows}
    save_report(args.out, report)
    return report


if __name__ == "__main__":
    sys.exit(main())
