"""Paper figures (matplotlib, Agg): each function saves ``<out_dir>/<name>.png`` and ``.pdf`` and
returns the two paths.

    from analysis import load_runs, run_stats, summarize, figures
    df = load_runs("runs"); summary = summarize(run_stats(df))
    figures.speedup_bars(summary, "runs/figures")          # the Spec-Bench chart
    figures.knob_sweep(summary, "method.tree_nodes", "runs/figures")   # Token Recycling ablation
    figures.accept_length_hist(df, "runs/figures")
    figures.speedup_vs_mat(summary, "runs/figures")
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from specdec.running.report import TASK_ORDER, TASK_TITLES, save, speedup_bars  # noqa: E402,F401
from specdec.running.report import error_bars as _err  # noqa: E402

from .tables import _fmt_value, add_labels  # noqa: E402

def knob_sweep(summary: pd.DataFrame, knob: str, out_dir: str | Path, name: str | None = None,
               task: str = "overall", group: str = "method") -> list[Path]:
    """MAT and speedup (two panels) vs a swept knob (e.g. ``method.tree_nodes``), one line per ``group``;
    the MAT panel alone when no run has a speedup (``baseline=none`` and no AR run).

    ``summary``: ``summarize(...)`` rows (or per-run stats) holding the knob column."""
    data = summary[(summary["task"].astype(str) == task) & summary[knob].notna()].copy()
    data[knob] = pd.to_numeric(data[knob], errors="coerce")
    data = data[data[knob].notna()].sort_values(knob)
    has_speedup = bool("speedup" in data and data["speedup"].notna().any())
    fig, axes = plt.subplots(1, 2 if has_speedup else 1, figsize=(7.5 if has_speedup else 3.9, 3.0), squeeze=False)
    ax_mat, ax_speed = axes[0, 0], axes[0, -1] if has_speedup else None
    for key, rows in data.groupby(group, sort=False):
        std = rows["mat_std"] if "mat_std" in rows else pd.Series(0.0, index=rows.index)
        ax_mat.errorbar(rows[knob], rows["mat"], yerr=_err(std), marker="o", capsize=2, label=str(key))
        if has_speedup and rows["speedup"].notna().any():
            sstd = rows["speedup_std"] if "speedup_std" in rows else pd.Series(0.0, index=rows.index)
            ax_speed.errorbar(rows[knob], rows["speedup"], yerr=_err(sstd), marker="o", capsize=2, label=str(key))
    short = knob.removeprefix("method.").removeprefix("drafter.")
    for ax, ylabel in ((ax_mat, "MAT (mean accepted tokens)"), (ax_speed, "speedup vs AR"))[:1 + has_speedup]:
        ax.set_xlabel(short)
        ax.set_ylabel(ylabel)
        if data[knob].max() / max(data[knob].min(), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        values = sorted(data[knob].unique())
        ax.set_xticks(values, [_fmt_value(v) for v in values])
        ax.minorticks_off()
    if has_speedup:
        ax_speed.axhline(1.0, color="black", lw=0.8, ls="--")
    ax_mat.legend(fontsize=7, frameon=False)
    fig.suptitle(f"{TASK_TITLES.get(task, task)}: MAT{' and speedup' if has_speedup else ''} vs {short}")
    return save(fig, out_dir, name or f"sweep_{short}")


def accept_length_hist(df: pd.DataFrame, out_dir: str | Path, name: str = "accept_lengths",
                       max_len: int | None = None) -> list[Path]:
    """Share of verify steps committing k tokens, per method (one panel each), pooled over runs."""
    if "label" not in df:
        df = add_labels(df)
    labels = sorted(df["label"].unique())
    pooled = {lab: np.concatenate([np.asarray(a, int) for a in df.loc[df["label"] == lab, "accept_lengths"]] or
                                  [np.zeros(0, int)]) for lab in labels}
    top = max_len or max([int(v.max()) for v in pooled.values() if len(v)] + [1])
    cols = min(3, len(labels)) or 1
    rows = int(np.ceil(len(labels) / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows), squeeze=False, sharex=True)
    bins = np.arange(0.5, top + 1.5)
    for ax, lab in zip(axes.flat, labels):
        vals = pooled[lab]
        if len(vals):
            ax.hist(np.minimum(vals, top), bins=bins, weights=np.full(len(vals), 1 / len(vals)), color="C0")
            ax.axvline(vals.mean(), color="C3", lw=1)
        ax.set_title(f"{lab}\nMAT {vals.mean():.2f}, {len(vals)} steps" if len(vals) else lab, fontsize=8)
        ax.set_xlabel("tokens committed per step")
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of steps")
    fig.tight_layout()
    return save(fig, out_dir, name)


def speedup_vs_mat(summary: pd.DataFrame, out_dir: str | Path, name: str = "speedup_vs_mat",
                   tasks: Iterable[str] = ("overall",)) -> list[Path]:
    """Scatter of speedup against MAT, one point per method (and task); y = x marks free verification."""
    tasks = list(tasks)
    data = summary[summary["task"].astype(str).isin(tasks) & summary["speedup"].notna()]
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    markers = dict(zip(TASK_ORDER, "sovD^<o"))
    for i, (label, rows) in enumerate(data.groupby("label", sort=True)):
        for _, r in rows.iterrows():
            ax.errorbar(r["mat"], r["speedup"], yerr=r.get("speedup_std") if pd.notna(r.get("speedup_std")) else None,
                        marker=markers.get(str(r["task"]), "o"), color=f"C{i % 10}", capsize=2,
                        label=label if r["task"] == rows["task"].iloc[0] else None, ls="none")
    hi = max([1.5] + list(data["mat"]) + list(data["speedup"]))
    ax.plot([1, hi], [1, hi], color="gray", lw=0.8, ls=":", label="speedup = MAT")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("MAT (mean accepted tokens per step)")
    ax.set_ylabel("speedup vs AR")
    ax.legend(fontsize=7, frameon=False)
    return save(fig, out_dir, name)


def latency_profiles(profiles: Sequence, out_dir: str | Path, name: str = "latency_profiles") -> list[Path]:
    """t(N) / t(1) vs N for each stored ``Profile`` (the verify cost in AR steps)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for prof in profiles:
        rel = prof.relative()
        meta = prof.meta
        ax.plot(rel.index, rel.values, marker="o", ms=3,
                label=f"{prof.name} ({meta.get('dtype')}, {meta.get('threads')} thr, t(1)={1000 * prof.seconds[0]:.0f} ms)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64, 128], ["1", "2", "4", "8", "16", "32", "64", "128"])
    ax.minorticks_off()
    ax.set_xlabel("tokens per forward N")
    ax.set_ylabel("t(N) / t(1)")
    ax.legend(fontsize=7, frameon=False)
    return save(fig, out_dir, name)


def predicted_vs_measured(check: pd.DataFrame, out_dir: str | Path, name: str = "cost_model") -> list[Path]:
    """Cost-model prediction (x) vs measured Spec-Bench speedup (y), per run and task."""
    data = check[check["speedup"].notna()]
    fig, ax = plt.subplots(figsize=(4.0, 3.4))
    for i, (label, rows) in enumerate(data.groupby("label", sort=True)):
        overall = rows["task"].astype(str) == "overall"
        ax.scatter(rows.loc[~overall, "predicted"], rows.loc[~overall, "speedup"], s=10, color=f"C{i % 10}", alpha=0.5)
        ax.scatter(rows.loc[overall, "predicted"], rows.loc[overall, "speedup"], s=40, color=f"C{i % 10}",
                   marker="D", label=label)
    vals = list(data["predicted"]) + list(data["speedup"]) + [1.0]
    lo, hi = min(vals) * 0.9, max(vals) * 1.1
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("predicted speedup (cost model)")
    ax.set_ylabel("measured speedup")
    ax.set_title(f"profile {data['profile'].iloc[0]}" if len(data) else "cost model", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    return save(fig, out_dir, name)
