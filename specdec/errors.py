"""User-facing errors: printed as one line by ``run.py`` with a non-zero exit, no stack trace."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ERROR_FILE = "error.txt"  # a refused sweep job's one-line reason, in its run dir


class UserError(Exception):
    """Bad input from the user (config, files, hardware request); the message says what to fix."""


class SettingError(UserError, ValueError):
    """A method's constructor refusing one of its settings (a bad knob value in its YAML or on the command
    line); ``build_proposer`` turns it into one line naming the method. Any other exception raised while
    building a method is a bug and keeps its traceback."""


def print_error(err: UserError) -> int:
    """Print ``err`` as the one ``error:`` line every entry point gives for bad input; return its exit code, 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


@dataclass(frozen=True)
class FailedJob:
    """What a sweep job refused by a ``UserError`` returns to Hydra: its run dir and the one-line reason."""

    run_dir: str
    reason: str


def run_in_output_dir(job) -> FailedJob | None:
    """Call ``job(hydra_output_dir)`` from a ``@hydra.main`` entry; a ``UserError`` becomes one ``error:`` line
    on stderr. A single run then exits with code 2 (what every entry point promises for bad input). A sweep
    job (``-m``) instead writes the line to ``<run dir>/error.txt`` and returns, so the sweep goes on; at its
    end ``specdec.running.sweep.SweepFailures`` lists every failed job and exits 2. Hydra's basic launcher catches
    ``Exception`` but not ``SystemExit``: exiting here would end the whole sweep at its first bad job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    (out_dir / ERROR_FILE).unlink(missing_ok=True)  # a resumed job that now runs is no longer failed
    try:
        job(out_dir)
    except UserError as err:
        code = print_error(err)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(code)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ERROR_FILE).write_text(f"{err}\n", encoding="utf-8")
        return FailedJob(str(out_dir), str(err))
    return None
