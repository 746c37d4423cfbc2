"""Tables and figures of the draft-model benchmarks (issues 10, 11, 12), called by ``python -m analysis``.

    from analysis import load_runs, bench_figures as bf
    df = load_runs("runs")
    table = bf.multidraft_table(df)            # MAT vs drafts K and length L (SpecTr paper, Fig. 2 style)
    print(bf.multidraft_ordering(table))       # K-SEQ >= SpecInfer >= SpS at equal K and L?
    bf.mat_vs_drafts(table, "runs/figures/multidraft")
    bf.calibration(bf.calibration_table(bf.dyntree_stats(df)), "runs/figures/dynamic_trees")
    bf.training_curves(bf.load_training("runs/train"), "runs/figures/training")

* ``mat_only_stats``: MAT per run and task of runs with no speedup (``baseline=none`` and no AR run),
  so that knob sweeps of such runs still get a table and the MAT panel;
* ``mat_table``: MAT per Spec-Bench task (the Spec-Bench table itself has speedups per task only);
* multi-draft (issue 10): runs of sps / specinfer / spectr / khisti / rsd sampled (temperature > 0) without a
  paired baseline, whatever their path; K drafts and length L read from each method's knobs;
* dynamic trees (issue 12): ``method_stats`` of eagle2 / opt_tree / dyspec summaries (calibration of node
  values against acceptance, tokens per verify, proposer ms per step, auto budget choices);
* training curves (issues 11, 12): the ``history`` of ``runs/train/<stem>/summary.json`` (specdec/training/train.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from specdec.running.results import clustered_ratio_se

from . import figures
from .figures import plt
from .load import run_info
from .tables import TASK_TITLES, TASKS, export_table, run_stats, summarize

K_DRAFTS = ("specinfer", "spectr", "khisti")  # K i.i.d. drafts of length L: knobs k and length
MULTIDRAFT = ("sps", *K_DRAFTS, "rsd")
DYNAMIC_TREES = ("eagle2", "opt_tree", "dyspec")
MD_KEYS = ["model", "drafter", "temperature", "top_p"]  # one multi-draft comparison per combination


def note(msg: str) -> None:
    print(f"note: {msg}")


# --------------------------------------------------------------------------------------------
# MAT without a speedup
# --------------------------------------------------------------------------------------------

def mat_only_stats(df: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """``run_stats`` rows (MAT per run x task; speedup NaN, ``baseline_source`` "none") of the non-AR runs
    that ``speedup_stats`` left out: no paired baseline and no AR run to compare with."""
    have = set(stats["run"]) if not stats.empty else set()
    rest = df[~df["run"].isin(have) & (df["proposer"] != "ar")] if not df.empty else df
    if rest.empty:
        return pd.DataFrame()
    out = run_stats(rest)
    return out.assign(baseline_source="none", baseline_run="none", speedup=math.nan)


def mat_table(summary: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """Methods (``summarize`` labels) x MAT per Spec-Bench task and overall (pooled over the steps of all
    repeats), plus the verify steps counted overall. A task a run did not cover is "–"."""
    rows = []
    for label, g in summary.groupby("label", sort=False):
        mat = g.set_index(g["task"].astype(str))["mat"]
        row = {"method": label}
        row.update({TASK_TITLES[t]: _fmt(mat.get(t), digits) for t in TASKS})
        row["Overall"] = _fmt(mat.get("overall"), digits)
        row["runs"] = int(g["runs"].max())
        rows.append(row)
    return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()


def _fmt(value, digits: int) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Multi-draft comparison (issue 10; SpecTr, Sun et al. 2023, block efficiency vs K and L)
# --------------------------------------------------------------------------------------------

def is_multidraft(runs: pd.DataFrame) -> pd.Series:
    """Rows of multi-draft comparison runs: a draft-model sampling method, temperature > 0, no baseline."""
    temp = pd.to_numeric(runs["temperature"], errors="coerce").fillna(0)
    return runs["proposer"].isin(MULTIDRAFT) & (temp > 0) & (runs["baseline_mode"].astype(str) == "none")


def drafts_and_length(run: pd.Series) -> tuple[str, int, int]:
    """(method, K, L) of one run: sps K = 1, L = gamma; specinfer / spectr / khisti K = k, L = length; RSD-C
    K = branching[0], L = len(branching); RSD-S (tree=beam) K = beam_width, L = depth."""
    get = lambda knob: run.get(f"method.{knob}")  # noqa: E731
    proposer = run["proposer"]
    if proposer == "sps":
        return "sps", 1, int(get("gamma"))
    if proposer in K_DRAFTS:
        return proposer, int(get("k")), int(get("length"))
    if get("tree") == "beam":
        return "rsd-s", int(get("beam_width")), int(get("depth"))
    branching = json.loads(get("branching")) if isinstance(get("branching"), str) else list(get("branching"))
    return "rsd", int(branching[0]), len(branching)


def mat_standard_error(turns: pd.DataFrame) -> float:
    """Standard error of the pooled MAT (a ratio: accepted tokens / steps) with each turn as one cluster -
    steps within a turn are not independent - by the delta method."""
    return clustered_ratio_se(turns["accept_lengths"].map(sum), turns["accept_lengths"].map(len))


def multidraft_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, drafter, temperature, top_p, method, K, L): MAT overall and per task, pooled over
    the steps of every run of that setting, its standard error (``mat_standard_error``), the verify steps and
    the number of runs."""
    runs = df[is_multidraft(df)] if not df.empty else df
    if runs.empty:
        return pd.DataFrame()
    stats = run_stats(runs)
    first = runs.drop_duplicates("run").set_index("run")
    mkl = {run: drafts_and_length(first.loc[run]) for run in first.index}
    stats = stats.assign(**{c: stats["run"].map(first[c]) for c in MD_KEYS if c in first},
                         method=stats["run"].map(lambda r: mkl[r][0]), K=stats["run"].map(lambda r: mkl[r][1]),
                         L=stats["run"].map(lambda r: mkl[r][2]), task=stats["task"].astype(str))
    keys = [c for c in MD_KEYS if c in stats] + ["method", "K", "L"]
    rows = []
    for vals, g in stats.groupby(keys, dropna=False, sort=True):
        pooled = g.groupby("task")[["accepted", "steps"]].sum()
        row = dict(zip(keys, vals))
        row["MAT"] = pooled.loc["overall", "accepted"] / pooled.loc["overall", "steps"]
        row["MAT se"] = mat_standard_error(runs[runs["run"].isin(set(g["run"]))])
        row.update({f"MAT {TASK_TITLES[t]}": pooled.loc[t, "accepted"] / pooled.loc[t, "steps"] if t in pooled.index
                    else math.nan for t in TASKS})
        row["steps"] = int(pooled.loc["overall", "steps"])
        row["runs"] = g["run"].nunique()
        rows.append(row)
    return pd.DataFrame(rows)


def multidraft_ordering(table: pd.DataFrame) -> pd.DataFrame:
    """For each (K, L) (and model, drafter, sampling): MAT of spectr, specinfer and sps at the same L, and
    whether the papers' ordering MAT(spectr) >= MAT(specinfer) >= MAT(sps) holds (NaN when a method is
    missing); ``violated`` names the pair that breaks it, and ``z <pair>`` is each difference over its
    standard error (a violation with z > -2 is within the noise of the runs)."""
    if table.empty:
        return pd.DataFrame()
    keys = [c for c in MD_KEYS if c in table]
    indexed = table.set_index(keys + ["method", "K", "L"])
    mat = indexed["MAT"]
    se = indexed["MAT se"] if "MAT se" in indexed else pd.Series(math.nan, index=indexed.index)
    rows = []
    for vals, g in table[table["method"].isin(["spectr", "specinfer"])].groupby(keys + ["K", "L"], dropna=False):
        setting, (k, length) = tuple(vals[:-2]), vals[-2:]
        at = {m: setting + (m, kk, length) for m, kk in (("spectr", k), ("specinfer", k), ("sps", 1))}
        spectr, specinfer, sps = (mat.get(at[m], math.nan) for m in ("spectr", "specinfer", "sps"))
        pairs = {"spectr < specinfer": spectr < specinfer, "specinfer < sps": specinfer < sps}
        z = lambda hi, lo: (mat.get(at[hi], math.nan) - mat.get(at[lo], math.nan)) / math.hypot(  # noqa: E731
            se.get(at[hi], math.nan), se.get(at[lo], math.nan))
        known = not any(math.isnan(x) for x in (spectr, specinfer, sps))
        rows.append({**dict(zip(keys, setting)), "K": k, "L": length, "spectr": spectr, "specinfer": specinfer,
                     "sps": sps, "holds": (not any(pairs.values())) if known else math.nan,
                     "violated": ", ".join(p for p, bad in pairs.items() if bad),
                     "z spectr-specinfer": z("spectr", "specinfer"), "z specinfer-sps": z("specinfer", "sps")})
    return pd.DataFrame(rows)


def mat_vs_drafts(table: pd.DataFrame, out_dir: str | Path, name: str = "mat_vs_drafts") -> list[Path]:
    """One panel per draft length L: MAT vs K (log2 axis), one line per multi-draft method, SpS as a K = 1
    marker (the SpecTr paper's block-efficiency comparison)."""
    lengths = sorted(table["L"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.4 * len(lengths), 3.0), squeeze=False, sharey=True)
    ks = sorted(table["K"].unique())
    colors = {m: f"C{i}" for i, m in enumerate(sorted(set(table["method"]) - {"sps"}))}  # one colour per method
    for ax, length in zip(axes[0], lengths):
        part = table[table["L"] == length]
        for method, rows in part[part["method"] != "sps"].groupby("method", sort=True):
            rows = rows.sort_values("K")
            ax.plot(rows["K"], rows["MAT"], marker="o", color=colors[method], label=method)
        sps = part[part["method"] == "sps"]
        if len(sps):
            ax.scatter(sps["K"], sps["MAT"], marker="*", s=120, color="black", zorder=3, label="sps")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("drafts K")
        ax.set_title(f"L = {length}")
    axes[0, 0].set_ylabel("MAT (block efficiency)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}  # every panel's
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=7, frameon=False)
    return figures.save(fig, out_dir, name)


# --------------------------------------------------------------------------------------------
# Dynamic trees (issue 12): calibration and per-run proposer figures from summary.json
# --------------------------------------------------------------------------------------------

def dyntree_stats(df: pd.DataFrame) -> list[dict]:
    """Per finished dynamic-tree run: ``method_stats`` of its summary.json plus ``run``, ``label`` (method,
    drafter, budget), ``mat`` and ``speedup`` overall (from the same summary)."""
    out = []
    for run in df.loc[df["proposer"].isin(DYNAMIC_TREES), "run"].unique() if not df.empty else []:
        path = Path(run) / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        ms = summary.get("method_stats") or {}
        if "calibration_nodes" not in ms:
            continue
        info = run_info(Path(run))
        label = f"{info['method']} ({info.get('drafter') or ms.get('drafter')}, N={ms.get('budget')})"
        overall = summary.get("tasks", {}).get("overall", {})
        out.append({**ms, "run": run, "label": label, "mat": overall.get("mat"), "speedup": overall.get("speedup")})
    return out


def calibration_table(dyn: list[dict]) -> pd.DataFrame:
    """Long table (label, bin, bin_centre, nodes, accepted, acceptance): drafted and accepted nodes per value
    bin summed over the runs of a label. A bin is ``[lo, lo + width)`` of exp(node value) = the drafter's
    cumulative probability of the node's path (methods/_dyntree.py); acceptance = accepted / nodes."""
    rows = []
    for d in dyn:
        edges = list(d["calibration_bins"])
        width = edges[1] - edges[0] if len(edges) > 1 else 1.0
        for lo, n, a in zip(edges, d["calibration_nodes"], d["calibration_accepted"]):
            rows.append({"label": d["label"], "bin": lo, "bin_centre": round(lo + width / 2, 9), "nodes": n, "accepted": a})
    if not rows:
        return pd.DataFrame()
    cal = pd.DataFrame(rows).groupby(["label", "bin", "bin_centre"], as_index=False)[["nodes", "accepted"]].sum()
    return cal.assign(acceptance=cal["accepted"] / cal["nodes"].where(cal["nodes"] > 0))


def calibration(cal: pd.DataFrame, out_dir: str | Path, name: str = "calibration") -> list[Path]:
    """Left: empirical acceptance vs bin centre of the node value, one line per label, y = x for reference
    (EAGLE-2's claim: confidence approximates acceptance). Right: nodes drafted per bin. CSV beside it."""
    fig, (ax, ax_n) = plt.subplots(1, 2, figsize=(7.5, 3.2))
    for i, (label, rows) in enumerate(cal.groupby("label", sort=True)):
        rows = rows[rows["nodes"] > 0]  # empty bins: no acceptance, and no point on a log axis
        ax.plot(rows["bin_centre"], rows["acceptance"], marker="o", color=f"C{i % 10}", label=label)
        ax_n.plot(rows["bin_centre"], rows["nodes"], marker="o", color=f"C{i % 10}")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="acceptance = value")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="node value exp(cumulative draft log-prob)",
           ylabel="empirical acceptance")
    ax_n.set(yscale="log", xlim=(0, 1), xlabel="node value", ylabel="nodes drafted")
    ax.legend(fontsize=6, frameon=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cal.to_csv(Path(out_dir) / f"{name}.csv", index=False)
    return figures.save(fig, out_dir, name) + [Path(out_dir) / f"{name}.csv"]


def dynamic_trees_table(dyn: list[dict]) -> pd.DataFrame:
    """One row per dynamic-tree run: tokens per verify (root included), proposer ms per step, pool nodes per
    step, MAT and speedup overall, and under ``budget=auto`` the mean chosen N and the choices {N: steps}."""
    rows = []
    for d in dyn:
        chosen = {int(k): v for k, v in (d.get("auto_budget_chosen") or {}).items()}
        rows.append({"label": d["label"], "tokens_per_verify": d.get("tokens_per_verify"),
                     "proposer_ms_per_step": d.get("proposer_ms_per_step"),
                     "pool_nodes_per_step": d.get("pool_nodes_per_step"), "mat": d["mat"], "speedup": d["speedup"],
                     "auto_budget_mean": sum(k * v for k, v in chosen.items()) / sum(chosen.values()) if chosen
                     else math.nan,
                     "auto_budget_chosen": json.dumps(chosen) if chosen else "", "run": d["run"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Training curves (issues 11, 12; specdec/training/train.py writes runs/train/<stem>/summary.json)
# --------------------------------------------------------------------------------------------

def load_training(root: str | Path) -> dict[str, dict]:
    """``{stem: summary}`` of every ``<root>/<stem>/summary.json`` holding a ``history`` list."""
    out = {}
    for path in sorted(Path(root).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("history"):
            out[path.parent.name] = summary
    return out


def training_curves(summaries: dict[str, dict], out_dir: str | Path, name: str = "training_curves") -> list[Path]:
    """Held-out accept rate sum(min(p, q)) and top-1 agreement vs tokens seen, one line per head; and
    ``training.md`` with each head's final values."""
    fig, (ax_acc, ax_top) = plt.subplots(1, 2, figsize=(7.5, 3.0))
    rows = []
    for i, (stem, s) in enumerate(summaries.items()):
        hist = pd.DataFrame(s["history"])
        ax_acc.plot(hist["tokens"], hist["accept_rate"], marker="o", ms=3, color=f"C{i}", label=stem)
        ax_top.plot(hist["tokens"], hist["top1"], marker="o", ms=3, color=f"C{i}", label=stem)
        last = hist.iloc[-1]
        rows.append({"head": stem, "steps": int(last["step"]), "tokens": int(last["tokens"]),
                     "accept_rate": last["accept_rate"], "top1": last["top1"],
                     "accept_rate_at_init": hist["accept_rate"].iloc[0], "top1_at_init": hist["top1"].iloc[0],
                     "train_time_s": last.get("train_time", math.nan)})
    ax_acc.set(xlabel="tokens seen", ylabel="held-out accept rate Σ min(p, q)")
    ax_top.set(xlabel="tokens seen", ylabel="held-out top-1 agreement")
    ax_acc.legend(fontsize=7, frameon=False)
    table = pd.DataFrame(rows)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "training.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    table.to_csv(Path(out_dir) / "training.csv", index=False)
    return figures.save(fig, out_dir, name) + [Path(out_dir) / "training.md", Path(out_dir) / "training.csv"]


# --------------------------------------------------------------------------------------------
# Everything above, for `python -m analysis`
# --------------------------------------------------------------------------------------------

def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def multidraft_outputs(df: pd.DataFrame, out: Path) -> list[Path]:
    table = multidraft_table(df)
    if table.empty:
        note("no multi-draft runs (sps/specinfer/spectr/rsd, temperature > 0, baseline=none; make bench-multidraft): "
             "mat_vs_drafts skipped")
        return []
    written = []
    for vals, part in table.groupby([c for c in MD_KEYS if c in table], dropna=False, sort=True):
        d = out / "multidraft" / _slug(*vals) if table[MD_KEYS].drop_duplicates().shape[0] > 1 else out / "multidraft"
        d.mkdir(parents=True, exist_ok=True)
        order = multidraft_ordering(part)
        for stem, frame in (("multidraft", part), ("ordering", order)):
            frame.to_csv(d / f"{stem}.csv", index=False)
            (d / f"{stem}.md").write_text(frame.to_markdown(index=False, floatfmt=".3f") + "\n")
            written += [d / f"{stem}.csv", d / f"{stem}.md"]
        written += mat_vs_drafts(part, d)
        print(f"\nmulti-draft MAT ({', '.join(f'{k}={v}' for k, v in zip(MD_KEYS, vals))})\n"
              f"{part.drop(columns=[c for c in MD_KEYS if c in part]).to_markdown(index=False, floatfmt='.3f')}")
        shown = ["K", "L", "spectr", "specinfer", "sps", "holds", "violated", "z spectr-specinfer", "z specinfer-sps"]
        print(f"ordering MAT(spectr) >= MAT(specinfer) >= MAT(sps), per (K, L):\n"
              f"{order[shown].to_markdown(index=False, floatfmt='.3f')}"
              if not order.empty else "ordering: no (K, L) with both spectr and specinfer")
    return written


def token_acceptance_figure(report: dict, out_dir: str | Path, name: str = "token_acceptance") -> list[Path]:
    """Token-level acceptance vs drafts K per rule on the same (p, q) pairs (``analysis.token_acceptance``),
    with +-1 standard error (Khisti et al.'s table as a figure)."""
    table = pd.DataFrame(report["rows"])
    labels = {"specinfer": "SpecInfer (SpS at K = 1)", "spectr": "SpecTr K-SEQ",
              "khisti": f"Khisti et al. (LP over {report.get('lp_tokens', 5)} tokens)",
              "khisti_sir": f"khisti_sir (top-{report['top_m']} q, p/q pick)", "rsd": "RSD (w/o replacement)",
              "optimal": "optimal (LP bound)"}
    labels = {rule: label for rule, label in labels.items() if rule in table}  # reports before khisti_sir lack some
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for i, (rule, label) in enumerate(labels.items()):
        ax.errorbar(table["K"], table[rule], yerr=table[f"{rule} se"], marker="o", capsize=2, color=f"C{i}",
                    label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(table["K"], [str(k) for k in table["K"]])
    ax.minorticks_off()
    ax.set_xlabel("drafts K")
    ax.set_ylabel("P(a draft is accepted)")
    ax.set_title(f"{report['model']}, {report['drafter']}, T = {report['temperature']}: {report['pairs']} pairs",
                 fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    return figures.save(fig, out_dir, name)


def token_acceptance_outputs(run_root: Path, out: Path) -> list[Path]:
    path = run_root / "bench" / "token_acceptance.json"
    if not path.exists():
        note("no runs/bench/token_acceptance.json (make bench-token-acceptance): token_acceptance skipped")
        return []
    report = json.loads(path.read_text())
    d = out / "multidraft"
    d.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(report["rows"])
    (d / "token_acceptance.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    table.to_csv(d / "token_acceptance.csv", index=False)
    print(f"\ntoken-level acceptance on {report['pairs']} (p, q) pairs\n{table.to_markdown(index=False, floatfmt='.4f')}")
    return [d / "token_acceptance.md", d / "token_acceptance.csv"] + token_acceptance_figure(report, d)


def dyntree_outputs(df: pd.DataFrame, out: Path) -> list[Path]:
    dyn = dyntree_stats(df)
    if not dyn:
        note("no finished dynamic-tree run (eagle2/opt_tree/dyspec) with calibration stats: calibration skipped")
        return []
    d = out / "dynamic_trees"
    written = calibration(calibration_table(dyn), d)
    table = dynamic_trees_table(dyn)
    table.to_csv(d / "dynamic_trees.csv", index=False)
    (d / "dynamic_trees.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(f"\ndynamic trees\n{table.drop(columns='run').to_markdown(index=False, floatfmt='.3f')}")
    return written + [d / "dynamic_trees.csv", d / "dynamic_trees.md"]


def training_outputs(run_root: Path, out: Path) -> list[Path]:
    summaries = load_training(run_root / "train")
    if not summaries:
        note(f"no training summary in {run_root / 'train'}/<stem>/summary.json: training curves skipped")
        return []
    written = training_curves(summaries, out / "training")
    print(f"\ntraining (held-out, final)\n{(out / 'training' / 'training.md').read_text()}")
    return written


def sweep_mat_tables(sweep_stats: pd.DataFrame, d: Path) -> list[Path]:
    """``mat_by_task`` table of one sweep (``summarize``-able stats) under ``d``; printed."""
    summary = summarize(sweep_stats)
    table = mat_table(summary)
    print(f"\n{d.name}: MAT per task\n{table.to_markdown()}")
    return export_table(table, d / "mat_by_task")

