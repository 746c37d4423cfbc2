"""The Spec-Bench table: speedup per task, MAT, tokens/s and overall speedup, mean ± std over repeats.

Formulas (Spec-Bench ``evaluation/speed.py``; docs/spec_bench.md §4), on ids counted by the verifier:

* per question: ``speed_q = Σ_turns new_tokens / Σ_turns wall_time`` (turns pooled into one rate);
* per task: ``tokens_per_s = mean_q speed_q`` (unweighted), the baseline likewise;
* ``speedup = tokens_per_s / baseline_tokens_per_s`` (a ratio of averages, not an average of ratios);
* ``mat = mean`` of the accept lengths of all steps of all questions pooled (long answers weigh more);
* ``overall`` applies the same formulas to all questions, not the mean of the six tasks;
* repeats (``get_mean_speedup``): mean and sample std (ddof=1) over runs of tokens/s, baseline tokens/s
  and speedup; MAT pooled over all runs.

    from analysis import load_runs, run_stats, speedup_vs, summarize, spec_bench_table, export_table
    df = load_runs("runs")
    stats = run_stats(df)                                   # paired baselines, one row per run x task
    stats = speedup_vs(df[df.method != "ar"], df[df.method == "ar"])   # or against a separate AR run
    table = spec_bench_table(summarize(stats))
    export_table(table, "runs/figures/spec_bench")          # .md, .tex, .csv
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .load import RUN_COLUMNS, SETTING_COLUMNS, knob_columns, sweep_axes

from specdec.running.report import (COMPARE_COLUMNS, TASK_ORDER, TASK_TITLES, compare_markdown,  # noqa: F401
                                    compare_table)
from tasks import TASKS


# --------------------------------------------------------------------------------------------
# Per question and per run
# --------------------------------------------------------------------------------------------

def question_stats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, question): turns summed, accept lengths as (accepted tokens, steps) counts."""
    if df.empty:
        return pd.DataFrame()
    turns = df.assign(
        accepted=df["accept_lengths"].map(sum), steps=df["accept_lengths"].map(len),
        tree_tokens=df["tree_sizes"].map(sum), tree_steps=df["tree_sizes"].map(len),
        ids=df["output_ids"].map(lambda x: x if isinstance(x, list) else None) if "output_ids" in df else None,
        host_steps=_lists(df, "proposer_times"), device_steps=_lists(df, "device_times"))
    sums = ["new_tokens", "wall_time", "prefill_time", "draft_time", "accepted", "steps", "tree_tokens",
            "tree_steps", "baseline.new_tokens", "baseline.wall_time", "baseline.prefill_time"]
    sums = [c for c in sums if c in turns]
    keys = ["run", "task", "question_id"]
    # min_count=1: a question with no paired baseline keeps NaN, not 0.
    q = turns.groupby(keys, sort=False)[sums].sum(min_count=1)
    q["category"] = turns.groupby(keys, sort=False)["category"].first()
    q["lossless"] = turns.groupby(keys, sort=False)["lossless"].first()
    if "near_tie" in turns:
        q["near_tie"] = turns.groupby(keys, sort=False)["near_tie"].first()
    q["output_ids"] = turns.groupby(keys, sort=False)["ids"].agg(list)
    for col in ("host_steps", "device_steps"):  # None when a turn of the question has no per-step list
        q[col] = turns.groupby(keys, sort=False)[col].agg(lambda v: None if any(x is None for x in v) else sum(v, []))
    if "update_time" in turns:
        q["update_time"] = turns.groupby(keys, sort=False)["update_time"].sum(min_count=1)
    q = q.reset_index()
    q["speed"] = q["new_tokens"] / q["wall_time"]
    q["baseline_speed"] = q["baseline.new_tokens"] / q["baseline.wall_time"] if "baseline.wall_time" in q \
        else math.nan
    return q


def _lists(df: pd.DataFrame, col: str) -> pd.Series:
    """``df[col]`` with anything but a list (NaN: an older record) as None."""
    if col not in df:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    return df[col].map(lambda x: x if isinstance(x, list) else None)


def _proposer_ms(q: pd.DataFrame, steps: int) -> dict:
    """Host ms of propose + observe per verify step (mean, p95 over the pooled steps) and the device work's
    ms per step, as ``specdec.running.results``; records without per-step lists: the mean from the turn sums."""
    if len(q) and q["host_steps"].map(lambda x: x is not None).all():
        host = np.array([t for x in q["host_steps"] for t in x])
        device = [t for x in q["device_steps"] for t in x]
        if len(host):
            return {"proposer_ms_mean": 1e3 * host.mean(), "proposer_ms_p95": 1e3 * np.percentile(host, 95),
                    "device_ms_mean": 1e3 * float(np.mean(device))}
    spent = q["draft_time"].sum() + (q["update_time"].sum() if "update_time" in q else 0.0)
    return {"proposer_ms_mean": 1e3 * spent / steps if steps else math.nan, "proposer_ms_p95": math.nan,
            "device_ms_mean": math.nan}


def _task_figures(q: pd.DataFrame) -> dict:
    """Spec-Bench figures of one task (or overall) from its per-question rows."""
    steps, wall = q["steps"].sum(), q["wall_time"].sum()
    base = q["baseline_speed"]
    tokens_per_s = q["speed"].mean()
    baseline_tps = base.mean() if base.notna().all() and len(base) else math.nan
    lossless = q["lossless"].astype(float)
    return {
        "n": len(q),
        "tokens_per_s": tokens_per_s,
        "baseline_tokens_per_s": baseline_tps,
        "speedup": tokens_per_s / baseline_tps,
        "mat": q["accepted"].sum() / steps if steps else math.nan,
        "mat_per_question": (q["accepted"] / q["steps"]).mean(),
        "accepted": int(q["accepted"].sum()), "steps": int(steps),
        "new_tokens": int(q["new_tokens"].sum()), "wall_time": wall,
        "total_tokens_per_s": q["new_tokens"].sum() / wall,
        "draft_share": q["draft_time"].sum() / wall,
        "draft_ms_per_step": 1000 * q["draft_time"].sum() / steps if steps else math.nan,
        "mean_tree_size": q["tree_tokens"].sum() / q["tree_steps"].sum() if q["tree_steps"].sum() else math.nan,
        "lossless": lossless.mean() if lossless.notna().any() else math.nan,
        "near_tie": q["near_tie"].astype(float).mean() if "near_tie" in q and q["near_tie"].notna().any() else math.nan,
        **_proposer_ms(q, steps),
    }


def task_slices(frame: pd.DataFrame, run: str):
    """``((run, task), rows)`` for each Spec-Bench task present in ``frame``, then ``overall``."""
    for task in TASKS:
        part = frame[frame["task"] == task]
        if len(part):
            yield (run, task), part
    yield (run, "overall"), frame


def _run_columns(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in RUN_COLUMNS if c in df] + knob_columns(df)
    return df.drop_duplicates("run")[cols]


def run_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per run x task (the 6 + overall) Spec-Bench figures against each run's paired baseline.

    Runs without a paired baseline get NaN speedup (use ``speedup_vs`` for them)."""
    q = question_stats(df)
    if q.empty:
        return pd.DataFrame()
    rows = [{"run": run, "task": task, **_task_figures(part)}
            for run, run_q in q.groupby("run", sort=False) for (run, task), part in task_slices(run_q, run)]
    stats = pd.DataFrame(rows).merge(_run_columns(df), on="run", how="left")
    stats["baseline_source"] = "paired"
    stats["baseline_run"] = stats["run"]
    return _order_tasks(stats)


def _order_tasks(stats: pd.DataFrame) -> pd.DataFrame:
    stats["task"] = pd.Categorical(stats["task"], categories=list(TASK_ORDER), ordered=True)
    return stats.sort_values(["run", "task"]).reset_index(drop=True)


def speedup_vs(runs: pd.DataFrame, baseline_runs: pd.DataFrame,
               match: Sequence[str] = ("model", "device", "dtype", "backend")) -> pd.DataFrame:
    """Per run x task figures with the speedup taken against separate baseline (AR) runs.

    Each method run is compared with the baseline runs that agree on ``match``. As in Spec-Bench's
    ``get_mean_speedup``, when a setting has as many runs as its matching baseline has, run k (in time
    order) is paired with baseline run k; otherwise every method run is compared with the mean of the
    baseline runs' tokens/s. Both sides are restricted to the questions they have in common.
    ``lossless`` is the fraction of common questions whose output ids equal the (first) baseline run's
    (greedy runs only; NaN under sampling).
    """
    mq, bq = question_stats(runs), question_stats(baseline_runs)
    if mq.empty or bq.empty:
        return pd.DataFrame()
    run_cols, base_cols = _run_columns(runs), _run_columns(baseline_runs)
    key = setting_key(runs)
    rows = []
    for _, group in run_cols.groupby(key, dropna=False, sort=False):
        group = group.assign(start=group["run"].map(runs.groupby("run")["tstamp"].min())).sort_values(["start", "run"])
        cand = base_cols
        for col in match:
            cand = cand[cand[col].astype(str) == str(group[col].iloc[0])]
        if cand.empty:
            warnings.warn(f"no baseline run matches {dict(group.iloc[0][list(match)])}; speedup left out")
            continue
        cand = cand.assign(start=cand["run"].map(baseline_runs.groupby("run")["tstamp"].min())).sort_values(["start", "run"])
        paired = len(cand) == len(group)
        for k, run in enumerate(group["run"]):
            bases = [cand["run"].iloc[k]] if paired else list(cand["run"])
            rows += _vs_rows(mq[mq["run"] == run], [bq[bq["run"] == b] for b in bases], run, bases,
                             greedy=not (group["temperature"].iloc[0] or 0) > 0)
    if not rows:
        return pd.DataFrame()
    stats = pd.DataFrame(rows).merge(run_cols, on="run", how="left")
    stats["baseline_source"] = "separate"
    return _order_tasks(stats)


def _vs_rows(mq: pd.DataFrame, bqs: list[pd.DataFrame], run: str, bases: list[str], greedy: bool) -> list[dict]:
    common = set(zip(mq["task"], mq["question_id"]))
    for b in bqs:
        common &= set(zip(b["task"], b["question_id"]))
    if len(common) < len(mq):
        warnings.warn(f"{run}: {len(mq) - len(common)} questions missing from the baseline run(s), left out")
    keep = lambda frame: frame[[pair in common for pair in zip(frame["task"], frame["question_id"])]]  # noqa: E731
    mq, bqs = keep(mq), [keep(b) for b in bqs]
    rows = []
    for (_, task), part in task_slices(mq, run):
        figures = _task_figures(part.assign(baseline_speed=math.nan))
        base_parts = [b if task == "overall" else b[b["task"] == task] for b in bqs]
        figures["baseline_tokens_per_s"] = float(np.mean([b["speed"].mean() for b in base_parts]))
        figures["speedup"] = figures["tokens_per_s"] / figures["baseline_tokens_per_s"]
        ref = base_parts[0].set_index("question_id")["output_ids"]
        same = [ids == ref.get(qid) for qid, ids in zip(part["question_id"], part["output_ids"])]
        figures["lossless"] = float(np.mean(same)) if len(same) and greedy else math.nan  # ids equal only if greedy
        rows.append({"run": run, "task": task, "baseline_run": ";".join(bases), **figures})
    return rows


def speedup_stats(df: pd.DataFrame,
                  match: Sequence[str] = ("model", "device", "dtype", "backend")) -> pd.DataFrame:
    """Per run x task figures for every run that has a speedup: against its paired baseline when it
    has one, else against the AR runs (``proposer == "ar"``; their own figures) matching on ``match``.
    Runs with neither are left out with a warning."""
    if df.empty:
        return pd.DataFrame()
    has_pair = df.groupby("run")["baseline.wall_time"].transform(lambda s: s.notna().all())
    parts = [run_stats(df[has_pair])] if has_pair.any() else []
    unpaired = df[~has_pair & (df["proposer"] != "ar")]
    ar_runs = df[df["proposer"] == "ar"]  # an AR run's own figures serve, paired or not
    if not unpaired.empty and ar_runs.empty:
        warnings.warn(f"{unpaired['run'].nunique()} run(s) have neither a paired baseline nor a separate AR run "
                      f"(method=ar, same {'/'.join(match)}); left out")
    elif not unpaired.empty:
        parts.append(speedup_vs(unpaired, ar_runs, match))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def split_ablations(stats: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(main, ablations): a Hydra multirun whose jobs vary a knob of one method (``method.tree_nodes=8,16,32``)
    or the drafter's exit layer (``drafter.exit_layer=1,2,4``) is an ablation, shown as a sweep figure; every
    other run (single runs, and sweeps over methods such as ``method=recycle,pld``) belongs in the main table."""
    if stats.empty or "sweep" not in stats:
        return stats, stats.iloc[:0]
    knobs = sweep_axes(stats)
    ablation = set()
    for (_, _), g in stats[stats["sweep"].notna()].groupby(["sweep", "method"]):
        if any(g[k].astype(str).nunique(dropna=False) > 1 for k in knobs):
            ablation.update(g["run"])
    is_ablation = stats["run"].isin(ablation)
    return stats[~is_ablation], stats[is_ablation]


# --------------------------------------------------------------------------------------------
# Over repeated runs
# --------------------------------------------------------------------------------------------

def setting_key(frame: pd.DataFrame) -> list[str]:
    """Columns that identify one setting: model, method, knobs, task set, device, dtype, sampling..."""
    cols = [c for c in SETTING_COLUMNS if c in frame] + knob_columns(frame)
    return cols + (["baseline_source"] if "baseline_source" in frame else [])


def add_labels(frame: pd.DataFrame, key: Sequence[str] | None = None) -> pd.DataFrame:
    """A ``label`` column: the method name, plus the settings that differ between rows of that method,
    e.g. ``recycle (tree_nodes=8)``."""
    key = [c for c in (key or setting_key(frame)) if c != "method"]
    labels = pd.Series(frame["method"].astype(str), index=frame.index)
    for method, rows in frame.groupby("method", sort=False):
        varying = [c for c in key if rows[c].astype(str).nunique(dropna=False) > 1]
        if varying:
            labels[rows.index] = [f"{method} (" + ", ".join(f"{c.removeprefix('method.')}={_fmt_value(v)}"
                                                             for c, v in zip(varying, vals)) + ")"
                                  for vals in rows[varying].itertuples(index=False)]
    return frame.assign(label=labels)


def _fmt_value(v) -> str:
    if pd.isna(v):  # a knob left null (YAML ``null``), beside runs that set it
        return "none"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def summarize(stats: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean ± std (ddof=1) over the runs of each setting, per task. MAT is pooled over all runs' steps.

    ``by``: the columns that define a setting (default ``setting_key``: model, method, knobs, device,
    dtype, temperature, ... ; seeds and timestamps are what repeats differ in)."""
    if stats.empty:
        return pd.DataFrame()
    key = list(by or setting_key(stats))
    out = []
    for vals, g in stats.groupby(key + ["task"], dropna=False, sort=False, observed=True):
        row = dict(zip(key + ["task"], vals))
        row.update({
            "runs": g["run"].nunique(), "n": int(g["n"].max()),
            "mat": g["accepted"].sum() / g["steps"].sum() if g["steps"].sum() else math.nan,
            "mat_std": g["mat"].std(ddof=1),
            "run_list": ";".join(g["run"]), "baseline_runs": ";".join(dict.fromkeys(g["baseline_run"])),
        })
        for col in ("tokens_per_s", "baseline_tokens_per_s", "speedup", "mat_per_question", "total_tokens_per_s",
                    "draft_share", "draft_ms_per_step", "mean_tree_size", "lossless", "proposer_ms_mean",
                    "proposer_ms_p95", "device_ms_mean"):
            row[col] = g[col].mean()
            row[f"{col}_std"] = g[col].std(ddof=1) if len(g) > 1 else math.nan
        out.append(row)
    summary = add_labels(pd.DataFrame(out), key)
    summary["task"] = pd.Categorical(summary["task"], categories=list(TASK_ORDER), ordered=True)
    return summary.sort_values(["label", "task"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The table and its export
# --------------------------------------------------------------------------------------------

def _pm(mean: float, std: float, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def spec_bench_table(summary: pd.DataFrame, digits: int = 2, tasks: Iterable[str] = TASKS) -> pd.DataFrame:
    """Methods x (6 task speedups, MAT, tokens/s, AR tokens/s, overall speedup, proposer ms mean and p95, runs,
    baseline) as strings ``mean ± std`` (std only with repeats); rows sorted by overall speedup (best first)."""
    if "runs" not in summary:
        summary = summarize(summary)
    if summary.empty:
        return pd.DataFrame()
    rows = []
    for label, g in summary.groupby("label", sort=False):
        by_task = g.set_index(g["task"].astype(str))
        cell = lambda task, col, d=digits: _pm(by_task[col].get(task), by_task[f"{col}_std"].get(task), d)  # noqa: E731
        row = {"method": label}
        row.update({TASK_TITLES[t]: cell(t, "speedup") for t in tasks})
        row["MAT"] = _pm(by_task["mat"].get("overall"), None, digits)
        row["tokens/s"] = cell("overall", "tokens_per_s", 1)
        row["AR tokens/s"] = cell("overall", "baseline_tokens_per_s", 1)
        row["Overall"] = cell("overall", "speedup")
        row["proposer ms"] = cell("overall", "proposer_ms_mean", 3)  # host ms per step (specdec.running.results)
        row["proposer ms p95"] = cell("overall", "proposer_ms_p95", 3)
        row["runs"] = int(by_task["runs"].get("overall", 0))
        if "baseline_source" in g:
            row["baseline"] = g["baseline_source"].iloc[0]  # paired, or separate (an AR run)
        row["_sort"] = by_task["speedup"].get("overall", math.nan)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("_sort", ascending=False, na_position="last")
    return table.drop(columns="_sort").set_index("method")


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs tabular (no jinja2 needed); ``±`` becomes ``$\\pm$``."""
    def esc(s) -> str:
        s = str(s)
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_"),
                     ("{", r"\{"), ("}", r"\}")):
            s = s.replace(a, b)
        return s.replace("±", r"$\pm$").replace("–", "--")

    head = [table.index.name or ""] + list(table.columns)
    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(v) for v in [idx, *row]) + r" \\" for idx, row in zip(table.index, table.values)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", *lines, r"\caption{" + esc(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def export_table(table: pd.DataFrame, stem: str | Path, caption: str | None = None) -> list[Path]:
    """Write ``stem.md``, ``stem.tex`` and ``stem.csv``; return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".md"), stem.with_suffix(".tex"), stem.with_suffix(".csv")]
    paths[0].write_text(table.to_markdown() + "\n")
    paths[1].write_text(to_latex(table, caption))
    table.to_csv(paths[2])
    return paths


def check_against_summaries(stats: pd.DataFrame, summaries: pd.DataFrame, rtol: float = 1e-6) -> pd.DataFrame:
    """Rows where run.py's summary.json disagrees with the figures recomputed here (should be empty)."""
    if stats.empty or summaries.empty:
        return pd.DataFrame()
    cols = ["tokens_per_s", "baseline_tokens_per_s", "speedup", "mat", "mat_per_question", "lossless"]
    merged = stats.assign(task=stats["task"].astype(str)).merge(summaries, on=["run", "task"], suffixes=("", "_summary"))
    bad = []
    for col in cols:
        if f"{col}_summary" not in merged:
            continue
        a, b = merged[col].astype(float), merged[f"{col}_summary"].astype(float)
        diff = ~(np.isclose(a, b, rtol=rtol) | (a.isna() & b.isna()))
        for _, r in merged[diff].iterrows():
            bad.append({"run": r["run"], "task": r["task"], "figure": col, "recomputed": r[col],
                        "summary": r[f"{col}_summary"]})
    return pd.DataFrame(bad)
