"""Load run dirs (written by run.py) into one tidy DataFrame: one row per question-turn.

    from analysis import load_runs
    df = load_runs("runs")                         # every run dir below runs/
    df = load_runs(["runs/spec_bench_mini/smollm2-135m/recycle/2025-*"])   # globs, dirs, lists

A run dir holds ``.hydra/config.yaml``, ``answers.jsonl`` and (once finished) ``summary.json``
(the contract: results_format in the project notes; Spec-Bench's record plus extras).

Columns (``df.attrs["knobs"]`` lists the ``method.*`` knob columns):

* run identity: ``run`` (run dir path), ``sweep`` (multirun dir or None), ``job`` (multirun job number),
  ``overrides`` (Hydra command-line overrides, one string);
* setting: ``model``, ``method``, ``proposer``, ``method.<knob>`` for every method knob, ``drafter`` (name in
  ``conf/drafter/``) and ``drafter.exit_layer`` (early-exit drafters; None otherwise),
  ``task_set`` (config ``task.name``), ``device``, ``dtype``, ``threads``, ``backend`` (the target's back end,
  specdec/backends.py; these four from the env in summary.json, or in ``sessions.jsonl`` for an unfinished run,
  which has ``auto`` resolved; else the config; runs older than the setting ran ``eager``), ``temperature``,
  ``top_p``, ``top_k``, ``seed``, ``max_new_tokens``, ``baseline_mode`` (paired / none), ``warmup``,
  ``warmup_keeps_state``, ``torch``, ``transformers``, ``git_commit``, ``complete`` (summary.json written, i.e.
  the run finished);
* question: ``task`` (one of Spec-Bench's 6), ``category``, ``question_id``, ``turn`` (0-based),
  ``n_turns``, ``order``, ``lossless`` (bool per question: ids identical to the paired greedy baseline; NaN
  without one), ``near_tie`` (not identical, first divergence at a near-tied top-2; specdec.running.runner),
  ``tstamp``;
* figures of this turn: ``new_tokens``, ``wall_time``, ``decoding_steps``, ``prefill_time``,
  ``draft_time``, ``verify_time``, ``commit_time``, ``update_time``, ``stop_reason``, ``accept_lengths`` and
  ``tree_sizes`` (lists, this turn's steps), ``proposer_times`` / ``device_times`` (per step: host seconds of
  propose + observe without device work, and the device work's seconds; NaN in older records), ``output_ids``,
  and the paired baseline's ``baseline.new_tokens``,
  ``baseline.wall_time``, ``baseline.decoding_steps``, ``baseline.prefill_time``, ``baseline.verify_time``,
  ``baseline.accept_lengths``, ``baseline.output_ids`` (NaN when the run has no paired baseline).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

from specdec.running.report import summary_rows

log = logging.getLogger(__name__)

TURN_FIELDS = ("new_tokens", "wall_time", "decoding_steps", "prefill_time", "draft_time", "verify_time",
               "commit_time", "update_time", "stop_reason", "output_ids", "prompt_tokens", "past_context")
BASELINE_FIELDS = ("new_tokens", "wall_time", "decoding_steps", "prefill_time", "verify_time", "stop_reason",
                   "output_ids")
# What makes two runs "the same setting" (repeats of one configuration); method knobs are added.
SETTING_COLUMNS = ("model", "method", "task_set", "device", "dtype", "backend", "threads", "temperature", "top_p",
                   "top_k", "max_new_tokens", "warmup", "warmup_keeps_state", "drafter", "drafter.exit_layer")
# Every per-run column (constant within a run).
RUN_COLUMNS = ("run", "sweep", "job", "overrides", "proposer", "seed", "baseline_mode", "torch", "transformers",
               "git_commit", "complete") + SETTING_COLUMNS


def find_run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run dirs (dirs holding ``answers.jsonl``) at or below each path or glob, sorted, unique."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for pattern in paths:
        matches = glob.glob(str(pattern)) or ([str(pattern)] if Path(pattern).exists() else [])
        for match in map(Path, matches):
            if match.is_file() and match.name == "answers.jsonl":
                found.add(match.parent)
            elif (match / "answers.jsonl").is_file():
                found.add(match)
            elif match.is_dir():
                found.update(p.parent for p in match.rglob("answers.jsonl"))
    return sorted(found)


def _read_answers(path: Path) -> list[dict]:
    """answers.jsonl records; a broken line (a run still writing) is skipped with a warning; a repeated
    question_id keeps the last record (Spec-Bench's ``reorg_answer_file``)."""
    by_id: dict = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{lineno}: not valid JSON, skipped")
            continue
        by_id.pop(rec["question_id"], None)  # last wins, but keep the file order of the last one
        by_id[rec["question_id"]] = rec
    return list(by_id.values())


def _scalar(value):
    """Knob values as hashable scalars (lists / dicts become JSON strings) so they can be grouped on."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _split(flat: list, counts: list[int]) -> list[list]:
    """Split a list flattened over turns by per-turn step counts (all in turn 0 if they disagree)."""
    if sum(counts) != len(flat):
        warnings.warn(f"per-step list of length {len(flat)} does not match decoding_steps {counts}; kept whole")
        return [list(flat)] + [[] for _ in counts[1:]]
    out, start = [], 0
    for n in counts:
        out.append(list(flat[start:start + n]))
        start += n
    return out


def _load_config(path: Path) -> dict:
    """Hydra's saved config with its ``${...}`` interpolations resolved (e.g. ``warmup: ${task.warmup}``);
    unresolved as a fallback (a resolver such as ``${now:...}`` only exists inside Hydra)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an unknown resolver; keep the raw strings
        return yaml.safe_load(path.read_text())


def _last_session_env(run_dir: Path) -> dict:
    """The env the run's last process recorded in ``sessions.jsonl`` before its first question ({} without one):
    where an unfinished run (no summary.json yet) ran."""
    path = run_dir / "sessions.jsonl"
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
    try:
        return json.loads(lines[-1]).get("env", {}) if lines else {}
    except json.JSONDecodeError:  # a process killed mid-line
        return {}


def run_info(run_dir: Path) -> dict:
    """The per-run columns (setting, env, identity) of one run dir."""
    cfg_path = run_dir / ".hydra" / "config.yaml"
    cfg = _load_config(cfg_path) if cfg_path.is_file() else {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    env = summary.get("env") or _last_session_env(run_dir)
    method = dict(cfg.get("method") or {})
    model, task = cfg.get("model") or {}, cfg.get("task") or {}
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    is_job = run_dir.name.isdigit() and ((run_dir.parent / "multirun.yaml").is_file() or "multirun" in run_dir.parts)
    info = {
        "run": str(run_dir),
        "sweep": str(run_dir.parent) if is_job else None,
        "job": int(run_dir.name) if is_job else None,
        "overrides": " ".join(overrides or []),
        "model": model.get("name", summary.get("model")),
        "method": method.pop("name", summary.get("method")),
        "proposer": method.pop("proposer", None),
        "task_set": task.get("name", summary.get("task")),
        "device": env.get("device", cfg.get("device")),
        "dtype": env.get("dtype", cfg.get("dtype")),
        "threads": env.get("threads", cfg.get("threads")),
        # runs older than the setting ran eager; without any env (no summary, no sessions) the config's
        "backend": env.get("backend", "eager") if env else cfg.get("backend", "eager"),
        "temperature": cfg.get("temperature", summary.get("temperature")),
        "top_p": cfg.get("top_p"), "top_k": cfg.get("top_k"), "seed": cfg.get("seed"),
        "max_new_tokens": cfg.get("max_new_tokens", summary.get("max_new_tokens")),
        "baseline_mode": cfg.get("baseline"),
        "warmup": cfg.get("warmup", summary.get("warmup")),
        "warmup_keeps_state": cfg.get("warmup_keeps_state", summary.get("warmup_keeps_state")),
        "torch": env.get("torch"), "transformers": env.get("transformers"), "git_commit": env.get("git_commit"),
        "complete": summary_path.is_file(),  # False: unfinished (or interrupted) run, no summary.json yet
        # who drafted (conf/drafter/; None in configs older than drafters): sps with and without an adapter differ
        "drafter": (cfg.get("drafter") or {}).get("name"),
        "drafter.exit_layer": (cfg.get("drafter") or {}).get("exit_layer"),
    }
    if info["proposer"] is None:
        info["proposer"] = info["method"]
    info.update({f"method.{k}": _scalar(v) for k, v in method.items()})
    return info


def _rows(run_dir: Path, info: dict) -> list[dict]:
    rows = []
    for rec in _read_answers(run_dir / "answers.jsonl"):
        choice, base = rec["choices"][0], rec.get("baseline")  # Spec-Bench uses choices[0] only
        n_turns = len(choice["new_tokens"])
        accepts = _split(choice.get("accept_lengths", []), choice["decoding_steps"])
        sizes = _split(choice.get("tree_sizes", []), choice["decoding_steps"]) if choice.get("tree_sizes") \
            else [[] for _ in range(n_turns)]
        base_accepts = _split(base.get("accept_lengths", []), base["decoding_steps"]) if base else None
        proposer, device = _proposer_steps(choice, n_turns)
        lossless = rec.get("lossless")
        for turn in range(n_turns):
            row = dict(info)
            row.update({"task": rec.get("task"), "category": rec.get("category"), "question_id": rec["question_id"],
                        "turn": turn, "n_turns": n_turns, "order": rec.get("order"), "tstamp": rec.get("tstamp"),
                        "lossless": lossless["identical"] if lossless else math.nan,
                        "near_tie": bool(lossless.get("near_tie")) if lossless else math.nan,
                        "accept_lengths": accepts[turn], "tree_sizes": sizes[turn],
                        "proposer_times": proposer[turn], "device_times": device[turn]})
            row.update({f: (choice[f][turn] if f in choice else math.nan) for f in TURN_FIELDS})
            for f in BASELINE_FIELDS:
                row[f"baseline.{f}"] = base[f][turn] if base and f in base else math.nan
            row["baseline.accept_lengths"] = base_accepts[turn] if base_accepts else math.nan
            rows.append(row)
    return rows


def _proposer_steps(choice: dict, n_turns: int) -> tuple[list, list]:
    """Per turn: host seconds of propose + observe per step, and device-attributed seconds per step
    (``step_*_time`` lists, flattened over turns); NaN per turn for records written before them."""
    if "step_draft_time" not in choice:
        return [math.nan] * n_turns, [math.nan] * n_turns
    host = [d + u for d, u in zip(choice["step_draft_time"], choice["step_update_time"])]
    return _split(host, choice["decoding_steps"]), _split(choice["step_device_time"], choice["decoding_steps"])


def load_runs(paths: str | Path | Iterable[str | Path] = "runs") -> pd.DataFrame:
    """One row per question-turn over every run dir found under ``paths`` (dirs or globs)."""
    from tasks import task_of

    rows, knobs = [], set()
    for run_dir in find_run_dirs(paths):
        try:
            info = run_info(run_dir)
            run_rows = _rows(run_dir, info)
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
            warnings.warn(f"{run_dir}: unreadable run dir skipped ({type(err).__name__}: {err})")
            continue
        knobs.update(k for k in info if k.startswith("method."))
        rows += run_rows
    df = _fill_env_of_unfinished(pd.DataFrame(rows))
    if df.empty:
        df = pd.DataFrame(columns=["run", "model", "method", "proposer", "task", "category", "question_id", "turn",
                                   "new_tokens", "wall_time", "accept_lengths", "tree_sizes"])
    else:
        df["task"] = df["task"].fillna(df["category"].map(task_of))
    df.attrs["knobs"] = sorted(knobs)
    return df


def _fill_env_of_unfinished(df: pd.DataFrame) -> pd.DataFrame:
    """An unfinished run without summary.json or sessions.jsonl has ``device``/``dtype``/``threads``/``backend``
    from the config (possibly ``auto``/null). Take those from a finished job of the same multirun (same launch, same
    machine); a lone unfinished run keeps the configured values."""
    if df.empty or df["complete"].all():
        return df
    for run in df.loc[~df["complete"] & df["sweep"].notna(), "run"].unique():
        rows = df["run"] == run
        sweep = df.loc[rows, "sweep"].iloc[0]
        donors = df[(df["sweep"] == sweep) & df["complete"]]
        if donors.empty:
            continue
        for col in ("device", "dtype", "threads", "backend"):
            if df.loc[rows, col].iloc[0] in (None, "auto") or pd.isna(df.loc[rows, col].iloc[0]):
                df.loc[rows, col] = donors[col].iloc[0]
    return df


def knob_columns(df: pd.DataFrame) -> list[str]:
    """The ``method.*`` columns of a frame."""
    return sorted(c for c in df.columns if c.startswith("method."))


def sweep_axes(df: pd.DataFrame) -> list[str]:
    """Columns a Hydra multirun of one method may vary: its knobs and the drafter's exit layer (Kangaroo's ℓ)."""
    return knob_columns(df) + [c for c in ("drafter.exit_layer",) if c in df.columns]


def load_summaries(paths: str | Path | Iterable[str | Path] = "runs") -> pd.DataFrame:
    """summary.json per run and task (the numbers run.py computed), one row per (run, task)."""
    rows = []
    for run_dir in find_run_dirs(paths):
        path = run_dir / "summary.json"
        if not path.is_file():
            continue
        rows += summary_rows(json.loads(path.read_text()), run_dir)
    return pd.DataFrame(rows)
