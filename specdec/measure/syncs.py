"""Host synchronisations per verify step, counted on the CPU (issue 21, item 6).

On a GPU every value the host reads from the device (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``), every tensor built from Python data on the device (``torch.tensor(list, device=...)``, indexing a
device tensor with a Python list) and every op whose output size depends on the data (``nonzero``, boolean
indexing) stalls the host until the device catches up, or waits on a copy. Beside a 25 ms target forward a
handful per step is noise; beside a 1-2 ms forward they are the harness's overhead. A CPU has no device, so
this module *emulates* one: it tags every tensor as living either on the host or on the device and counts
the events that would cross between them on a GPU.

The CPU proxy, precisely (what showed up in the dispatch stream on torch 2.13):

* **device tensors** are every tensor not known to be on the host: model weights, caches, logits, and every
  factory call given a ``device`` that is a ``torch.device`` object or a non-"cpu" string (code that runs on
  a GPU passes ``model.device`` / ``env.device``).
* **host tensors** are made by factory calls without a ``device`` or with the *string* ``"cpu"`` (on a GPU
  they are CPU tensors), ``torch.from_numpy`` (seen as ``aten.lift_fresh``), ``.cpu()`` / ``.to("cpu")``, and
  every op whose tensor inputs are all host tensors. ``.numpy()`` of a device tensor would fail on CUDA: it
  is counted as a read and recorded as a violation.
* counted kinds (``KINDS``):
  ``scalar``  ``aten._local_scalar_dense`` (``item``, ``int``, ``float``, ``bool``, indexing with a 0-dim tensor),
              ``aten.equal`` and ``aten.is_nonzero`` on a device tensor;
  ``tolist``  ``Tensor.tolist`` of a device tensor (on the CPU it never reaches the dispatcher, so the
              ``TorchFunctionMode`` half sees it);
  ``to_host`` ``.cpu()`` / ``.to("cpu")`` / ``.numpy()`` of a device tensor, a device tensor copied into a host
              tensor (``copy_`` / ``index_put_``);
  ``upload``  ``torch.tensor`` / ``torch.as_tensor`` of Python data placed on the device, ``.to(device)`` of a
              host tensor, a device tensor indexed with a host index (a Python list becomes one:
              ``aten.lift_fresh``) or written from a non-scalar host tensor;
  ``data_dependent``  ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` by a tensor, boolean
              indexing of a device tensor.
  Free: Python scalars written into device tensors (a fill kernel with an immediate, no copy), 0-dim host
  tensors in device ops (CUDA takes CPU scalars), ``torch.full(..., device=...)``.
* **violations**: an op (other than indexing and copies, which move data implicitly) mixing a host tensor
  of rank >= 1 with a device tensor would raise on CUDA; each is recorded with its call site. This is how
  a CPU test checks that trees reach the model on its device (``Target.place``).

The counts are an upper bound in one respect: a host-side helper computed with *device* tensors (e.g. a top-k
over a tensor built with ``device=env.device``) counts as device work, as it would be on a GPU.

``host_syncs(model, proposer, prompt_ids, max_new_tokens)`` runs one greedy generation through
``specdec.verify.decode.generate`` and returns the count per verify step (a step starts at ``propose`` and
ends before the next ``propose``; the prefill, ``begin`` and ``end`` are reported apart).
"""

from __future__ import annotations

import statistics
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("scalar", "tolist", "to_host", "upload", "data_dependent")

aten = torch.ops.aten
_SCALAR_READS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero}
_DATA_DEPENDENT = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                   aten.argwhere}
_INDEX_READS = {aten.index}
_WRITES = {aten.copy_, aten.index_put_, aten.index_put, aten._index_put_impl_}
_FREE_MIXING = _INDEX_READS | _WRITES | {aten.lift_fresh, aten.repeat_interleave}
_DATA_FACTORIES = {torch.tensor, torch.as_tensor}
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.eye, torch.rand, torch.randn,
              torch.randint, torch.randperm, torch.linspace, torch.scalar_tensor, torch.tril_indices,
              torch.triu_indices}
_T = torch._C.TensorBase
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())


def _names_device(device) -> bool:
    """Whether a ``device`` argument places a tensor on the (emulated) device: a ``torch.device`` object or a
    non-cpu string does; None or the string "cpu" does not."""
    if device is None:
        return False
    if isinstance(device, str):
        return not device.startswith("cpu")
    return True


def _tensors(*trees) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(list(trees))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _call_site() -> str:
    """file:line (function) of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_TORCH_DIR) and name != _THIS_FILE:
            short = "/".join(Path(name).parts[-2:])
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class SyncCounter:
    """Counts emulated host<->device synchronisations into buckets: ``setup`` until ``new_step``, then one
    bucket per step, ``end`` after ``finish``. Use as a context manager (it enters both torch modes)."""

    def __init__(self, sites: bool = True):
        self._host: dict[int, weakref.ref] = {}   # id -> weak reference of every host-tagged tensor alive
        self.setup: Counter = Counter()
        self.steps: list[Counter] = []
        self.end: Counter = Counter()
        self.current: Counter = self.setup
        self.sites: Counter = Counter()          # (kind, call site) over the steps
        self.violations: list[str] = []
        self.record_sites = sites
        self.paused = 0
        self._modes = (_FunctionHalf(self), _DispatchHalf(self))

    # ------------------------------------------------------------------ buckets
    def new_step(self) -> None:
        self.steps.append(Counter())
        self.current = self.steps[-1]

    def finish(self) -> None:
        self.current = self.end

    def step_totals(self) -> list[int]:
        return [sum(c[k] for k in KINDS) for c in self.steps]

    # ------------------------------------------------------------------ tags
    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def mark(self, t, host: bool) -> None:
        if not isinstance(t, torch.Tensor):
            return
        key = id(t)
        if host:
            self._host[key] = weakref.ref(t, lambda _, key=key, table=self._host: table.pop(key, None))
        elif self.is_host(t):
            del self._host[key]

    def count(self, kind: str) -> None:
        if self.paused:
            return
        self.current[kind] += 1
        if self.record_sites and self.current is not self.setup and self.current is not self.end:
            self.sites[(kind, _call_site())] += 1

    def violation(self, what: str) -> None:
        if not self.paused:
            self.violations.append(f"{what} at {_call_site()}")

    # ------------------------------------------------------------------ modes
    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _FunctionHalf(TorchFunctionMode):
    """Python-level calls: factories (their ``device`` argument), ``tolist``, ``cpu``/``to``/``numpy``."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.c
        if func in _FACTORIES or func in _DATA_FACTORIES:
            on_device = _names_device(kwargs.get("device"))
            from_python = func in _DATA_FACTORIES and not (args and isinstance(args[0], torch.Tensor))
            if on_device and from_python:
                c.count("upload")
            c.mark(out, host=not on_device)
        elif func is _T.tolist:
            if not c.is_host(args[0]):
                c.count("tolist")
        elif func is _T.numpy:
            if not c.is_host(args[0]):
                c.count("to_host")
                c.violation("numpy() of a device tensor")
        elif func is _T.cpu:
            out = self._move(args[0], out, host=True)
        elif func is _T.cuda:
            out = self._move(args[0], out, host=False)
        elif func is _T.to:
            dest = _to_destination(args[1:], kwargs, c)
            if dest is not None:
                out = self._move(args[0], out, host=dest == "host")
        return out

    def _move(self, source: torch.Tensor, out: torch.Tensor, host: bool) -> torch.Tensor:
        c = self.c
        was_host = c.is_host(source)
        if was_host == host:
            return out
        c.count("to_host" if host else "upload")
        if out is source:  # a no-op move on the CPU: a new tensor object, so the tags can differ
            with torch._C.DisableTorchFunction():
                out = source.view_as(source)
        c.mark(out, host=host)
        return out


def _to_destination(args, kwargs, c: SyncCounter) -> Optional[str]:
    """``Tensor.to``'s destination: "host", "device" or None (a dtype change only)."""
    candidates = list(args) + [kwargs.get("device")]
    for a in candidates:
        if isinstance(a, torch.Tensor):
            return "host" if c.is_host(a) else "device"
        if isinstance(a, (str, torch.device)):
            return "device" if _names_device(a) else "host"
    return None


class _DispatchHalf(TorchDispatchMode):
    """aten ops: scalar reads, data-dependent shapes, implicit copies, mixing, and host-tag propagation."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c, packet = self.c, func.overloadpacket
        if packet is aten.lift_fresh:  # Python data turned into a tensor (torch.tensor, from_numpy, list indices)
            c.mark(out, host=True)
            return out
        inputs = _tensors(args, kwargs)
        device_in = [t for t in inputs if not c.is_host(t)]
        host_in = [t for t in inputs if c.is_host(t) and t.dim() > 0]
        if device_in:
            if packet in _SCALAR_READS:
                c.count("scalar")
            elif packet in _DATA_DEPENDENT or (packet is aten.repeat_interleave and len(device_in) == len(inputs)):
                c.count("data_dependent")
            elif packet in _INDEX_READS | _WRITES and _has_bool_index(args):
                c.count("data_dependent")
        if host_in and device_in:
            self._crossing(packet, args, host_in)
        if inputs and not device_in:
            for t in _tensors(out):
                c.mark(t, host=True)
        return out

    def _crossing(self, packet, args, host_in) -> None:
        """An op with host (rank >= 1) and device tensors: an implicit copy, or a violation."""
        c = self.c
        dest_host = isinstance(args[0], torch.Tensor) and c.is_host(args[0])
        if packet in _INDEX_READS:
            c.count("upload" if not dest_host else "to_host")
        elif packet in _WRITES:
            c.count("to_host" if dest_host else "upload")
        elif packet not in _FREE_MIXING:
            c.violation(f"{packet} mixes host and device tensors")


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


# ---------------------------------------------------------------------------------------------- one generation
class _Bracketed:
    """A proposer seen through the counter: each ``propose`` opens a step's bucket, ``end`` closes the last."""

    def __init__(self, proposer, counter: SyncCounter):
        self._proposer, self._counter = proposer, counter
        self.tree_depths: list[int] = []
        self.draft_forwards: list[int] = []  # drafter forwards per step (draft-model methods), else empty

    def __getattr__(self, name):
        return getattr(self._proposer, name)

    def propose(self, ctx):
        self._counter.new_step()
        drafter = getattr(self._proposer, "drafter", None)
        before = getattr(drafter, "forwards", None)
        tree = self._proposer.propose(ctx)
        if before is not None:
            self.draft_forwards.append(drafter.forwards - before)
        self._counter.paused += 1
        try:  # the tree's depth, without filling its caches (that would hide the syncs they cost)
            parents = tree.parents.tolist()
            depth = [0] * len(parents)
            for i, p in enumerate(parents[1:], start=1):
                depth[i] = depth[p] + 1
            self.tree_depths.append(max(depth))
        finally:
            self._counter.paused -= 1
        return tree

    def observe(self, step):
        return self._proposer.observe(step)

    def end(self, ctx):
        self._counter.finish()
        return self._proposer.end(ctx)


def count_generation(target, proposer, prompt_ids: list[int], max_new_tokens: int, rule=None,
                     stop_ids: frozenset = frozenset(), sites: bool = True):
    """Run ``generate`` under a ``SyncCounter``; returns (Generation, counter, the bracketed proposer, which
    holds each step's tree depth and drafter forwards)."""
    from specdec.verify.acceptance import Greedy
    from specdec.verify.decode import Stopwatch, generate

    counter = SyncCounter(sites=sites)
    bracketed = _Bracketed(proposer, counter)
    proposer.reset("turn")
    with counter:
        gen = generate(target, bracketed, list(prompt_ids), max_new_tokens, frozenset(stop_ids), rule or Greedy(),
                       Stopwatch(target.device))
    return gen, counter, bracketed


def summarise(counter: SyncCounter, bracketed: _Bracketed) -> dict:
    """The counts of one generation: per step, mean, max, per kind (mean per step), per draft depth (the
    deepest node of the step's tree; root-only steps count as depth 1), drafter forwards per step."""
    per_step = counter.step_totals()
    n = max(len(per_step), 1)
    by_kind = {k: sum(c[k] for c in counter.steps) / n for k in KINDS}
    tree_depths = bracketed.tree_depths
    depths = [max(d, 1) for d in tree_depths]
    per_depth = [s / d for s, d in zip(per_step, depths)]
    sites = {f"{kind} {site}": count / n for (kind, site), count in counter.sites.most_common()}
    return {"per_step": per_step, "mean": sum(per_step) / n, "max": max(per_step, default=0), "by_kind": by_kind,
            "steps": len(per_step), "tree_depths": tree_depths, "draft_forwards": bracketed.draft_forwards,
            "mean_per_depth": statistics.fmean(per_depth) if per_depth else 0.0,
            "max_per_depth": max(per_depth, default=0.0),
            "setup": dict(counter.setup), "end": dict(counter.end), "sites": sites,
            "violations": list(dict.fromkeys(counter.violations))}


def host_syncs(model, proposer, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """One greedy generation of ``proposer`` on ``model`` through ``specdec.verify.decode.generate``, counted
    (CPU proxy, module docstring). Returns {"per_step": [int, ...], "mean": float, "max": int, "by_kind":
    {kind: mean per step}, ...} plus the step count, each step's tree depth and drafter forwards, the count per
    draft depth, the prefill/begin (``setup``) and ``end`` counts, the call sites (mean per step), any
    violations and the generated ids."""
    from specdec.verify.target import Target

    gen, counter, bracketed = count_generation(Target(model), proposer, prompt_ids, max_new_tokens)
    return {**summarise(counter, bracketed), "output_ids": gen.output_ids}
