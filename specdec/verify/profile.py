"""A latency profile: the measured seconds of one verify forward over n new tokens, t(n), on one device and
setting (written by ``python -m analysis.latency profile``; read by the auto budget of the dynamic trees,
specdec/drafters/tree_builder.py, and by analysis/'s cost model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Profile:
    """Median latency (seconds) of one target forward over ``n`` new tokens at a fixed context."""

    n: list[int]             # tokens per forward, ascending
    seconds: list[float]     # median latency per n
    meta: dict = field(default_factory=dict)  # device, dtype, threads, versions, context, ...

    def __post_init__(self):
        order = np.argsort(self.n)
        self.n = [int(self.n[i]) for i in order]
        self.seconds = [float(self.seconds[i]) for i in order]
        if not self.n or self.n[0] != 1:
            raise ValueError("a latency profile needs n = 1 (the autoregressive step)")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        data = json.loads(Path(path).read_text())
        meta = {k: v for k, v in data.items() if k not in ("n", "median_ms", "all_ms")}
        meta["path"] = str(path)
        return cls(n=data["n"], seconds=[ms / 1000 for ms in data["median_ms"]], meta=meta)

    @property
    def name(self) -> str:
        return Path(self.meta.get("path", "profile")).stem

    def t(self, n) -> np.ndarray | float:
        """Latency in seconds of a forward over ``n`` tokens: piecewise-linear interpolation between
        measured points; beyond the largest measured n, linear extrapolation from the last two."""
        n_arr = np.asarray(n, dtype=float)
        xs, ys = np.asarray(self.n, float), np.asarray(self.seconds, float)
        out = np.interp(n_arr, xs, ys)
        if len(xs) >= 2:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            out = np.where(n_arr > xs[-1], ys[-1] + slope * (n_arr - xs[-1]), out)
        return float(out) if out.ndim == 0 else out

    @property
    def roofline(self) -> float | None:
        """Seconds to read the weights once at the measured bandwidth (None for profiles without it)."""
        ms = self.meta.get("roofline_ms")
        return ms / 1000 if ms else None

    def relative(self) -> pd.Series:
        """t(n) / t(1), indexed by n (the verify cost in AR steps)."""
        return pd.Series(np.asarray(self.seconds) / self.seconds[0], index=self.n, name=self.name)
