"""The seed paper's main table and Spec-Bench's leaderboard, row for row: each measured row beside the reported one.

    python -m analysis.paper tr --spec-bench <compare dir> --mbpp <compare dir> --out <dir>
    python -m analysis.paper spec-bench --runs <compare dir> --out <dir>

A *compare dir* is what ``python -m specdec.running.compare`` writes: one run dir per method
(``<dir>/<method>/summary.json``), ``ar`` among them. ``make paper-tr`` and ``make paper-spec-bench`` run the
comparisons and then this (docs/results.md, "Paper tables").

Layouts (each written as ``<out>/<name>.csv`` and ``.md`` and printed):

* ``tr_table1``: Token Recycling's Table 1 (Luo et al., arXiv 2408.08696): rows AR, Lade, PLD, REST, Medusa, TR;
  columns the six Spec-Bench task speedups, MAT, tokens/s and overall speedup, then MAT, tokens/s and speedup on
  MBPP (TR's 399 prompts, ``task=mbpp``).
* ``spec_bench_leaderboard``: Spec-Bench's leaderboard (``Leaderboard.md``): the six task speedups, mean accepted
  tokens and overall speedup; the board's rows this harness has (EAGLE2, Recycling, Hydra, Medusa, PLD, SpS,
  REST, Lookahead), in the board's order. AR is no row there (its tokens/s is in the caption).

Per method of the layout: its measured row(s), one per compared method that implements it (``recycle`` and
``recycle_cpu`` both are TR), then the ``reported`` row. A compared method is matched to a paper row by its
proposer (``.hydra/config.yaml``), else by its key without ``_cpu``. Spec-Bench's "Lookahead" row and TR's "Lade"
are LADE (Fu et al., arXiv 2402.02057): key ``lade``; this harness's ``lookahead`` is Alipay's Lookahead (Zhao et
al.) and, like every compared method that is no row of the layout, comes after the layout's rows with a reported
row of "-". AR's speedups are 1 by definition (as printed in TR's table).

Missing cells: a measured figure that was not measured (no run, or a task outside the slice) is blank, never 0;
a figure the paper does not report is "-". Every row names its setting, and the caption the measured model,
device, dtype, back end, threads, slice and AR's tokens/s, so that a SmolLM2-on-CPU row is not read as a
Vicuna-on-A100 one: compare MAT across devices, speedups only within one machine (Spec-Bench issue #4).

Reported numbers (``analysis/reported/*.csv``; ``#`` header lines give paper, table, model and device):

* ``tr_table1.csv``: TR Table 1 as ``images/results.png`` of Luowaterbi/TokenRecycling @ 1b4c05c, Vicuna v1.3
  7B/13B/33B, fp16, one GPU the release does not name;
* ``spec_bench_a100.csv``: Spec-Bench ``Leaderboard.md`` @ fd2c1cd, the A100 80GB tables, Vicuna v1.3 7B/13B/33B.

The reported size follows the measured model (``vicuna-13b`` -> 13B); any other model is shown beside 7B.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from specdec.errors import UserError, print_error
from tasks import TASKS

from .load import run_info

REPORTED_DIR = Path(__file__).resolve().parent / "reported"
NOT_REPORTED = "-"
BASELINE = "ar"
SIZES = {"7b": "7B", "13b": "13B", "33b": "33B"}


@dataclass(frozen=True)
class Layout:
    """One paper table: its reported CSV, its rows (harness proposer -> reported method, in table order) and
    its columns (figure -> title; ``mbpp_*`` figures come from the MBPP comparison)."""

    name: str
    title: str
    short: str
    reported: str
    reported_setting: str             # the reported rows' setting, {size} = 7B / 13B / 33B
    rows: dict
    columns: dict
    speedup_suffix: str = ""          # the leaderboard prints "1.34x"
    ar_row: bool = True               # AR is a row (TR) or only the caption's AR tokens/s (the leaderboard)


TR_TABLE1 = Layout(
    name="tr_table1", title="Token Recycling, Table 1 (Luo et al., arXiv 2408.08696)", short="TR Table 1",
    reported="tr_table1", reported_setting="Vicuna-{size} v1.3, one GPU (not named), float16",
    rows={"ar": "AR", "lade": "Lade", "pld": "PLD", "rest": "REST", "medusa": "Medusa", "recycle": "TR"},
    columns={"mt_bench": "MT", "translation": "Trans", "summarization": "Sum", "qa": "QA", "math_reasoning": "Math",
             "rag": "RAG", "mat": "MAT", "tokens_per_s": "Ts/s", "speedup": "Speed", "mbpp_mat": "MBPP MAT",
             "mbpp_tokens_per_s": "MBPP Ts/s", "mbpp_speedup": "MBPP Speed"})

SPEC_BENCH_BOARD = Layout(
    name="spec_bench_leaderboard", title="Spec-Bench leaderboard, A100 (Xia et al., arXiv 2401.07851)",
    short="Spec-Bench leaderboard", reported="spec_bench_a100",
    reported_setting="Vicuna-{size} v1.3, A100 80GB, float16",
    rows={"eagle2": "EAGLE2", "recycle": "Recycling", "hydra": "Hydra", "medusa": "Medusa", "pld": "PLD",
          "sps": "SpS", "rest": "REST", "lade": "Lookahead"},
    columns={"mt_bench": "Multi-turn Conversation", "translation": "Translation", "summarization": "Summarization",
             "qa": "Question Answering", "math_reasoning": "Mathematical Reasoning",
             "rag": "Retrieval-aug. Generation", "mat": "#Mean Accepted Tokens", "speedup": "Overall"},
    speedup_suffix="x", ar_row=False)

SPEEDUP_FIGURES = set(TASKS) | {"speedup", "mbpp_speedup"}


# --------------------------------------------------------------------------------------------
# Reported numbers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reported:
    """A reported table: ``meta`` from its ``# key: value`` header lines (paper, table, model, device, note),
    ``rows`` one per (size, method)."""

    meta: dict
    rows: pd.DataFrame

    def row(self, size: str, method: str) -> dict | None:
        hit = self.rows[(self.rows["size"] == size) & (self.rows["method"] == method)]
        return None if hit.empty else hit.iloc[0].to_dict()


def load_reported(name: str) -> Reported:
    """``analysis/reported/<name>.csv`` with its source header."""
    meta: dict[str, str] = {}
    body = []
    for line in (REPORTED_DIR / f"{name}.csv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            key, _, value = line.lstrip("# ").partition(":")
            meta[key.strip()] = f"{meta[key.strip()]}; {value.strip()}" if key.strip() in meta else value.strip()
        elif line.strip():
            body.append(line)
    return Reported(meta, pd.read_csv(io.StringIO("\n".join(body)), dtype={"size": str, "method": str}))


def reported_size(model: str | None) -> str:
    """The reported size beside a measured model: the Vicuna size it names, else 7B."""
    match = re.search(r"vicuna-(\d+b)", str(model or "").lower())
    return SIZES.get(match.group(1), "7B") if match else "7B"


# --------------------------------------------------------------------------------------------
# Measured numbers: one compare dir
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One compared method's run dir: its key, proposer, drafter, setting and summary."""

    key: str
    proposer: str
    drafter: str | None
    info: dict        # analysis.load.run_info: model, device, dtype, backend, threads, task_set, max_new_tokens...
    summary: dict     # summary.json

    @property
    def tasks(self) -> dict:
        return self.summary.get("tasks", {})


def load_compare(path: str | Path) -> dict[str, Arm]:
    """Every finished run dir of a compare dir by method key (AR first, then alphabetical); a run dir without
    summary.json (unfinished) is skipped with a note."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (expected the output dir of python -m specdec.running.compare)")
    arms = {}
    for summary_path in sorted(path.glob("*/summary.json")):
        run_dir = summary_path.parent
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{summary_path}: not valid JSON ({err.msg})") from None
        info = run_info(run_dir)
        key = str(info["method"] or run_dir.name)
        arms[key] = Arm(key, str(info["proposer"] or key), info.get("drafter"), info, summary)
    unfinished = sorted(d.name for d in path.iterdir() if (d / "answers.jsonl").is_file()
                        and not (d / "summary.json").is_file())
    if unfinished:
        print(f"note: {path}: no summary.json (unfinished) in {', '.join(unfinished)}: left blank")
    if not arms:
        raise UserError(f"{path}: no <method>/summary.json (expected the output dir of "
                        "python -m specdec.running.compare)")
    return dict(sorted(arms.items(), key=lambda item: (item[1].proposer != BASELINE, item[0])))


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def spec_bench_figures(arm: Arm | None) -> dict:
    """The six task speedups and the overall MAT, tokens/s and speedup of one arm (NaN: not measured)."""
    if arm is None:
        return {}
    is_ar = arm.proposer == BASELINE
    figures = {}
    for task in TASKS:
        figures_of_task = arm.tasks.get(task)
        figures[task] = math.nan if not figures_of_task else 1.0 if is_ar else _number(figures_of_task.get("speedup"))
    overall = arm.tasks.get("overall") or {}
    figures["mat"] = _number(overall.get("mat"))
    figures["tokens_per_s"] = _number(overall.get("tokens_per_s"))
    figures["speedup"] = math.nan if not overall else 1.0 if is_ar else _number(overall.get("speedup"))
    return figures


def mbpp_figures(arm: Arm | None) -> dict:
    """MAT, tokens/s and speedup over every question of an MBPP comparison, as ``mbpp_*``."""
    if arm is None:
        return {}
    overall = arm.tasks.get("overall") or {}
    speedup = math.nan if not overall else 1.0 if arm.proposer == BASELINE else _number(overall.get("speedup"))
    return {"mbpp_mat": _number(overall.get("mat")), "mbpp_tokens_per_s": _number(overall.get("tokens_per_s")),
            "mbpp_speedup": speedup}


def setting(arms: dict[str, Arm]) -> dict:
    """What a comparison measured on (from its AR run dir, else its first): model, device, dtype, back end..."""
    arm = arms.get(BASELINE) or next(iter(arms.values()))
    env = arm.summary.get("env") or {}
    overall = arm.tasks.get("overall") or {}
    return {"model": arm.info.get("model"), "device": arm.info.get("device"), "device_name": env.get("device_name"),
            "dtype": arm.info.get("dtype"), "backend": arm.info.get("backend"), "threads": arm.info.get("threads"),
            "task_set": arm.info.get("task_set"), "questions": overall.get("n"),
            "max_new_tokens": arm.info.get("max_new_tokens"), "temperature": arm.summary.get("temperature"),
            "ar_tokens_per_s": _number(overall.get("tokens_per_s")) if BASELINE in arms else math.nan}


def setting_short(s: dict) -> str:
    return f"measured: {s['model']}, {s['device']}, {s['dtype']}"


def setting_long(s: dict) -> str:
    sampling = "greedy" if not s["temperature"] else f"temperature {s['temperature']}"
    device = f"{s['device']} ({s['device_name']})" if s.get("device_name") else s["device"]
    ar = "" if math.isnan(s["ar_tokens_per_s"]) else f"; AR {s['ar_tokens_per_s']:.2f} tokens/s"
    return (f"{s['model']} on {device}, {s['dtype']}, back end {s['backend']}, {s['threads']} threads; "
            f"{s['task_set']}, {s['questions']} question{'' if s['questions'] == 1 else 's'}, "
            f"{s['max_new_tokens']} new tokens per turn, {sampling}{ar}")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def paper_row_of(layout: Layout, key: str, proposer: str) -> str | None:
    """The layout's reported method a compared method measures (by proposer, else by key without ``_cpu``)."""
    for name in (proposer, key, key.removesuffix("_cpu")):
        if name in layout.rows:
            return layout.rows[name]
    return None


@dataclass(frozen=True)
class Part:
    """One comparison feeding some of a layout's columns: its name in the caption, its arms and the function
    giving an arm's figures (``spec_bench_figures`` or ``mbpp_figures``)."""

    name: str
    arms: dict
    figures: object


def _ordered_keys(parts: list[Part], methods: list[str] | None) -> list[str]:
    if methods is None:
        return list(dict.fromkeys(k for part in parts for k in part.arms))
    return list(dict.fromkeys([BASELINE] + [m for m in methods if m]))


def _measured_row(layout: Layout, key: str, parts: list[Part], label: str) -> dict:
    arm = next((part.arms[key] for part in parts if key in part.arms), None)
    figures: dict = {}
    for part in parts:
        figures.update(part.figures(part.arms.get(key)))
    name = key if arm is None or not arm.drafter or arm.drafter == "none" else f"{key} (drafter {arm.drafter})"
    return {"method": None, "row": name, "setting": label, **{f: figures.get(f, math.nan) for f in layout.columns}}


def _blank_row(layout: Layout, label: str) -> dict:
    return {"method": None, "row": "not measured", "setting": label, **{f: math.nan for f in layout.columns}}


def _reported_row(layout: Layout, reported: Reported, size: str, method: str | None, label: str) -> dict:
    source = reported.row(size, method) if method else None
    cells = {f: (NOT_REPORTED if source is None or pd.isna(source.get(f, math.nan)) else float(source[f]))
             for f in layout.columns}
    return {"method": method, "row": "reported", "setting": label, **cells}


def build_table(layout: Layout, parts: list[Part], methods: list[str] | None = None,
                reported: Reported | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The layout as a DataFrame (columns ``method``, ``row``, ``setting``, then the layout's column titles) and
    its caption lines. ``parts``: the comparisons (an empty one leaves its columns blank); ``methods``: the
    compared methods to show, in order (default: every one found; AR always)."""
    reported = reported or load_reported(layout.reported)
    parts = [part for part in parts if part.arms]
    settings = [setting(part.arms) for part in parts]
    size = reported_size(settings[0]["model"] if settings else None)
    measured_label = setting_short(settings[0]) if settings else "measured: nothing"
    reported_label = "reported: " + layout.reported_setting.format(size=size)
    proposer = {k: a.proposer for part in parts for k, a in part.arms.items()}
    keys = [k for k in _ordered_keys(parts, methods) if layout.ar_row or proposer.get(k, k) != BASELINE]
    by_row: dict[str | None, list[str]] = {}
    for key in keys:
        by_row.setdefault(paper_row_of(layout, key, proposer.get(key, key)), []).append(key)
    rows = []
    for method in _layout_order(layout, reported, size):
        for key in by_row.get(method, [None]):
            row = _measured_row(layout, key, parts, measured_label) if key else _blank_row(layout, measured_label)
            rows.append({**row, "method": method})
        rows.append(_reported_row(layout, reported, size, method, reported_label))
    for key in by_row.get(None, []):
        rows.append({**_measured_row(layout, key, parts, measured_label), "method": key})
        rows.append({**_reported_row(layout, reported, size, None, f"reported: no {layout.short} row"), "method": key})
    table = pd.DataFrame(rows).rename(columns=layout.columns)
    return table, _caption(layout, reported, size, parts, settings)


def _layout_order(layout: Layout, reported: Reported, size: str) -> list[str]:
    """The layout's methods in the table's order: TR's as printed; the leaderboard's by its overall speedup at
    ``size`` (the board's own order)."""
    names = [m for p, m in layout.rows.items() if layout.ar_row or p != BASELINE]
    if layout.ar_row:
        return names
    speed = {m: (reported.row(size, m) or {}).get("speedup", math.nan) for m in names}
    return sorted(names, key=lambda m: -speed[m] if not pd.isna(speed[m]) else math.inf)


def _caption(layout: Layout, reported: Reported, size: str, parts: list[Part], settings: list[dict]) -> list[str]:
    lines = [layout.title]
    lines += [f"Measured ({part.name}): {setting_long(s)}" for part, s in zip(parts, settings)]
    if len({setting_short(s) for s in settings}) > 1:
        lines.append("Warning: these columns were measured on different models, devices or dtypes (above).")
    lines.append(f"Reported (Vicuna-{size}): {reported.meta.get('paper')}; {reported.meta.get('table')}; "
                 f"{reported.meta.get('model')}; {reported.meta.get('device')}")
    lines.append("Blank: not measured; '-': not reported. Speedups are against AR on the machine of their own row: "
                 "compare MAT across devices, speedups only within one.")
    return lines


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def to_markdown(table: pd.DataFrame, layout: Layout) -> str:
    """The table with 2 decimals; blank for NaN (not measured), '-' kept (not reported)."""
    speedups = {layout.columns[f] for f in SPEEDUP_FIGURES if f in layout.columns}

    def cell(value, column) -> str:
        if isinstance(value, str) or value is None:
            return value or ""
        if pd.isna(value):
            return ""
        return f"{value:.2f}" + (layout.speedup_suffix if column in speedups else "")

    shown = table.copy().astype(object)
    for column in layout.columns.values():
        shown[column] = [cell(v, column) for v in table[column]]
    shown["method"] = shown["method"].fillna("")
    return shown.to_markdown(index=False, disable_numparse=True)


def write_table(table: pd.DataFrame, caption: list[str], layout: Layout, out: str | Path) -> list[Path]:
    """``<out>/<layout>.csv`` (numbers, blank = not measured, '-' = not reported) and ``.md`` (caption + table);
    prints the markdown; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{layout.name}.csv", out / f"{layout.name}.md"]
    table.to_csv(paths[0], index=False)
    markdown = "\n\n".join(caption) + "\n\n" + to_markdown(table, layout) + "\n"
    paths[1].write_text(markdown, encoding="utf-8")
    print(f"\n{markdown}")
    return paths


def tr_table(spec_bench: str | Path | None, mbpp: str | Path | None, methods: list[str] | None = None):
    """TR Table 1 from a Spec-Bench and an MBPP comparison (either may be None: its columns stay blank)."""
    if spec_bench is None and mbpp is None:
        raise UserError("tr needs --spec-bench and/or --mbpp (compare dirs)")
    parts = [Part("Spec-Bench columns", load_compare(spec_bench) if spec_bench else {}, spec_bench_figures),
             Part("MBPP columns", load_compare(mbpp) if mbpp else {}, mbpp_figures)]
    return build_table(TR_TABLE1, parts, methods)


def spec_bench_table(runs: str | Path, methods: list[str] | None = None):
    """Spec-Bench's leaderboard from a Spec-Bench comparison."""
    return build_table(SPEC_BENCH_BOARD, [Part("Spec-Bench", load_compare(runs), spec_bench_figures)], methods)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.paper", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="layout", required=True)
    tr = sub.add_parser("tr", help="Token Recycling's Table 1 (Spec-Bench + MBPP)")
    tr.add_argument("--spec-bench", help="compare dir on spec_bench (or a slice of it)")
    tr.add_argument("--mbpp", help="compare dir on mbpp (or its first N prompts)")
    board = sub.add_parser("spec-bench", help="Spec-Bench's leaderboard")
    board.add_argument("--runs", required=True, help="compare dir on spec_bench (or a slice of it)")
    for p in (tr, board):
        p.add_argument("--out", required=True, help="output dir (<layout>.csv and .md)")
        p.add_argument("--methods", default=None,
                       help="compared methods to show, comma-separated, in order (default: every one found)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    try:
        if args.layout == "tr":
            table, caption = tr_table(args.spec_bench, args.mbpp, methods)
            layout = TR_TABLE1
        else:
            table, caption = spec_bench_table(args.runs, methods)
            layout = SPEC_BENCH_BOARD
    except UserError as err:
        return print_error(err)
    paths = write_table(table, caption, layout, args.out)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
