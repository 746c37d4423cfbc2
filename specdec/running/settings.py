"""The run's shared settings (``conf/config.yaml``): checked and coerced once, before anything loads.

A command line gives Hydra ``temperature=1`` as the int 1 and ``temperature='0.7'`` as a string;
every numeric setting is converted to its type here, so the rest of the code (and transformers'
logits processors, which reject an int temperature) sees one type. A value out of range is one
``UserError`` line (exit 2), never a silent fallback: ``temperature=-1`` is not greedy.

    from specdec.running.settings import check_settings
    check_settings(cfg)   # first thing in Runner.__init__
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from omegaconf import DictConfig, open_dict

from specdec.errors import UserError


def _number(name: str, value: Any, kind: type) -> float | int:
    """``value`` as ``kind`` (int or float); bools, None, non-numeric text and non-integral ints fail."""
    if isinstance(value, bool) or value is None:
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be finite, got {value!r}")
    if kind is int:
        if number != int(number):
            raise UserError(f"{name} must be an integer, got {value!r}")
        return int(number)
    return number


# setting -> (type, range check, what the range is); None allowed only where ``nullable``
NUMERIC: dict[str, tuple[type, Callable[[float], bool], str, bool]] = {
    "max_new_tokens": (int, lambda v: v > 0, "a positive integer", False),
    "temperature": (float, lambda v: v >= 0, ">= 0 (0 = greedy)", False),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)", False),
    "top_k": (int, lambda v: v >= 0, ">= 0 (0 = off)", False),
    "seed": (int, lambda v: True, "an integer", False),
    "threads": (int, lambda v: v >= 0, ">= 0 or null (null/0 = torch's default)", True),
    "warmup": (int, lambda v: v >= 0, ">= 0", False),
}
CHOICES = {"baseline": ("paired", "none"), "context_policy": ("extend", "stop", "refuse")}
FLAGS = ("warmup_keeps_state",)


def check_settings(cfg: DictConfig) -> None:
    """Validate the shared settings of ``cfg`` and store each numeric one as its type (in place)."""
    coerced: dict[str, Optional[float | int]] = {}
    for name, (kind, ok, allowed, nullable) in NUMERIC.items():
        if name not in cfg:
            continue
        value = cfg[name]
        if value is None and nullable:
            coerced[name] = None
            continue
        number = _number(name, value, kind)
        if not ok(number):
            raise UserError(f"{name} must be {allowed}, got {value!r}")
        coerced[name] = number
    for name, choices in CHOICES.items():
        if name in cfg and cfg[name] not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}; got {cfg[name]!r}")
    for name in FLAGS:
        if name in cfg and not isinstance(cfg[name], bool):
            raise UserError(f"{name} must be true or false, got {cfg[name]!r}")
    with open_dict(cfg):
        for name, value in coerced.items():
            cfg[name] = value
