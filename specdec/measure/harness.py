"""The benchmark harness that every measuring tool shares (``bench``, ``peers``, ``backends``): the prompts, a
method's config, our greedy loop and transformers' ``generate`` timed alike, the interleaving and the report.

Speed is only ever a ratio of runs made side by side in one process: per prompt every compared system runs
once, in an order that rotates by one from prompt to prompt, so a noisy machine's drift hits all alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from specdec import PROJECT_ROOT
from specdec.running.prompts import PromptBuilder
from specdec.running.results import write_json
from specdec.running.runner import rotated
from specdec.verify.acceptance import Greedy
from specdec.verify.decode import Generation, Stopwatch, generate


def method_config(name: str) -> dict:
    """``conf/method/<name>.yaml`` as a plain dict (the knobs a benchmark reads and builds its proposer from)."""
    return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf" / "method" / f"{name}.yaml"), resolve=True)


def task_turns(per_category: int = 1) -> list[list[str]]:
    """The first user turn of the first ``per_category`` questions of each Spec-Bench task."""
    from tasks import load_questions

    return [q["turns"][:1] for q in load_questions(per_category=per_category)]


def task_prompts(tokenizer, per_category: int = 1) -> list[list[int]]:
    """Turn-1 prompt ids (chat template applied) of ``task_turns``: the six prompts every benchmark uses."""
    builder = PromptBuilder(tokenizer)
    return [builder.ids(turns, []) for turns in task_turns(per_category)]


def interleave(systems: dict[str, Callable], prompts: list, rounds: int, desc: str) -> list[dict]:
    """``rounds`` passes over ``prompts``; per prompt every system ``systems[name](prompt)`` once, in the
    rotated order. Returns one row per prompt run: {"prompt": index, "order": names, "runs": {name: result}}."""
    names, rows = list(systems), []
    for i in tqdm(range(rounds * len(prompts)), desc=desc):
        order = rotated(names, i)
        prompt = prompts[i % len(prompts)]
        rows.append({"prompt": i % len(prompts), "order": order, "runs": {name: systems[name](prompt) for name in order}})
    return rows


def our_generate(target, proposer, prompt_ids: list[int], max_new_tokens: int, stops: frozenset[int],
                 clock: Stopwatch) -> Generation:
    """One greedy generation through the harness loop (``specdec.verify.decode.generate``)."""
    proposer.reset("turn")
    return generate(target, proposer, prompt_ids, max_new_tokens, stops, Greedy(), clock)


def time_generate(model, prompt_ids: list[int], max_new_tokens: int, clock: Stopwatch,
                  **generate_kwargs) -> tuple[float, list[int]]:
    """transformers' own greedy ``model.generate``: (seconds, new ids), timed by the same synchronised clock."""
    ids = torch.tensor([prompt_ids], device=model.device)
    start = clock()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    elapsed = clock() - start
    return elapsed, out[0, len(prompt_ids):].tolist()


def save_report(out: str | Path, report: dict) -> Path:
    """Write a benchmark's JSON report (parents made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    return out
