"""Latency profile of one verify forward, and a cost model that predicts speedup from MAT.

A speculative step costs one target forward over N tokens (the draft tree, root included) plus the
proposer's time; it commits MAT tokens on average. Autoregressive decoding costs one forward over
one token per token. So, ignoring prefill and bookkeeping,

    predicted speedup = MAT * t(1) / (mean_steps t(N_step) + draft_time_per_step)

where ``t`` is the measured latency profile of the target on a device. MAT is (almost) a property
of the method and the text, not of the device, so a MAT measured on CPU predicts the speedup on
any device whose profile you measured (docs/spec_bench.md §5 row 10).

Measure a profile (one forward of N = 1..128 new tokens at a fixed context, through the verifier's
own ``Target.score``, cache cropped back after every call, median of repeats):

    python -m analysis.latency profile --threads 1 --out runs/latency/cpu-smollm2-135m.json
    python -m analysis.latency profile --model HuggingFaceTB/SmolLM2-135M-Instruct --device cuda \
        --out runs/latency/a100-smollm2-135m.json       # dtype auto: float16 on CUDA, float32 on CPU

Every profile records its back end (``--backend``, specdec/backends.py) and the memory roofline: the
bytes of weights one forward reads / the read bandwidth measured right before (a torch sum over 256 MB
with the same threads). t(1) / roofline says how far the one-token step is from the hardware's limit;
``python -m analysis.latency table runs/latency/*.json`` prints it per profile (``profile_table``).

Predict and check (``make figures`` does this for every stored profile):

    from analysis import Profile, predict_speedup, check_predictions, load_runs
    profile = Profile.load("runs/latency/cpu-smollm2-135m.json")
    predict_speedup(profile, mat=2.4, tree_size=17)
    check_predictions(load_runs("runs"), profile)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from specdec import EMBEDDED_MODEL
from specdec.running.results import cost_split
from specdec.verify.profile import Profile

EMBEDDED = EMBEDDED_MODEL
DEFAULT_NS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128)


# --------------------------------------------------------------------------------------------
# The profile and the predictor
# --------------------------------------------------------------------------------------------

def predict_speedup(profile: Profile, mat: float, tree_size: float | Sequence[float],
                    draft_time_per_step: float = 0.0) -> float:
    """MAT * t(1) / (t(N) + draft_time_per_step), times in seconds.

    ``tree_size`` is the number of tokens per verify forward (root included, as ``tree_sizes`` in
    answers.jsonl): a number, or the per-step sizes of a run (then t(N) is averaged over steps, which
    is exact for the time of a run whose tree size varies from step to step)."""
    sizes = np.atleast_1d(np.asarray(tree_size, dtype=float))
    verify = float(np.mean(profile.t(sizes)))
    return float(mat) * profile.t(1) / (verify + draft_time_per_step)


def check_predictions(df: pd.DataFrame, profile: Profile, stats: pd.DataFrame | None = None) -> pd.DataFrame:
    """Predicted vs measured speedup per run and task (6 tasks + overall).

    ``df``: question-turn rows from ``load_runs`` (method runs; AR rows are dropped).
    ``stats``: per-run stats with the measured ``speedup`` (default: ``run_stats(df)``, paired
    baselines); pass ``speedup_vs(...)`` to check against a separate AR run.

    Columns: ``predicted`` (cost model, spec formula), ``speedup`` (Spec-Bench speedup, measured),
    ``error`` = predicted / measured - 1; and the same for ``decode_speedup`` (Σ tokens / Σ time with the
    prefill time removed from both sides, which is what the model describes) as ``decode_error``.
    ``predicted`` is on *this* profile: with a profile measured on another device it reads the runs'
    MAT and tree sizes as that device's expected speedup (``speedup`` stays this machine's).

    In-situ columns (this machine, no profile; ``specdec.running.results.cost_split``, also in every summary.json):
    ``verify_ratio`` = the method's verify time per step / the paired AR's verify time per step (t(N)/t(1) as
    the run saw it), ``bound`` = MAT / verify_ratio (the speedup if drafting, commits and bookkeeping were free)
    and ``efficiency`` = decode_speedup / bound: what the harness and the proposer lose.
    """
    from .tables import TASK_ORDER, run_stats, task_slices

    df = df[df["proposer"] != "ar"]
    if stats is None:
        stats = run_stats(df)
    if df.empty or stats.empty:
        return pd.DataFrame()
    rows = []
    for (run, task), part in ((key, part) for run, run_df in df.groupby("run", sort=False)
                              for key, part in task_slices(run_df, run)):
        accepts = [a for lst in part["accept_lengths"] for a in lst]
        sizes = [s for lst in part["tree_sizes"] for s in lst]
        if not accepts or not sizes:
            continue
        steps = len(accepts)
        draft = part["draft_time"].sum() / steps
        mat = float(np.mean(accepts))
        total = lambda col: float(part[col].fillna(0).sum()) if col in part else 0.0  # noqa: E731
        split = cost_split(mat, total("new_tokens"), steps, total("wall_time") - total("prefill_time"),
                           total("verify_time"), total("baseline.new_tokens"), total("baseline.decoding_steps"),
                           total("baseline.wall_time") - total("baseline.prefill_time"), total("baseline.verify_time"))
        label = part["label"].iloc[0] if "label" in part else part["method"].iloc[0]
        rows.append({"run": run, "task": task, "method": part["method"].iloc[0], "label": label,
                     "mat": mat, "mean_tree_size": float(np.mean(sizes)), "draft_ms_per_step": 1000 * draft,
                     "predicted": predict_speedup(profile, mat, sizes, draft),
                     **{k: np.nan if v is None else v for k, v in split.items()}})
    pred = pd.DataFrame(rows)
    if pred.empty:
        return pred
    pred = pred.merge(stats[["run", "task", "speedup"]], on=["run", "task"], how="left")
    pred["error"] = pred["predicted"] / pred["speedup"] - 1
    pred["decode_error"] = pred["predicted"] / pred["decode_speedup"] - 1
    pred["profile"] = profile.name
    pred["task"] = pd.Categorical(pred["task"], categories=[t for t in TASK_ORDER if t in set(pred["task"])])
    return pred.sort_values(["label", "run", "task"]).reset_index(drop=True)


def profile_table(profiles: Sequence[Profile], ns: Sequence[int] = (2, 4, 8, 16, 32, 64)) -> pd.DataFrame:
    """One row per profile: back end, dtype, threads, t(1) in ms, the roofline and t(1) as a multiple of
    it, and t(N)/t(1) for ``ns`` (the verify cost in AR steps)."""
    rows = []
    for prof in profiles:
        t1, roof = prof.t(1), prof.roofline
        row = {"profile": prof.name, "backend": prof.meta.get("backend", "eager"), "dtype": prof.meta.get("dtype"),
               "threads": prof.meta.get("threads"), "t1_ms": 1000 * t1,
               "roofline_ms": 1000 * roof if roof else np.nan, "t1_over_roofline": t1 / roof if roof else np.nan}
        row.update({f"t{n}/t1": prof.t(n) / t1 for n in ns if n <= max(prof.n)})
        rows.append(row)
    return pd.DataFrame(rows)


def prediction_error(check: pd.DataFrame) -> dict:
    """Summary of a ``check_predictions`` frame: mean absolute relative error (overall rows)."""
    overall = check[check["task"] == "overall"]
    if overall.empty:
        return {"runs": 0}
    return {"runs": int(len(overall)),
            "mean_abs_error": float(overall["error"].abs().mean()),
            "max_abs_error": float(overall["error"].abs().max()),
            "mean_error": float(overall["error"].mean()),
            "mean_abs_decode_error": float(overall["decode_error"].abs().mean())}


# --------------------------------------------------------------------------------------------
# Measuring a profile
# --------------------------------------------------------------------------------------------

def _context_ids(tokenizer, n_tokens: int) -> list[int]:
    """Real text for the cache: Spec-Bench questions concatenated until long enough."""
    try:
        from tasks import SPEC_BENCH
        texts = [t for line in SPEC_BENCH.read_text().splitlines() if line.strip()
                 for t in json.loads(line)["turns"]]
    except Exception:  # noqa: BLE001 - any readable text will do
        texts = ["The quick brown fox jumps over the lazy dog. " * 50]
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    while len(ids) < n_tokens:
        ids += ids
    return ids[:n_tokens]


def weight_bytes(model) -> int:
    """Bytes of weights one forward reads: every parameter once (a tied head counted once), minus an
    untied input embedding (a forward reads only its rows)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embed.weight.data_ptr() != head.weight.data_ptr():
        total -= embed.weight.numel() * embed.weight.element_size()
    return total


def read_bandwidth(device, megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes per second of a streaming read (``torch.sum`` over ``megabytes``), median of ``repeats``."""
    import torch

    from specdec.verify.decode import Stopwatch

    clock = Stopwatch(device)
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        start = clock()
        x.sum()
        times.append(clock() - start)
    return x.numel() * 4 / statistics.median(times)


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_profile(model_path: str = EMBEDDED, context: int = 256, ns: Iterable[int] = DEFAULT_NS,
                    device: str = "cpu", dtype: str = "auto", threads: int | None = 1, repeats: int = 9,
                    warmup: int = 2, attn_implementation: str = "sdpa", backend: str = "eager") -> dict:
    """Median latency of ``Target.score`` (the verify forward, tree mask included) per N, on ``backend``, in
    ``dtype`` (``auto``: float16 on CUDA as Spec-Bench's runs, float32 on CPU; ``specdec.models.resolve_dtype``),
    with the roofline (weight bytes / read bandwidth measured just before the timed calls). ``threads`` holds
    only for this call (the caller's thread count is restored)."""
    from specdec.models import torch_threads

    with torch_threads(threads):
        return _profile(model_path, context, ns, device, dtype, repeats, warmup, attn_implementation, backend)


def _profile(model_path, context, ns, device, dtype, repeats, warmup, attn_implementation, backend) -> dict:
    import torch
    import transformers
    from tqdm import tqdm

    from specdec.backends import one_row_kernels
    from specdec.verify.decode import Stopwatch
    from specdec.models import load_model, resolve_device, resolve_dtype
    from specdec.verify.target import Target
    from specdec.verify.tree import DraftTree

    dev = resolve_device(device)
    model, tok = load_model(model_path, dev, resolve_dtype(dtype, dev), attn_implementation, backend=backend)
    ns = sorted(set(int(n) for n in ns))
    ids = _context_ids(tok, context + 1 + max(ns))
    target, clock = Target(model), Stopwatch(dev)
    target.prefill(ids[:context + 1])           # cache = context tokens; ids[context] is the root
    assert target.cache_len == context
    trees = {n: DraftTree.chain(ids[context], ids[context + 1:context + n], device=dev) for n in ns}

    def forward(n: int) -> float:
        start = clock()
        target.score(trees[n])
        elapsed = clock() - start
        target.cache.crop(-(target.cache_len - context))  # back to the same context for the next call
        return elapsed

    warm_start = time.time()
    for n in ns:
        for _ in range(warmup):
            forward(n)
    warm_s = time.time() - warm_start  # includes compilation for backend=compile
    bandwidth, n_bytes = read_bandwidth(dev), weight_bytes(model)
    times: dict[int, list[float]] = {n: [] for n in ns}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.time()
    # Round-robin over N (not N by N), so slow drifts in machine load spread over every N alike.
    for _ in tqdm(range(repeats), desc="latency profile", file=sys.stderr):
        for n in ns:
            times[n].append(forward(n))
    return {
        "schema_version": 1,
        "model": model_path, "context": context, "device": dev.type, "device_name": _device_name(dev),
        "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "attn_implementation": attn_implementation, "backend": target.backend, "repeats": repeats, "warmup": warmup,
        "one_row_kernels": one_row_kernels(model),
        "warmup_s": round(warm_s, 1), "weight_bytes": n_bytes, "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "roofline_ms": round(1000 * n_bytes / bandwidth, 3),
        "call": "specdec.verify.target.Target.score(DraftTree.chain) with a 4D float tree mask; cache cropped back after each call",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "loadavg_1min_before": load_before, "duration_s": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "n": ns,
        "median_ms": [round(1000 * statistics.median(times[n]), 3) for n in ns],
        "min_ms": [round(1000 * min(times[n]), 3) for n in ns],
        "all_ms": [[round(1000 * t, 3) for t in times[n]] for n in ns],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.latency", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="measure one target forward's latency for N = 1..max-n new tokens")
    prof.add_argument("--model", default=EMBEDDED, help="model path / hub id / embedded:<pkg>/<file.gguf>")
    prof.add_argument("--context", type=int, default=256, help="tokens in the KV cache before each forward")
    prof.add_argument("--max-n", type=int, default=128, help="largest number of new tokens per forward")
    prof.add_argument("--ns", type=int, nargs="*", default=None, help="explicit N values (overrides the default grid)")
    prof.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    prof.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    prof.add_argument("--backend", default="eager", help="eager, onednn, compile, auto (specdec/backends.py)")
    prof.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    prof.add_argument("--repeats", type=int, default=9, help="timed calls per N (median reported)")
    prof.add_argument("--warmup", type=int, default=2, help="untimed calls per N first")
    prof.add_argument("--out", default=None, help="JSON path (default runs/latency/<device>.json)")
    table = sub.add_parser("table", help="t(1), the roofline and t(N)/t(1) of stored profiles")
    table.add_argument("profiles", nargs="+")
    pred = sub.add_parser("predict", help="predict a speedup from MAT and tree size on a stored profile")
    pred.add_argument("profile")
    pred.add_argument("--mat", type=float, required=True)
    pred.add_argument("--tree-size", type=float, required=True, help="tokens per verify forward, root included")
    pred.add_argument("--draft-ms", type=float, default=0.0, help="proposer time per step, milliseconds")
    args = parser.parse_args(argv)

    if args.command == "table":
        print(profile_table([Profile.load(p) for p in args.profiles]).to_markdown(index=False, floatfmt=".2f"))
        return 0
    if args.command == "predict":
        profile = Profile.load(args.profile)
        print(f"{predict_speedup(profile, args.mat, args.tree_size, args.draft_ms / 1000):.3f}")
        return 0
    ns = args.ns or [n for n in DEFAULT_NS if n <= args.max_n] + ([args.max_n] if args.max_n not in DEFAULT_NS else [])
    result = measure_profile(args.model, args.context, ns, args.device, args.dtype, args.threads or None,
                             args.repeats, args.warmup, backend=args.backend)
    out = Path(args.out or f"runs/latency/{result['device']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    rel = [round(ms / result["median_ms"][0], 2) for ms in result["median_ms"]]
    print(f"wrote {out} (backend {result['backend']}, roofline {result['roofline_ms']:.1f} ms at "
          f"{result['read_bandwidth_GBps']} GB/s: t(1) = {result['median_ms'][0] / result['roofline_ms']:.2f}x it)")
    print("\n".join(f"  N={n:4d}  {ms:8.1f} ms  x{r}" for n, ms, r in zip(result["n"], result["median_ms"], rel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
