"""Cross-run analysis: load run dirs, Spec-Bench tables, paper figures, a latency cost model.

    from analysis import load_runs, run_stats, speedup_vs, summarize, spec_bench_table, export_table
    df = load_runs("runs")                               # one row per question-turn
    table = spec_bench_table(summarize(run_stats(df)))   # paired baselines, mean ± std over repeats

Rebuild every table and figure from the run dirs under runs/ (what `make figures` runs):

    python -m analysis --runs runs --out runs/figures

Measure a latency profile and predict speedups from MAT: ``python -m analysis.latency --help``.
The notebooks in notebooks/ call these functions.
"""

from .load import find_run_dirs, knob_columns, load_runs, load_summaries
from .tables import (TASK_ORDER, TASKS, add_labels, check_against_summaries, export_table, question_stats, run_stats,
                     spec_bench_table, speedup_stats, speedup_vs, split_ablations, summarize)

__all__ = ["Profile", "TASKS", "TASK_ORDER", "add_labels", "check_against_summaries", "check_predictions",
           "default_run_root", "export_table", "find_run_dirs", "knob_columns", "load_runs", "load_summaries",
           "predict_speedup", "prediction_error", "question_stats", "run_stats", "spec_bench_table",
           "speedup_stats", "speedup_vs", "split_ablations", "summarize"]


_LATENCY = ("Profile", "check_predictions", "predict_speedup", "prediction_error")


def __getattr__(name: str):
    """The cost model's names load on first use, so ``python -m analysis.latency`` runs a module not yet imported
    (no runpy warning)."""
    if name in _LATENCY:
        from . import latency

        return getattr(latency, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_run_root(repo_root=".") -> str:
    """``runs/`` when it holds any run dir, else the test fixtures (for the notebooks)."""
    from pathlib import Path

    runs = Path(repo_root) / "runs"
    if runs.is_dir() and find_run_dirs(runs):
        return str(runs)
    return str(Path(repo_root) / "tests" / "fixtures" / "runs")
