"""The proposer API and the method registry.

A method is one module in ``methods/`` holding one ``Proposer`` subclass decorated with
``@register("key")`` plus one YAML in ``conf/method/``. The YAML's ``proposer:`` names the
registered key; every other key except ``name`` becomes a constructor argument, so the
constructor is the schema and a typo fails at start-up. The core never names a method.

Call order per generation (one turn):  ``reset("turn")`` -> ``begin(ctx)`` ->
``propose(ctx)`` / ``observe(step)`` per step -> ``end(ctx)``. ``reset("question")`` precedes
each question and ``reset("run")`` starts a run (and follows warm-up unless
``warmup_keeps_state``). What a scope clears is the method's own policy.

*Learned state* (tables, tries, calibration) and *stats* (the counters ``stats()`` reports) are kept
apart: ``reset(scope)`` forgets learned state only, ``reset_stats()`` zeroes the counters only. The
runner calls ``reset_stats()`` right before the first timed question, so a summary's ``method_stats``
never include warm-up, whatever ``warmup_keeps_state`` keeps.

Randomness: ``Context.seed`` is set per (question, turn) by the runner; a proposer that draws random
numbers seeds its streams from it in ``begin`` so a resumed run draws exactly as an uninterrupted one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from specdec.errors import SettingError, UserError
from specdec.verify.tree import DraftTree

SCOPES = ("run", "question", "turn")
WARM_SIZES = (1, 2, 4, 8, 16)  # verify sizes warmed for a proposer that does not say which it uses


def sizes_up_to(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``largest``, then ``largest``: the verify sizes of trees that vary up to ``largest``."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n *= 2
    return tuple(sizes + [max(1, int(largest))])


@dataclass
class Context:
    """What a proposer may read when drafting. Owned and updated by the decode loop."""

    tokens: list[int]  # committed sequence: prompt + generated; tokens[-1] is the root
    prompt_len: int    # number of prompt tokens at the start of ``tokens``
    remaining: int     # tokens this generation may still commit (max_new_tokens - generated)
    # The target's last hidden states at ``tokens[:-1]`` [len(tokens) - 1, H]; only for proposers with
    # ``wants_hidden`` (feature-based drafters: EAGLE heads), else None.
    hidden: Optional[torch.Tensor] = None
    seed: int = 0      # this (question, turn)'s seed: proposers seed their random streams from it in ``begin``

    @property
    def root(self) -> int:
        return self.tokens[-1]

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass(frozen=True)
class StepResult:
    """One verify step as the proposer's ``observe`` sees it."""

    tree: DraftTree
    logits: torch.Tensor  # float32 [T, V]: raw target logits after every tree node (before processors)
    path: list[int]       # accepted node indices, root first (path[0] == 0)
    committed: list[int]  # tokens committed this step: accepted drafts + bonus, after truncation
    final: bool = False   # the generation ends after this step (stop token or length)
    # float32 [K, V]: raw target logits of the tree's wanted side rows (``tree.side.wanted`` order), None without
    # side rows (docs/verifier.md §10.1). Never seen by the acceptance rules.
    side_logits: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class MethodEnv:
    """What a method receives at construction besides its YAML knobs."""

    vocab_size: int              # rows of the target's logits (may exceed len(tokenizer))
    device: torch.device
    tokenizer: Any               # the target's tokenizer (for corpus-built tables)
    model: Any = None            # the target model, read-only (self-speculative methods)
    seed: int = 0
    cache_dir: Optional[str] = None  # where methods may cache built artefacts (outside git)
    drafter: Any = None          # a ``specdec.drafters.Drafter`` (conf/drafter/), or None (drafter=none)
    temperature: float = 0.0     # the run's sampling settings: drafters' q must use the target's processors
    top_k: int = 0
    top_p: float = 1.0
    auto_budget: Optional[dict] = None  # conf/auto_budget (latency_profile, max_budget): budget=auto of dynamic trees


class Proposer:
    """Base class: a root-only tree each step (the autoregressive baseline)."""

    needs_drafter = False  # True: drafts with ``MethodEnv.drafter`` (conf/drafter/), which must not be None

    wants_hidden = False  # True: the loop keeps ``Context.hidden`` (costs a feature copy per step)

    def __init__(self, env: MethodEnv):
        self.env = env

    def propose(self, ctx: Context) -> DraftTree:
        return DraftTree.root_only(ctx.root, self.env.device)

    def begin(self, ctx: Context) -> None:
        """A new generation starts; ``ctx.tokens`` holds the prompt."""

    def observe(self, step: StepResult) -> None:
        """Called after every verify step that committed at least one token."""

    def end(self, ctx: Context) -> None:
        """The generation finished (stop token or length)."""

    def reset(self, scope: str) -> None:
        """Forget learned state according to the method's policy for ``scope`` (``SCOPES``); never the stats."""

    def reset_stats(self) -> None:
        """Zero the counters that ``stats()`` reports (called before the first timed question); keep learned state."""

    def stats(self) -> dict:
        """Figures recorded in the run summary (e.g. table memory)."""
        return {}

    def tree_sizes(self) -> tuple[int, ...]:
        """Tokens per verify forward (root included) this proposer's trees take: ``specdec.verify.target.warm``
        runs each before timing (``backend=compile`` compiles them). Static trees return their size, growing
        ones ``sizes_up_to`` their budget; the default ``WARM_SIZES`` suits anything."""
        return WARM_SIZES


_REGISTRY: dict[str, type[Proposer]] = {}


def register(key: str) -> Callable[[type[Proposer]], type[Proposer]]:
    """Class decorator: make a proposer available as ``proposer: <key>`` in a method YAML."""

    def wrap(cls: type[Proposer]) -> type[Proposer]:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method {key!r} registered twice")
        cls.key = key
        _REGISTRY[key] = cls
        return cls

    return wrap


def registry() -> dict[str, type[Proposer]]:
    import methods  # noqa: F401  (imports every module in methods/, which registers it)

    return dict(_REGISTRY)


RESERVED_KEYS = ("name", "proposer")


def build_proposer(method_cfg: dict, env: MethodEnv) -> Proposer:
    """Instantiate the proposer named by ``method_cfg['proposer']`` with the remaining keys."""
    cfg = dict(method_cfg)
    key = cfg.get("proposer")
    known = registry()
    if key not in known:
        raise UserError(f"method config names proposer {key!r}; registered: {sorted(known)}")
    cls = known[key]
    knobs = {k: v for k, v in cfg.items() if k not in RESERVED_KEYS}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(knobs) - set(params)) if not takes_any else []
    if unknown:
        allowed = sorted(p for p in params if p not in ("self", "env"))
        raise UserError(f"method {cfg.get('name', key)!r}: unknown setting(s) {unknown}; allowed: {allowed}")
    try:
        inspect.signature(cls).bind(env, **knobs)  # a missing setting is a config mistake
    except TypeError as err:
        raise UserError(f"method {cfg.get('name', key)!r}: {err}") from None
    try:
        return cls(env, **knobs)
    except SettingError as err:  # only a refused setting reads as one line; any other error is a bug: traceback
        raise UserError(f"method {cfg.get('name', key)!r}: {err}") from None
