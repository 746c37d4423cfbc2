"""Target back ends: *how* the target's forward runs, never *what* it computes (issue 13).

The verify forward is the whole cost model (speedup = MAT x t(1) / (t(N) + draft time)), so the
kernel path of the target decides the CPU ranking as much as the methods do. A back end wraps the
loaded transformers model in place; no modeling code is forked, and the tree mask, explicit
positions and KV compaction of ``specdec.verify.target.Target`` run unchanged on every back end. The AR
baseline and every method share one ``Target`` and so one back end: paired ratios stay fair.

* ``eager``  - transformers as loaded (MKL GEMMs on CPU, cuBLAS on CUDA): Spec-Bench's baseline.
* ``onednn`` - CPU: every ``nn.Linear`` becomes ``PackedLinear``, its weight reordered once into
  oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied by
  ``torch.ops.mkldnn._linear_pointwise`` - the weight prepacking that inductor's CPU ``freezing``
  does, without a compile step - for forwards of several tokens (trees, prefill). MKL's small-M
  GEMMs are the expensive part of a tree forward (issue 13: 2x at M=2, 3x at M=4 on the MLP
  matrices; here on an AVX2 EPYC 6x at M=16 on the 576x1536 one), oneDNN's stay close to the M=1
  cost. One-token forwards (AR, prefill-free steps) take, per weight shape, whichever kernel was
  faster when the model was loaded (``tune_one_row``, at the run's thread count): on the AVX2 EPYC
  at 2 threads oneDNN won for the 1536x576 MLP matrices (1.6x), the LM head (1.8x) and, narrowly, the
  576x576 ones, MKL's GEMV for the rest; at 1 thread runs picked MKL for every shape, or oneDNN for the
  LM head and at times the 1536x576 ones (the choice follows the timing of the moment). It is logged and
  recorded (``one_row_kernels`` in ``summary.env`` and latency profiles). fp32; bf16 where oneDNN
  supports it on this CPU (``onednn_supports``: AVX512-BF16/AVX-NE-CONVERT or AVX512BW).
  Cost: the weights are held twice (original + packed), e.g. 1.08 GB instead of 0.54 GB for SmolLM2.
* ``compile`` - ``torch.compile`` of the model's forward with dynamic shapes (growing cache, trees of
  any size); on CPU with inductor's ``freezing`` (weights constant-folded and prepacked), on CUDA
  the default mode (CUDA graphs need a static cache, which ``Target.commit`` cannot compact: not
  used). ``Runner`` compiles through ``warm`` before anything is timed and logs how long it took.
  Measured on the AVX2 EPYC (2 threads, quiet machine, two runs): 346 / 689 s of compiling; t(1) 54.5 /
  63.8 ms against onednn's 50.3 / 65.2; t(16)/t(1) 1.29 / 1.38 against 1.62 / 1.69; once compiled, AR at
  1.21x ``generate`` against onednn's 1.11x; greedy output identical. Not the CPU default: every process
  pays minutes of compiling, longer than a ``spec_bench_mini`` run decodes. Its tests run under the ``gpu``
  marker (a CPU compile takes minutes).
* ``auto``   - ``onednn`` on CPU where oneDNN supports the dtype (measured fastest path whose fp32 greedy
  output stays identical to AR), else ``eager``; ``eager`` on CUDA (fp16 cuBLAS GEMMs already keep
  t(N) flat for small N there, and Spec-Bench's numbers are eager).

Batch invariance: neither MKL nor oneDNN gives bit-identical rows for M = 1 and M = N (different
blocking, different summation order; measured on a 576x1536 fp32 matrix, M = 16 vs 1), on any back
end. Greedy equality with AR is therefore a property of the argmax (fp32 logit differences are
~1e-4, far below real top-2 gaps), tested on real prompts in ``tests/test_backends.py``.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "onednn", "compile")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``auto`` -> the measured default of ``device``; check that the back end runs there."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "onednn" if device.type == "cpu" and onednn_supports(dtype) else "eager"
    if name == "onednn" and device.type != "cpu":
        raise UserError(f"backend=onednn runs on CPU only (device is {device}); use backend=eager or auto")
    if name == "onednn" and not onednn_supports(dtype):
        raise UserError(f"backend=onednn: this CPU's oneDNN cannot prepack {str(dtype).removeprefix('torch.')} "
                        f"weights (bf16 needs AVX512-BF16, AVX-NE-CONVERT or AVX512BW); use backend=eager or float32")
    return name


_SUPPORTED: dict[torch.dtype, bool] = {}


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack and run ``dtype`` linears on this CPU (tried once on a 16x16 weight)."""
    if dtype not in _SUPPORTED:
        try:
            weight = torch.ones(16, 16, dtype=dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), packed, None, "none", [], "")
            _SUPPORTED[dtype] = torch.backends.mkldnn.is_available()
        except RuntimeError:
            _SUPPORTED[dtype] = False
    return _SUPPORTED[dtype]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on x86 (otherwise oneDNN emulates bf16 through fp32, slower than fp32)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is prepacked for oneDNN (CPU inference of several rows at once).

    ``weight`` (and ``bias``) stay the original parameters, so tied embeddings, ``state_dict`` and
    code reading ``lm_head.weight`` see the model unchanged; ``packed`` is an opaque oneDNN copy.
    With autograd active (e.g. training an adapter through the frozen head) it falls back to
    ``F.linear``: oneDNN's packed op has no backward. A single row takes ``one_row_kernel``: ``mkl``
    (``F.linear``, eager's GEMV bit for bit; the default) or ``onednn`` (set by ``tune_one_row``).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.one_row_kernel = "mkl"
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)  # [out, in], blocked

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        one_row = x.numel() == self.in_features
        if (one_row and self.one_row_kernel == "mkl") or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"PackedLinear: input {x.dtype} vs weight {self.weight.dtype}")
        return self.onednn(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def onednn(self, x: torch.Tensor) -> torch.Tensor:  # x [M, in] -> [M, out] through the packed weight
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a ``PackedLinear`` in place; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


@torch.inference_mode()
def tune_one_row(model: nn.Module, repeats: int = 7) -> dict[str, str]:
    """Per weight shape of the ``PackedLinear`` layers: time one row through every layer of that shape
    (weights streamed from memory, as in a forward) with MKL's GEMV and with the packed oneDNN weight,
    alternately, ``repeats`` times; the faster median serves one-row forwards. Returns {"outxin": kernel}."""
    groups: dict[tuple[int, int], list[PackedLinear]] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            groups.setdefault((module.out_features, module.in_features), []).append(module)
    choice = {}
    for (n_out, n_in), layers in groups.items():
        x = torch.randn(1, n_in, dtype=layers[0].weight.dtype, device=layers[0].weight.device)
        kernels = {"mkl": lambda: [F.linear(x, m.weight, m.bias) for m in layers],
                   "onednn": lambda: [m.onednn(x) for m in layers]}
        times: dict[str, list[float]] = {k: [] for k in kernels}
        for _ in range(repeats):
            for kernel, run in kernels.items():
                start = time.perf_counter()
                run()
                times[kernel].append(time.perf_counter() - start)
        best = min(times, key=lambda k: sorted(times[k])[repeats // 2])
        for m in layers:
            m.one_row_kernel = best
        choice[f"{n_out}x{n_in}"] = best
    return choice


def one_row_kernels(model: nn.Module) -> dict[str, str] | None:
    """The one-row kernel per weight shape chosen at load (onednn back end), else None."""
    return getattr(model, "specdec_one_row", None)


def apply_backend(model: nn.Module, name: str) -> nn.Module:
    """Put ``model`` (eval mode, final device and dtype) on back end ``name``; returns the same model."""
    device = next(model.parameters()).device
    name = resolve_backend(name, device, model.dtype)
    model.specdec_backend = name  # read by Target, runner.environment and analysis.latency
    if name == "onednn":
        log.info("backend onednn: %d linears prepacked", pack_linears(model))
        model.specdec_one_row = tune_one_row(model)
        log.info("backend onednn: one-row kernels at %d threads: %s", torch.get_num_threads(), model.specdec_one_row)
    elif name == "compile":
        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold + prepack the (frozen) weights
        model.forward = _as_inference_inputs(torch.compile(model.forward, dynamic=True))
        log.info("backend compile: torch.compile(dynamic=True) on %s; compiles during warm-up", device.type)
    return model


def _as_inference_inputs(forward):
    """Under inference mode, pass tensors made outside it (a draft tree's tokens) as inference tensors: dynamo
    guards on the dispatch keys, which differ between the two kinds, and would otherwise compile each graph
    twice (seen: a 2-minute recompile inside a timed step). The copies are a few token ids."""
    def call(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) and not v.is_inference() else v
                      for k, v in kwargs.items()}
        return forward(*args, **kwargs)
    return call


def backend_of(model: nn.Module) -> str:
    return getattr(model, "specdec_backend", "eager")
