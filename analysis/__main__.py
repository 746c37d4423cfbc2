"""Rebuild every table and figure from the run dirs under ``runs/`` into ``runs/figures/`` (``make figures``).

    python -m analysis [runs] [--out runs/figures]

What it writes (kinds of runs that are absent are skipped with a printed note):

* ``<setting>/spec_bench.{md,tex,csv}``: the Spec-Bench table per (task set, model, device, dtype, back end,
  threads, temperature); paired baselines, else the speedup against a separate AR run of the same model,
  device, dtype and back end; ``summary.csv`` holds every number; figures ``speedup_by_task``,
  ``speedup_vs_mat``, ``accept_lengths`` (PNG + PDF);
* ``<setting>/mat_by_task.{md,tex,csv}``: MAT per Spec-Bench task (the back end, top_p and top_k are named in
  ``<setting>`` when they are not eager / 1.0 / 0, e.g. ``..._float32_onednn_1thr_temp0.7_top_p0.95``);
* ``sweeps/<multirun>/``: table, ``mat_by_task`` and ``sweep_<knob>`` (MAT and speedup vs every numeric knob
  that varies; the MAT panel alone for runs without a speedup, e.g. ``baseline=none``);
* ``multidraft/``: MAT vs drafts K and length L of sps/specinfer/spectr/rsd sampled without a baseline
  (``make bench-multidraft``): ``multidraft``, ``ordering`` (.md/.csv), figure ``mat_vs_drafts``
  (``analysis.bench_figures``); ``token_acceptance`` (table + figure) from ``runs/bench/token_acceptance.json``
  (``make bench-token-acceptance``: every rule's acceptance vs K on the same (p, q) pairs);
* ``dynamic_trees/``: ``calibration`` (figure + CSV: empirical acceptance vs node value) and
  ``dynamic_trees.{md,csv}`` (tokens per verify, proposer ms per step, auto budget) of eagle2/opt_tree/dyspec;
* ``training/``: ``training_curves`` and ``training.{md,csv}`` from ``runs/train/<head>/summary.json``;
* ``cost_model/<profile>/``: cost-model predictions vs the measured speedups for every latency profile
  in ``runs/latency/*.json``, and ``latency_profiles`` (t(N)/t(1) of every profile).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import pandas as pd

from . import bench_figures, figures
from .latency import Profile, check_predictions, prediction_error
from .load import find_run_dirs, load_runs, load_summaries, sweep_axes
from .tables import (add_labels, check_against_summaries, export_table, spec_bench_table, speedup_stats,
                     split_ablations, summarize)

GROUP = ["task_set", "model", "device", "dtype", "backend", "threads", "temperature", "top_p", "top_k"]


def note(msg: str) -> None:
    print(f"note: {msg}")


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def all_stats(df: pd.DataFrame) -> pd.DataFrame:
    """``speedup_stats`` with its warnings printed as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = speedup_stats(df)
    for w in caught:
        note(str(w.message))
    return stats


def main_tables(df: pd.DataFrame, stats: pd.DataFrame, out: Path) -> list[Path]:
    written = []
    main, _ = split_ablations(stats)
    if main.empty:
        note("no single (non-multirun) runs with a speedup: Spec-Bench table skipped")
        return written
    for vals, group in main.groupby(GROUP, dropna=False, sort=True):
        task_set, model, device, dtype, backend, threads, temperature, top_p, top_k = vals
        # the back end, top_p and top_k named only when they differ from the old default / act, so eager greedy
        # settings keep their old directory names
        name = slug(task_set, model, device, dtype, *([backend] if backend != "eager" else []), f"{threads}thr",
                    f"temp{temperature}",
                    *([f"top_p{top_p}"] if top_p not in (None, 1, 1.0) and pd.notna(top_p) else []),
                    *([f"top_k{top_k}"] if top_k not in (None, 0) and pd.notna(top_k) else []))
        d = out / name
        summary = summarize(group)
        table = spec_bench_table(summary)
        caption = f"Speedup over autoregressive decoding, {', '.join(f'{k}={v}' for k, v in zip(GROUP, vals))}"
        written += export_table(table, d / "spec_bench", caption)
        mat = bench_figures.mat_table(summary)
        written += export_table(mat, d / "mat_by_task", f"MAT per task, {name}")
        summary.to_csv(d / "summary.csv", index=False)
        written.append(d / "summary.csv")
        title = f"{model} on {device} ({dtype}, {backend}, threads={threads})"
        written += figures.speedup_bars(summary, d, title=title)
        written += figures.speedup_vs_mat(summary, d)
        rows = df[df["run"].isin(group["run"]) & (df["proposer"] != "ar")]
        if rows.empty:
            note(f"{name}: only AR runs, accept-length histogram skipped")
        else:
            written += figures.accept_length_hist(add_labels(rows), d)
        print(f"\n{name}\n{table.to_markdown()}\n\n{name}: MAT per task\n{mat.to_markdown()}")
    return written


def sweep_figures(stats: pd.DataFrame, out: Path) -> list[Path]:
    written = []
    _, sweeps = split_ablations(stats)
    if sweeps.empty:
        note("no Hydra multirun over a method knob (e.g. -m method.tree_nodes=8,16,32): knob-sweep figures skipped")
        return written
    for sweep, group in sweeps.groupby("sweep", sort=True):
        d = out / "sweeps" / Path(sweep).name
        summary = summarize(group)
        written += export_table(spec_bench_table(summary), d / "spec_bench")
        written += bench_figures.sweep_mat_tables(group, d)
        varying = [k for k in sweep_axes(group) if group[k].astype(str).nunique(dropna=False) > 1
                   and group[k].map(lambda v: not isinstance(v, bool)).all()  # true/false is not an axis
                   and pd.to_numeric(group[k], errors="coerce").notna().all()]
        if not varying:
            note(f"{sweep}: no numeric method knob varies; sweep figure skipped")
        for knob in varying:
            written += figures.knob_sweep(summary, knob, d)
    return written


def cost_model(df: pd.DataFrame, stats: pd.DataFrame, run_root: Path, out: Path) -> list[Path]:
    paths = sorted((run_root / "latency").glob("*.json"))
    if not paths:
        note(f"no latency profile in {run_root / 'latency'} (python -m analysis.latency profile): cost model skipped")
        return []
    profiles = [Profile.load(p) for p in paths]
    written = figures.latency_profiles(profiles, out / "cost_model")
    method_rows = df[df["proposer"] != "ar"]
    if method_rows.empty or stats.empty:
        note("no method runs with a measured speedup: cost-model check skipped")
        return written
    for prof in profiles:
        check = check_predictions(add_labels(method_rows), prof, stats)
        if check.empty:
            continue
        d = out / "cost_model" / prof.name
        d.mkdir(parents=True, exist_ok=True)
        check.to_csv(d / "predictions.csv", index=False)
        overall = check[check["task"] == "overall"][["label", "run", "mat", "mean_tree_size", "draft_ms_per_step",
                                                     "predicted", "speedup", "error", "decode_speedup", "decode_error",
                                                     "verify_ratio", "bound", "efficiency"]]
        (d / "predictions.md").write_text(overall.to_markdown(index=False, floatfmt=".3f") + "\n")
        written += [d / "predictions.csv", d / "predictions.md"]
        written += figures.predicted_vs_measured(check, d)
        err = prediction_error(check)
        print(f"\ncost model on profile {prof.name} ({prof.meta.get('device')}, {prof.meta.get('dtype')}, "
              f"{prof.meta.get('threads')} threads): {err}")
    return written


def build(run_root: str | Path = "runs", out: str | Path | None = None) -> list[Path]:
    """Everything; returns the written paths."""
    run_root = Path(run_root)
    out = Path(out) if out is not None else run_root / "figures"
    dirs = [d for d in find_run_dirs(run_root) if out.resolve() not in d.resolve().parents]
    if not dirs:
        note(f"no run dirs (answers.jsonl) under {run_root}: tables and run figures skipped")
        df, stats = pd.DataFrame(), pd.DataFrame()
    else:
        df = load_runs(dirs)
        print(f"loaded {df['run'].nunique()} run dirs, {len(df)} question-turns from {run_root}")
        unfinished = sorted(df.loc[~df["complete"].astype(bool), "run"].unique())
        if unfinished:
            note(f"{len(unfinished)} run(s) without summary.json (unfinished or interrupted), used with the questions "
                 f"they hold: " + ", ".join(unfinished))
        stats = all_stats(df)
        bad = check_against_summaries(stats[stats["baseline_source"] == "paired"] if not stats.empty else stats,
                                      load_summaries(dirs))
        if not bad.empty:
            note(f"summary.json disagrees with the recomputed figures in {len(bad)} place(s):\n{bad.to_string()}")
    written = []
    if not stats.empty:
        out.mkdir(parents=True, exist_ok=True)
        stats.to_csv(out / "run_stats.csv", index=False)
        written.append(out / "run_stats.csv")
        written += main_tables(df, stats, out)
    elif dirs:
        note("no run has a speedup (no paired baseline and no AR run): Spec-Bench tables skipped")
    mat_only = bench_figures.mat_only_stats(df, stats)  # baseline=none runs: MAT still shown in their sweeps
    if dirs:
        written += sweep_figures(pd.concat([s for s in (stats, mat_only) if not s.empty]) if not mat_only.empty
                                 else stats, out)
        written += bench_figures.multidraft_outputs(df, out) + bench_figures.dyntree_outputs(df, out)
    written += bench_figures.training_outputs(run_root, out) + bench_figures.token_acceptance_outputs(run_root, out)
    written += cost_model(df, stats, run_root, out) if not df.empty else \
        (figures.latency_profiles([Profile.load(p) for p in sorted((run_root / "latency").glob("*.json"))],
                                  out / "cost_model") if list((run_root / "latency").glob("*.json")) else [])
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", default=None, help="root of the run dirs (default runs)")
    parser.add_argument("--runs", dest="runs_opt", default=None, help="the same, as an option")
    parser.add_argument("--out", default=None, help="output dir (default <runs>/figures)")
    args = parser.parse_args(argv)
    written = build(args.runs or args.runs_opt or "runs", args.out)
    print(f"\nwrote {len(written)} files" + "".join(f"\n  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
