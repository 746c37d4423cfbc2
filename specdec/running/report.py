"""The report of a comparison (``specdec.running.compare``, what ``make run`` prints): one row per (method,
task) from the runs' summaries as a markdown / CSV table, and the speedup bar chart. analysis/ reads the same
tables and draws every figure in the same style (``save``), so each of these is defined here once."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tasks import REPORT_ORDER  # noqa: E402

TASK_ORDER = REPORT_ORDER + ("overall",)
TASK_TITLES = {"mt_bench": "MT-bench", "translation": "Translation", "summarization": "Summarization",
               "qa": "QA", "math_reasoning": "Math", "rag": "RAG", "mbpp": "MBPP", "overall": "Overall"}
# summary.json figure -> (column title, format) of the comparison table
COMPARE_COLUMNS = {"n": ("n", "{:.0f}"), "mat": ("MAT", "{:.2f}"), "tokens_per_s": ("tokens/s", "{:.2f}"),
                   "baseline_tokens_per_s": ("AR tokens/s", "{:.2f}"), "speedup": ("speedup", "{:.3f}×"),
                   "lossless": ("identical", "{:.0%}"), "near_tie": ("near tie", "{:.0%}"), "bound": ("bound", "{:.3f}×"),
                   "efficiency": ("efficiency", "{:.0%}"), "proposer_ms_mean": ("proposer ms", "{:.3f}"),
                   "proposer_ms_p95": ("proposer ms p95", "{:.3f}")}

plt.rcParams.update({"figure.dpi": 120, "savefig.bbox": "tight", "axes.spines.top": False,
                     "axes.spines.right": False, "font.size": 9})


def summary_rows(summary: dict, run_dir: str | Path) -> list[dict]:
    """One row per task of a run's ``summary.json`` (dict): run, method, task and the task's figures."""
    return [{"run": str(run_dir), "method": summary.get("method"), "task": task, **figures}
            for task, figures in summary.get("tasks", {}).items()]


def compare_table(summaries: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (method, task) — the 6 tasks present, then overall — from ``summary_rows`` rows (the
    figures run.py / specdec.running.compare wrote to summary.json). Numeric; NaN where a run has no such figure
    (AR alone has no speedup; ``proposer_ms_*`` absent from older summaries). ``methods`` fixes the order."""
    if summaries.empty:
        return pd.DataFrame(columns=["method", "task", *COMPARE_COLUMNS])
    order = list(methods or dict.fromkeys(summaries["method"]))
    data = summaries[summaries["method"].isin(order)].reindex(columns=["method", "task", *COMPARE_COLUMNS])
    data = data.assign(method=pd.Categorical(data["method"], order, ordered=True),
                       task=pd.Categorical(data["task"], list(TASK_ORDER), ordered=True))
    return data.sort_values(["method", "task"]).astype({"method": str, "task": str}).reset_index(drop=True)


def compare_markdown(table: pd.DataFrame) -> str:
    """``compare_table`` as a markdown table; "-" for a figure a run does not have."""
    cells = {"method": table["method"], "task": table["task"].map(lambda t: TASK_TITLES.get(t, t))}
    for col, (title, fmt) in COMPARE_COLUMNS.items():
        cells[title] = table[col].map(lambda v, fmt=fmt: "-" if pd.isna(v) else fmt.format(v))
    return pd.DataFrame(cells).to_markdown(index=False, disable_numparse=True,
                                           colalign=["left", "left"] + ["right"] * len(COMPARE_COLUMNS))


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Save ``fig`` as PNG and PDF under ``out_dir``; close it; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path)
    plt.close(fig)
    return paths


def error_bars(values: pd.Series) -> np.ndarray | None:
    """Error-bar half-widths (missing = 0), or None when there are none to draw."""
    values = values.fillna(0).to_numpy()
    return values if values.any() else None


def speedup_bars(summary: pd.DataFrame, out_dir: str | Path, name: str = "speedup_by_task",
                 tasks: Sequence[str] = TASK_ORDER, title: str | None = None) -> list[Path]:
    """Grouped bars: speedup per task (x) for each method (bar), error bars = std over repeats."""
    data = summary[summary["task"].astype(str).isin(tasks) & summary["speedup"].notna()]
    tasks = [t for t in tasks if t in set(data["task"].astype(str))]
    labels = list(dict.fromkeys(data.sort_values("label")["label"]))
    fig, ax = plt.subplots(figsize=(max(1.0 + 1.05 * len(tasks), 1.0 + 0.35 * len(tasks) * max(1, len(labels))), 3.2))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(tasks))
    for i, label in enumerate(labels):
        rows = data[data["label"] == label].set_index(data[data["label"] == label]["task"].astype(str)).reindex(tasks)
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, rows["speedup"], width, yerr=error_bars(rows["speedup_std"]),
               label=label, capsize=2)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(x, [TASK_TITLES.get(t, t) for t in tasks])
    ax.set_ylabel("speedup vs AR")
    ax.set_title(title or "Speedup per Spec-Bench task")
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(labels) > 4 else 1)
    return save(fig, out_dir, name)


def compare_report(out_dir: Path, summaries: dict[str, dict], caption: str) -> list[Path]:
    """The comparison's table (``compare.md``, ``compare.csv``) and bar chart under ``out_dir`` from the
    ``summary.json`` dicts of its methods (in table order); prints the table; returns the paths."""
    rows = [row for name, summary in summaries.items() for row in summary_rows(summary, out_dir / name)]
    table = compare_table(pd.DataFrame(rows), list(summaries))
    markdown = compare_markdown(table)
    paths = [out_dir / "compare.md", out_dir / "compare.csv"]
    paths[0].write_text(f"{caption}\n\n{markdown}\n", encoding="utf-8")
    table.to_csv(paths[1], index=False)
    bars = table.rename(columns={"method": "label"}).assign(speedup_std=float("nan"))
    paths += speedup_bars(bars, out_dir, title=f"Speedup vs AR per task ({caption})")
    print(f"\n{caption}\n{markdown}\n\ntable: {paths[0]}\n       {paths[1]}\nchart: {paths[2]}")
    return paths
