"""Experiment tracking: Weights & Biases (online, offline or disabled) or nothing.

W&B is never allowed to fail a run: ``online`` without a reachable server falls back to offline
with a warning, and any W&B error turns tracking off with a warning. Offline files go under the
run dir (``<run dir>/wandb``); ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from specdec.models import host_reachable

log = logging.getLogger(__name__)


class Tracker:
    """No tracking (``logger=none``)."""

    def log_question(self, record: dict) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def finish(self) -> None: ...


def question_metrics(record: dict) -> dict:
    """Flat per-question figures for a W&B history row."""
    c = record["choices"][0]
    wall = sum(c["wall_time"])
    steps = c["accept_lengths"]
    row = {"question_id": record["question_id"], "task": record["task"], "new_tokens": sum(c["new_tokens"]),
           "wall_time": wall, "tokens_per_s": sum(c["new_tokens"]) / wall if wall else 0.0,
           "mat": sum(steps) / len(steps) if steps else 0.0, "draft_time": sum(c["draft_time"])}
    if "baseline" in record:
        base = record["baseline"]
        row["baseline_tokens_per_s"] = sum(base["new_tokens"]) / sum(base["wall_time"])
        row["speedup"] = row["tokens_per_s"] / row["baseline_tokens_per_s"]
    if "lossless" in record:
        row["identical"] = int(record["lossless"]["identical"])
    return row


class WandbTracker(Tracker):
    def __init__(self, run):
        self.run = run

    def _safely(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - tracking must never fail a run
            log.warning("W&B %s failed (%s); tracking continues without it", what, err)

    def log_question(self, record: dict) -> None:
        self._safely("log", lambda: self.run.log(question_metrics(record)))

    def log_summary(self, summary: dict) -> None:
        import wandb

        def log():
            tasks = summary["tasks"]
            columns = ["task"] + sorted({k for agg in tasks.values() for k in agg})
            table = wandb.Table(columns=columns, data=[[t] + [agg.get(k) for k in columns[1:]] for t, agg in tasks.items()])
            self.run.log({"per_task": table})
            self.run.summary.update({f"{t}/{k}": v for t, agg in tasks.items() for k, v in agg.items()})
            self.run.summary.update({"env": summary["env"], "method_stats": summary["method_stats"]})

        self._safely("summary", log)

    def finish(self) -> None:
        self._safely("finish", lambda: self.run.finish())


def wandb_reachable(timeout: float = 3.0) -> bool:
    return host_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout)


def make_tracker(logger_cfg, run_dir: Path, config: dict) -> Tracker:
    if logger_cfg is None or logger_cfg.get("name", "none") == "none":
        return Tracker()
    mode = logger_cfg.get("mode", "offline")
    if mode == "disabled":
        return Tracker()
    if mode == "online" and not wandb_reachable():
        log.warning("W&B server unreachable: logging offline under %s/wandb (upload later with `wandb sync`)", run_dir)
        mode = "offline"
    try:
        import wandb

        run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
                         tags=list(logger_cfg.get("tags") or []), mode=mode, dir=str(run_dir), config=config,
                         name=f"{config['method']['name']}-{config['model']['name']}-{config['task']['name']}",
                         reinit="finish_previous")
    except Exception as err:  # noqa: BLE001
        log.warning("W&B could not start (%s); the run continues without tracking", err)
        return Tracker()
    return WandbTracker(run)
