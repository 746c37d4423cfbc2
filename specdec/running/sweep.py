"""A Hydra callback that lets a sweep survive its bad jobs (registered in ``conf/config.yaml``).

    python run.py -m method=ar,recycle,nosuch_knob_value ...   # every job runs; the bad ones are listed at the end

A job refused with a ``UserError`` leaves its one-line reason in ``<job dir>/error.txt``
(``specdec.errors.run_in_output_dir``) and the sweep goes on. When the sweep ends, this callback reads
those files under the sweep dir -- so it works for any launcher, SLURM's included, whose jobs run in other
processes -- prints them and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from specdec.errors import ERROR_FILE


class SweepFailures(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).rglob(ERROR_FILE))
        if not failed:
            return
        print(f"error: {len(failed)} sweep job(s) failed (the others finished):", file=sys.stderr)
        for path in failed:
            print(f"  {path.parent}: {path.read_text(encoding='utf-8').strip()}", file=sys.stderr)
        sys.exit(2)
