"""Result files of a run dir: ``answers.jsonl`` (one Spec-Bench answer record per question, appended and
flushed as each question finishes) and ``summary.json`` (per-task aggregates computed exactly as
Spec-Bench's ``evaluation/speed.py``; docs/spec_bench.md §4).

Aggregates, per task and ``overall``:
  tokens_per_s          mean over questions of (Σ_turns new_tokens / Σ_turns wall_time)
  baseline_tokens_per_s the same on the paired autoregressive baseline
  speedup               tokens_per_s / baseline_tokens_per_s  (ratio of the averages)
  mat                   mean accept length pooled over every verify step of every question
  lossless              fraction of questions whose output ids equal the baseline's (greedy: *identical*)
  near_tie, diverged    fraction whose first divergence sits at a top-2 logit gap below the dtype's threshold
                        (numerics: expected in fp16/bf16, ``specdec.models.NEAR_TIE_GAP``), and the rest (a bug)
  turns_past_context    turns that committed positions past the model's trained length (``context_policy``),
  turns_stopped_at_context  and turns that ``context_policy=stop`` ended there
  draft_share           Σ draft time / Σ wall time
  proposer_share        Σ (draft + update) time / Σ step time (prefill excluded): the method's own cost
  proposer_ms_mean      host milliseconds of propose + observe per verify step, pooled over all steps, minus the
  proposer_ms_p95       work a method attributes to the device (``specdec.verify.decode.device_work``); and its 95th
                        percentile. Records written before the per-step lists existed: the mean from the
                        per-turn sums, p95 None
  device_ms_mean        milliseconds per step of that device work (Token Recycling's top-k), None before
  decode_speedup, verify_ratio, bound, efficiency
                        where the speedup goes, with a paired baseline (``cost_split``): the speedup without
                        the prefill, one verify's cost in AR steps, the speedup if drafting and bookkeeping were
                        free, and the share of that bound the run kept
Keys are snake_case and form a contract that ``analysis/`` reads (SCHEMA_VERSION; the per-step lists
``step_draft_time``, ``step_update_time``, ``step_device_time`` are optional extras of version 1).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from specdec.verify.decode import Generation

SCHEMA_VERSION = 1
def turn_figures(gens: list[Generation]) -> dict:
    """Per-turn lists in Spec-Bench's layout; per-step lists flattened over turns."""
    return {
        "decoding_steps": [g.steps for g in gens],
        "new_tokens": [g.new_tokens for g in gens],
        "wall_time": [g.wall_time for g in gens],
        "accept_lengths": [a for g in gens for a in g.accept_lengths],
        "tree_sizes": [t for g in gens for t in g.tree_sizes],
        "output_ids": [g.output_ids for g in gens],
        "prefill_time": [g.prefill_time for g in gens],
        "draft_time": [g.draft_time for g in gens],
        "verify_time": [g.verify_time for g in gens],
        "commit_time": [g.commit_time for g in gens],
        "update_time": [g.update_time for g in gens],
        "step_draft_time": [round(t, 7) for g in gens for t in g.step_draft_times],
        "step_update_time": [round(t, 7) for g in gens for t in g.step_update_times],
        "step_device_time": [round(t, 7) for g in gens for t in g.step_device_times],
        "stop_reason": [g.stop_reason for g in gens],
        "prompt_tokens": [g.prompt_tokens for g in gens],
        "past_context": [g.past_context for g in gens],   # committed positions past the trained length (context_policy)
    }


def answer_record(question: dict, model_id: str, texts: list[str], gens: list[Generation],
                  baseline: Optional[list[Generation]] = None, lossless: Optional[dict] = None,
                  order: Optional[str] = None) -> dict:
    record = {
        "question_id": question["question_id"], "category": question["category"], "task": question["task"],
        "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "tstamp": time.time(),
        "choices": [{"index": 0, "turns": texts, **turn_figures(gens)}],
    }
    if baseline is not None:
        figures = turn_figures(baseline)
        for key in ("tree_sizes", "step_draft_time", "step_update_time", "step_device_time", "prompt_tokens"):
            figures.pop(key)
        record["baseline"] = figures
        record["order"] = order
    if lossless is not None:
        record["lossless"] = lossless
    return record


class AnswerFile:
    """Append-only ``answers.jsonl``; a rerun into the same dir skips finished questions."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = self._read_complete()

    def _read_complete(self) -> list[dict]:
        """Whole records only: a line cut off by an interrupted run is dropped (and rewritten later)."""
        if not self.path.exists():
            return []
        records, good_bytes = [], 0
        with self.path.open("rb") as fh:
            for raw in fh:
                try:
                    records.append(json.loads(raw))
                except json.JSONDecodeError:
                    break
                if not raw.endswith(b"\n"):
                    records.pop()
                    break
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as fh:
                fh.truncate(good_bytes)
        return records

    @property
    def done(self) -> set:
        return {r["question_id"] for r in self.records}

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _rate(figures: dict) -> float:
    wall = sum(figures["wall_time"])
    return sum(figures["new_tokens"]) / wall if wall > 0 else 0.0


def aggregate(records: list[dict]) -> dict:
    """Spec-Bench aggregates over a set of answer records (one task or all)."""
    choices = [r["choices"][0] for r in records]
    steps = [a for c in choices for a in c["accept_lengths"]]
    out = {
        "n": len(records),
        "tokens_per_s": _mean(_rate(c) for c in choices),
        "mat": _mean(steps),
        "mat_per_question": _mean(_mean(c["accept_lengths"]) for c in choices if c["accept_lengths"]),
        "new_tokens": sum(sum(c["new_tokens"]) for c in choices),
        "wall_time": sum(sum(c["wall_time"]) for c in choices),
        "total_tokens_per_s": None, "draft_share": None, "proposer_share": None,
    }
    if out["wall_time"] > 0:
        out["total_tokens_per_s"] = out["new_tokens"] / out["wall_time"]
        out["draft_share"] = sum(sum(c["draft_time"]) for c in choices) / out["wall_time"]
    step_time = sum(sum(c.get(k, [0.0])) for c in choices for k in ("draft_time", "verify_time", "commit_time", "update_time"))
    if step_time > 0:  # the method's own cost (drafting + learning) as a share of the decode steps
        out["proposer_share"] = sum(sum(c["draft_time"]) + sum(c.get("update_time", [0.0])) for c in choices) / step_time
    out.update(proposer_ms(choices))
    baselines = [r["baseline"] for r in records if "baseline" in r]
    if baselines and len(baselines) == len(records):
        out["baseline_tokens_per_s"] = _mean(_rate(b) for b in baselines)
        out["baseline_new_tokens"] = sum(sum(b["new_tokens"]) for b in baselines)
        out["baseline_wall_time"] = sum(sum(b["wall_time"]) for b in baselines)
        out["speedup"] = out["tokens_per_s"] / out["baseline_tokens_per_s"] if out["baseline_tokens_per_s"] else None
        out.update(_cost_split(choices, baselines))
    checks = [r["lossless"] for r in records if "lossless" in r]
    if checks and len(checks) == len(records):
        out["lossless"] = sum(c["identical"] for c in checks) / len(checks)
        out["near_tie"] = sum(bool(c.get("near_tie")) for c in checks) / len(checks)
        out["diverged"] = 1.0 - out["lossless"] - out["near_tie"]
    past = [p for c in choices for p in c.get("past_context", [])]
    out["turns_past_context"] = sum(p > 0 for p in past)
    out["turns_stopped_at_context"] = sum(r == "context" for c in choices for r in c.get("stop_reason", []))
    return out


def cost_split(mat: float, tokens: float, steps: float, decode_s: float, verify_s: float,
               base_tokens: float, base_steps: float, base_decode_s: float, base_verify_s: float) -> dict:
    """The in-situ cost model of a run paired with AR (no latency profile needed): the speedup is
    MAT x t(1) / (t(N) + drafting + bookkeeping), so

    * ``verify_ratio`` = the method's verify seconds per step / AR's: t(N)/t(1) as the run saw it;
    * ``bound`` = MAT / verify_ratio: the speedup if drafting, commits and bookkeeping were free;
    * ``decode_speedup`` = tokens/s over the decode (prefill removed on both sides), the part the model describes;
    * ``efficiency`` = decode_speedup / bound: the share of the bound that the proposer and the harness keep.

    ``decode_s`` is wall minus prefill seconds; None for a figure whose denominator is zero."""
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    verify_ratio = ratio(ratio(verify_s, steps) or 0.0, ratio(base_verify_s, base_steps))
    decode_speedup = ratio(ratio(tokens, decode_s) or 0.0, ratio(base_tokens, base_decode_s))
    bound = ratio(mat, verify_ratio)
    return {"decode_speedup": decode_speedup, "verify_ratio": verify_ratio, "bound": bound,
            "efficiency": ratio(decode_speedup, bound) if decode_speedup is not None else None}


def _cost_split(choices: list[dict], baselines: list[dict]) -> dict:
    """``cost_split`` of answer records (method ``choices`` and their paired ``baselines``)."""
    total = lambda figs, key: sum(sum(f.get(key) or [0.0]) for f in figs)  # noqa: E731
    decode = lambda figs: total(figs, "wall_time") - total(figs, "prefill_time")  # noqa: E731
    count = lambda figs: sum(len(f.get("accept_lengths", [])) for f in figs)  # noqa: E731 - verify steps
    steps = count(choices)
    mat = total(choices, "accept_lengths") / steps if steps else 0.0
    return cost_split(mat, total(choices, "new_tokens"), steps, decode(choices), total(choices, "verify_time"),
                      total(baselines, "new_tokens"), count(baselines), decode(baselines),
                      total(baselines, "verify_time"))


def proposer_ms(choices: list[dict]) -> dict:
    """``proposer_ms_mean`` / ``_p95`` and ``device_ms_mean`` per verify step (module docstring)."""
    if choices and all("step_draft_time" in c for c in choices):
        host = np.array([d + u for c in choices for d, u in zip(c["step_draft_time"], c["step_update_time"])])
        device = [t for c in choices for t in c["step_device_time"]]
        if len(host):
            return {"proposer_ms_mean": 1e3 * float(host.mean()),
                    "proposer_ms_p95": 1e3 * float(np.percentile(host, 95)),
                    "device_ms_mean": 1e3 * float(np.mean(device))}
    steps = sum(len(c["accept_lengths"]) for c in choices)
    spent = sum(sum(c.get("draft_time", [])) + sum(c.get("update_time", [])) for c in choices)
    return {"proposer_ms_mean": 1e3 * spent / steps if steps else None, "proposer_ms_p95": None, "device_ms_mean": None}


def summarize(records: list[dict], task_order: Iterable[str]) -> dict:
    """``{task: aggregates}`` for every task present (in ``task_order``) plus ``overall``."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    ordered = [t for t in task_order if t in by_task] + sorted(set(by_task) - set(task_order))
    tasks = {t: aggregate(by_task[t]) for t in ordered}
    if records:
        tasks["overall"] = aggregate(records)
    return tasks


def format_table(tasks: dict) -> str:
    """Console table: one row per task."""
    cols = [("task", None), ("n", "{:d}"), ("mat", "{:.2f}"), ("tokens_per_s", "{:.2f}"),
            ("baseline_tokens_per_s", "{:.2f}"), ("speedup", "{:.3f}x"), ("lossless", "{:.0%}"), ("near_tie", "{:.0%}"),
            ("bound", "{:.3f}x"), ("efficiency", "{:.0%}"), ("proposer_share", "{:.1%}"),
            ("proposer_ms_mean", "{:.3f}"), ("proposer_ms_p95", "{:.3f}"), ("device_ms_mean", "{:.3f}")]
    header = ["task", "n", "MAT", "tok/s", "AR tok/s", "speedup", "identical", "near tie", "bound", "eff.", "proposer",
              "prop. ms", "p95 ms", "device ms"]
    rows = []
    for name, agg in tasks.items():
        row = [name]
        for key, fmt in cols[1:]:
            value = agg.get(key)
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def clustered_ratio_se(numerators: Iterable[float], denominators: Iterable[float]) -> float:
    """Standard error of the pooled ratio sum(numerators) / sum(denominators) when each (numerator,
    denominator) pair is one cluster of correlated items (delta method), e.g. accepted tokens / verify steps
    per turn. NaN with fewer than two clusters."""
    a, s = list(map(float, numerators)), list(map(float, denominators))
    n = len(a)
    if n < 2:
        return math.nan
    ratio = sum(a) / sum(s)
    return math.sqrt(n / (n - 1) * sum((x - ratio * y) ** 2 for x, y in zip(a, s))) / sum(s)


def write_report(path: str | Path, report: dict, rows: list[dict], floatfmt: str = ".3f") -> None:
    """A benchmark's report: JSON at ``path`` (its folder made), and ``rows`` printed as a markdown table."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, report)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=floatfmt))


def write_json(path: Path, obj: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
