"""analysis/bench_figures.py: multi-draft MAT vs K and L, MAT-only sweeps, calibration, training curves, and
the sampling settings split by top_p -- on small synthetic run dirs written here (layout of run.py's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import bench_figures as bf
from analysis import load_runs
from analysis.tables import speedup_stats
from analysis.__main__ import build
from analysis.token_acceptance import summarize as summarize_acceptance

# question -> (task, category); accept lengths are chosen per run, one turn per question
QUESTIONS = {81: ("mt_bench", "writing"), 161: ("translation", "translation"), 321: ("qa", "qa")}


def write_run(run_dir: Path, method: dict, accepts: dict[int, list[int]], temperature: float = 1.0,
              top_p: float = 1.0, baseline: str = "none", drafter: str = "eagle", method_stats: dict | None = None,
              wall: float = 0.5, base_wall: float = 1.0, backend: str | None = None) -> Path:
    """A finished run dir: .hydra/config.yaml, answers.jsonl (one turn per question), summary.json."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    cfg = {"model": {"name": "tiny"}, "method": method, "drafter": {"name": drafter, "kind": drafter},
           "task": {"name": "spec_bench_mini"}, "temperature": temperature, "top_p": top_p, "top_k": 0, "seed": 0,
           "device": "cpu", "dtype": "float32", "threads": 1, "baseline": baseline, "max_new_tokens": 16,
           "warmup": 0, "warmup_keeps_state": False}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = []
    for i, (q, acc) in enumerate(accepts.items()):
        n = sum(acc)
        rec = {"question_id": q, "task": QUESTIONS[q][0], "category": QUESTIONS[q][1], "tstamp": 1000.0 + i,
               "choices": [{"turns": ["x"], "decoding_steps": [len(acc)], "new_tokens": [n], "wall_time": [wall],
                            "accept_lengths": acc, "output_ids": [list(range(n))], "draft_time": [0.01],
                            "prefill_time": [0.01]}]}
        if baseline == "paired":
            rec["baseline"] = {"decoding_steps": [n], "new_tokens": [n], "wall_time": [base_wall],
                               "accept_lengths": [1] * n, "output_ids": [list(range(n))]}
        records.append(rec)
    (run_dir / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {"device": "cpu", "dtype": "float32", "threads": 1, **({"backend": backend} if backend else {})}
    summary = {"method": method["name"], "env": env,
               "tasks": {"overall": {"mat": sum(map(sum, accepts.values())) / sum(map(len, accepts.values()))}},
               "method_stats": method_stats or {}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def write_sweep(sweep: Path, methods: list[dict], accepts: list[dict], **kw) -> None:
    """A Hydra multirun dir: jobs 0, 1, ... and multirun.yaml."""
    for job, (method, acc) in enumerate(zip(methods, accepts)):
        write_run(sweep / str(job), method, acc, **kw)
    (sweep / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")


def chain(mat: int) -> dict[int, list[int]]:
    """Every question: two steps of ``mat`` tokens (MAT = mat on every task)."""
    return {q: [mat, mat] for q in QUESTIONS}


@pytest.fixture()
def multidraft_root(tmp_path) -> Path:
    md = tmp_path / "runs" / "bench" / "multidraft"
    sps = lambda g: {"name": "sps", "proposer": "sps", "gamma": g}  # noqa: E731
    iid = lambda m, k, length: {"name": m, "proposer": m, "k": k, "length": length}  # noqa: E731
    rsd = lambda b: {"name": "rsd", "proposer": "rsd", "tree": "constant", "branching": b, "beam_width": 4,  # noqa: E731
                     "depth": 4}
    write_sweep(md / "sps", [sps(2), sps(4)], [chain(2), chain(3)])
    # K = 2, L = 2: spectr 3 >= specinfer 3 >= sps 2 holds; K = 4, L = 2: spectr 2 < specinfer 4 (planted)
    write_sweep(md / "iid_L2", [iid("specinfer", 2, 2), iid("specinfer", 4, 2), iid("spectr", 2, 2),
                                iid("spectr", 4, 2)],
                [chain(3), chain(4), chain(3), {81: [2, 2], 161: [2, 2], 321: [2, 2]}])
    write_sweep(md / "rsd_L2", [rsd([2, 1]), rsd([4, 1])], [chain(3), chain(3)])
    write_sweep(md / "rsd_L4", [rsd([8, 1, 1, 1])], [{81: [5, 1], 161: [4], 321: [2, 2, 2]}])
    # not a multi-draft comparison: greedy, or paired with AR
    write_run(tmp_path / "runs" / "greedy_sps", sps(2), chain(1), temperature=0.0)
    write_run(tmp_path / "runs" / "paired_sps", sps(2), chain(1), baseline="paired")
    return tmp_path / "runs"


def test_multidraft_table_reads_k_and_l_of_every_knob_style(multidraft_root):
    table = bf.multidraft_table(load_runs(multidraft_root)).set_index(["method", "K", "L"])
    assert set(table.index) == {("sps", 1, 2), ("sps", 1, 4), ("specinfer", 2, 2), ("specinfer", 4, 2),
                                ("spectr", 2, 2), ("spectr", 4, 2), ("rsd", 2, 2), ("rsd", 4, 2), ("rsd", 8, 4)}
    assert table.loc[("sps", 1, 4), "MAT"] == 3 and table.loc[("specinfer", 4, 2), "MAT"] == 4
    # rsd [8,1,1,1]: (5 + 1 + 4 + 2 * 3) accepted / 6 steps; per task: mt_bench 3, translation 4, qa 2
    row = table.loc[("rsd", 8, 4)]
    assert row["MAT"] == pytest.approx(16 / 6) and row["steps"] == 6 and row["runs"] == 1
    assert (row["MAT MT-bench"], row["MAT Translation"], row["MAT QA"]) == (3, 4, 2)
    assert math.isnan(row["MAT RAG"])
    assert set(table["temperature"]) == {1.0} and set(table["drafter"]) == {"eagle"}
    # turns (5, 1 / 4 / 2, 2, 2): accepted 6, 4, 6 in 2, 1, 3 steps around MAT 16/6
    resid = [6 - 16 / 6 * 2, 4 - 16 / 6, 6 - 16 / 6 * 3]
    assert row["MAT se"] == pytest.approx(math.sqrt(1.5 * sum(r * r for r in resid)) / 6)


def test_multidraft_ordering_flags_a_violation():
    table = pd.DataFrame([
        {"model": "m", "drafter": "d", "temperature": 1.0, "top_p": 1.0, "method": m, "K": k, "L": length, "MAT": v}
        for m, k, length, v in [("sps", 1, 2, 2.0), ("specinfer", 2, 2, 2.5), ("spectr", 2, 2, 2.6),
                                ("specinfer", 4, 2, 2.8), ("spectr", 4, 2, 2.7),   # planted: spectr < specinfer
                                ("specinfer", 2, 4, 1.9), ("spectr", 2, 4, 2.2)]])  # no sps at L = 4
    order = bf.multidraft_ordering(table).set_index(["K", "L"])
    assert order.loc[(2, 2), "holds"] == True  # noqa: E712 (numpy/object bool)
    assert order.loc[(4, 2), "holds"] == False and order.loc[(4, 2), "violated"] == "spectr < specinfer"  # noqa: E712
    assert math.isnan(order.loc[(2, 4), "holds"]) and order.loc[(2, 4), "sps"] != order.loc[(2, 4), "sps"]
    table.loc[table["method"] == "sps", "MAT"] = 2.55  # now specinfer (2.5) < sps at K = 2
    assert bf.multidraft_ordering(table).set_index(["K", "L"]).loc[(2, 2), "violated"] == "specinfer < sps"


def test_mat_standard_error_treats_turns_as_clusters():
    turns = lambda *lengths: pd.DataFrame({"accept_lengths": list(lengths)})  # noqa: E731
    # MAT 8/6; turn residuals 4 - 8/6 * 2 = 4/3 and 4 - 8/6 * 4 = -4/3 -> sqrt(2 * 32/9) / 6 = 4/9
    assert bf.mat_standard_error(turns([2, 2], [1, 1, 1, 1])) == pytest.approx(4 / 9)
    assert bf.mat_standard_error(turns([2, 2], [3, 1], [1, 3])) == 0  # every turn at the pooled MAT
    assert math.isnan(bf.mat_standard_error(turns([2, 2])))


def test_multidraft_ordering_puts_each_gap_over_its_standard_error():
    table = pd.DataFrame([
        {"model": "m", "drafter": "d", "temperature": 1.0, "top_p": 1.0, "method": m, "K": k, "L": 2, "MAT": v,
         "MAT se": e} for m, k, v, e in [("sps", 1, 2.0, 0.03), ("specinfer", 2, 2.5, 0.04), ("spectr", 2, 2.45, 0.03)]])
    row = bf.multidraft_ordering(table).iloc[0]
    assert row["violated"] == "spectr < specinfer" and row["z spectr-specinfer"] == pytest.approx(-1.0)
    assert row["z specinfer-sps"] == pytest.approx(10.0)


def test_make_figures_writes_and_prints_the_multidraft_comparison(multidraft_root, tmp_path, capsys):
    written = build(multidraft_root, tmp_path / "out")
    out = capsys.readouterr().out
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"multidraft/mat_vs_drafts.png", "multidraft/mat_vs_drafts.pdf", "multidraft/ordering.csv"} <= names
    order = pd.read_csv(tmp_path / "out" / "multidraft" / "ordering.csv").set_index(["K", "L"])
    assert bool(order.loc[(2, 2), "holds"]) and not bool(order.loc[(4, 2), "holds"])
    assert "ordering MAT(spectr) >= MAT(specinfer) >= MAT(sps)" in out and "spectr < specinfer" in out


def test_mat_only_sweep_gets_its_table_and_mat_panel(tmp_path, capsys):
    recycle = lambda n: {"name": "recycle", "proposer": "recycle", "tree_nodes": n}  # noqa: E731
    write_sweep(tmp_path / "runs" / "multirun" / "s", [recycle(8), recycle(16), recycle(32)],
                [chain(2), chain(3), {81: [4, 4], 161: [4, 2], 321: [1, 1]}], temperature=0.0)
    written = build(tmp_path / "runs", tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"sweeps/s/sweep_tree_nodes.png", "sweeps/s/mat_by_task.csv", "sweeps/s/spec_bench.csv"} <= names
    mat = pd.read_csv(tmp_path / "out" / "sweeps" / "s" / "mat_by_task.csv", index_col=0)
    assert mat.loc["recycle (tree_nodes=16)", "Overall"] == 3.0
    assert mat.loc["recycle (tree_nodes=32)", "Translation"] == 3.0
    assert mat.loc["recycle (tree_nodes=32)", "Overall"] == pytest.approx(16 / 6, abs=0.005)  # 2 digits
    assert mat.loc["recycle (tree_nodes=32)", "RAG"] == "–"
    table = pd.read_csv(tmp_path / "out" / "sweeps" / "s" / "spec_bench.csv", index_col=0)
    assert (table["Overall"] == "–").all() and table.loc["recycle (tree_nodes=8)", "MAT"] == 2.0
    assert "neither a paired baseline nor a separate AR run" in capsys.readouterr().out


def test_back_ends_are_separate_settings_and_baselines(tmp_path):
    """Runs that differ only in the target's back end get their own tables, and a method run without a
    paired baseline is compared only with an AR run on its own back end (issue 13)."""
    pld, ar = {"name": "pld", "proposer": "pld", "k": 10}, {"name": "ar", "proposer": "ar"}
    write_run(tmp_path / "runs" / "e", pld, chain(2), temperature=0.0, baseline="paired")  # no backend: eager
    write_run(tmp_path / "runs" / "o", pld, chain(3), temperature=0.0, baseline="paired", backend="onednn")
    build(tmp_path / "runs", tmp_path / "out")
    dirs = sorted(p.name for p in (tmp_path / "out").iterdir() if (p / "spec_bench.csv").is_file())
    assert dirs == ["spec_bench_mini_tiny_cpu_float32_1thr_temp0.0",          # eager keeps the old name
                    "spec_bench_mini_tiny_cpu_float32_onednn_1thr_temp0.0"]
    mat = [pd.read_csv(tmp_path / "out" / d / "mat_by_task.csv", index_col=0).loc["pld", "Overall"] for d in dirs]
    assert mat == [2.0, 3.0]

    alone = tmp_path / "alone"
    write_run(alone / "m", pld, chain(2), temperature=0.0, backend="onednn", wall=0.5)
    write_run(alone / "ar_eager", ar, {q: [1] * 4 for q in QUESTIONS}, temperature=0.0, wall=4.0)
    with pytest.warns(UserWarning, match="no baseline run matches"):
        stats = speedup_stats(load_runs(alone))
    assert stats.empty  # the only AR ran on another back end
    write_run(alone / "ar_onednn", ar, {q: [1] * 4 for q in QUESTIONS}, temperature=0.0, wall=1.0, backend="onednn")
    stats = speedup_stats(load_runs(alone))
    overall = stats[(stats["task"] == "overall") & (stats["method"] == "pld")].iloc[0]
    assert overall["baseline_run"].endswith("ar_onednn") and overall["speedup"] == pytest.approx(2.0)


def test_an_unfinished_run_takes_its_env_from_sessions_jsonl(tmp_path):
    """No summary.json yet: device, threads and back end come from the env its process recorded before the first
    question (the config says device=auto, backend=auto), not from a guess."""
    run = write_run(tmp_path / "r", {"name": "pld", "proposer": "pld"}, chain(2), baseline="paired")
    (run / "summary.json").unlink()
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**cfg, "device": "auto", "backend": "auto"}))
    env = {"device": "cpu", "dtype": "float32", "threads": 2, "backend": "eager"}
    sessions = [{"env": {**env, "threads": 1}}, {"env": env}]  # a resumed run: two processes
    (run / "sessions.jsonl").write_text("".join(json.dumps(session) + "\n" for session in sessions))
    df = load_runs(run)
    assert not df["complete"].any()
    assert df.iloc[0][["device", "dtype", "threads", "backend"]].to_dict() == env  # the last session's


def test_a_knob_null_in_one_run_and_set_in_another_names_both_rows(tmp_path):
    """``warm_start: null`` beside ``warm_start=sharegpt`` are two settings with two labels (pandas 3 keeps a
    missing value missing through ``astype(str)``, which once merged them into one label and broke the table)."""
    cold = {"name": "lookahead_cpu", "proposer": "lookahead", "warm_start": None}
    write_run(tmp_path / "runs" / "cold", cold, chain(2), temperature=0.0, baseline="paired")
    write_run(tmp_path / "runs" / "warm", {**cold, "warm_start": "sharegpt"}, chain(3), temperature=0.0,
              baseline="paired")
    build(tmp_path / "runs", tmp_path / "out")
    mat = pd.read_csv(tmp_path / "out" / "spec_bench_mini_tiny_cpu_float32_1thr_temp0.0" / "mat_by_task.csv",
                      index_col=0)["Overall"]
    assert mat.to_dict() == {"lookahead_cpu (warm_start=none)": 2.0, "lookahead_cpu (warm_start=sharegpt)": 3.0}


def test_top_p_splits_sampling_settings_and_mat_per_task_is_tabled(tmp_path):
    pld = {"name": "pld", "proposer": "pld", "k": 10}
    write_run(tmp_path / "runs" / "a", pld, chain(2), temperature=0.7, top_p=0.95, baseline="paired")
    write_run(tmp_path / "runs" / "b", pld, chain(3), temperature=0.7, top_p=1.0, baseline="paired")
    build(tmp_path / "runs", tmp_path / "out")
    dirs = sorted(p.name for p in (tmp_path / "out").iterdir() if (p / "spec_bench.csv").is_file())
    assert dirs == ["spec_bench_mini_tiny_cpu_float32_1thr_temp0.7", "spec_bench_mini_tiny_cpu_float32_1thr_temp0.7_top_p0.95"]
    mat = {d: pd.read_csv(tmp_path / "out" / d / "mat_by_task.csv", index_col=0).loc["pld"] for d in dirs}
    assert mat[dirs[0]]["QA"] == 3.0 and mat[dirs[1]]["QA"] == 2.0 and mat[dirs[1]]["Overall"] == 2.0
    speed = pd.read_csv(tmp_path / "out" / dirs[1] / "spec_bench.csv", index_col=0)
    assert speed.loc["pld", "Overall"] == 2.0  # 4 tokens in 0.5 s vs 1.0 s per question


def dyn_stats(nodes, accepted, budget=60, auto=None) -> dict:
    ms = {"drafter": "eagle", "budget": budget, "tokens_per_verify": 61.0, "proposer_ms_per_step": 12.5,
          "pool_nodes_per_step": 100.0, "calibration_bins": [i / 10 for i in range(10)],
          "calibration_nodes": nodes, "calibration_accepted": accepted}
    return ms | ({"auto_budget_chosen": auto} if auto else {})


def test_calibration_sums_nodes_over_runs_of_a_label(tmp_path):
    eagle2 = {"name": "eagle2", "proposer": "eagle2", "budget": 60}
    n1, a1 = [10, 0, 0, 0, 0, 0, 0, 0, 5, 20], [1, 0, 0, 0, 0, 0, 0, 0, 4, 18]
    n2, a2 = [30, 0, 0, 0, 0, 0, 0, 0, 5, 0], [2, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    write_run(tmp_path / "runs" / "r1", eagle2, chain(3), temperature=0.0, baseline="paired", method_stats=dyn_stats(n1, a1))
    write_run(tmp_path / "runs" / "r2", eagle2, chain(3), temperature=0.0, baseline="paired", method_stats=dyn_stats(n2, a2))
    auto = {"name": "eagle2", "proposer": "eagle2", "budget": "auto"}
    write_run(tmp_path / "runs" / "r3", auto, chain(3), temperature=0.0, baseline="paired",
              method_stats=dyn_stats([4] + [0] * 9, [4] + [0] * 9, budget="auto", auto={"8": 3, "16": 1}))
    dyn = bf.dyntree_stats(load_runs(tmp_path / "runs"))
    cal = bf.calibration_table(dyn).set_index(["label", "bin"])
    fixed = "eagle2 (eagle, N=60)"
    assert cal.loc[(fixed, 0.0), "nodes"] == 40 and cal.loc[(fixed, 0.0), "accepted"] == 3
    assert cal.loc[(fixed, 0.8), "acceptance"] == pytest.approx(5 / 10)
    assert cal.loc[(fixed, 0.9), "acceptance"] == pytest.approx(18 / 20) and cal.loc[(fixed, 0.9), "bin_centre"] == 0.95
    assert math.isnan(cal.loc[(fixed, 0.5), "acceptance"])  # no node in the bin
    assert cal.loc[("eagle2 (eagle, N=auto)", 0.0), "nodes"] == 4
    table = bf.dynamic_trees_table(dyn).set_index("run")
    assert table.loc[str(tmp_path / "runs" / "r3"), "auto_budget_mean"] == pytest.approx((8 * 3 + 16) / 4)
    written = build(tmp_path / "runs", tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"dynamic_trees/calibration.png", "dynamic_trees/calibration.csv", "dynamic_trees/dynamic_trees.md"} <= names
    csv = pd.read_csv(tmp_path / "out" / "dynamic_trees" / "calibration.csv")
    assert csv.loc[(csv["label"] == fixed) & (csv["bin"] == 0.0), "nodes"].item() == 40


def test_training_curves_written_with_final_values(tmp_path):
    for stem, rates in (("kangaroo-tiny-l2", [0.1, 0.3, 0.4]), ("eagle-tiny", [0.05, 0.5])):
        history = [{"step": 10 * i, "tokens": 1000 * i, "accept_rate": r, "top1": r / 2, "loss": 1.0}
                   for i, r in enumerate(rates)]
        (tmp_path / "runs" / "train" / stem).mkdir(parents=True)
        (tmp_path / "runs" / "train" / stem / "summary.json").write_text(json.dumps({"history": history}))
    written = build(tmp_path / "runs", tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"training/training_curves.png", "training/training_curves.pdf", "training/training.md"} <= names
    table = pd.read_csv(tmp_path / "out" / "training" / "training.csv").set_index("head")
    assert table.loc["kangaroo-tiny-l2", "accept_rate"] == 0.4 and table.loc["kangaroo-tiny-l2", "tokens"] == 2000
    assert table.loc["eagle-tiny", "top1"] == 0.25 and table.loc["eagle-tiny", "accept_rate_at_init"] == 0.05


def test_fixture_runs_keep_their_outputs_and_gain_mat_tables(tmp_path):
    """The committed fixture runs (greedy, top_p 1.0, no drafter) keep their directory names and tables."""
    fixtures = Path(__file__).resolve().parent / "fixtures" / "runs"
    build(fixtures, tmp_path)
    setting = tmp_path / "spec_bench_mini_smollm2-135m_cpu_float32_2thr_temp0.0"
    assert set(pd.read_csv(setting / "spec_bench.csv", index_col=0).index) == {"recycle", "pld", "lookahead"}
    summary = pd.read_csv(setting / "summary.csv")
    mat = pd.read_csv(setting / "mat_by_task.csv", index_col=0)
    for label in ("recycle", "pld"):
        rows = summary[summary["label"] == label].set_index("task")["mat"]
        assert mat.loc[label, "Overall"] == pytest.approx(rows["overall"], abs=0.005)
        assert mat.loc[label, "QA"] == pytest.approx(rows["qa"], abs=0.005)
    assert (tmp_path / "sweeps" / "2025-01-02_00-00-00" / "sweep_tree_nodes.png").is_file()


def test_true_false_knob_is_not_a_sweep_axis(tmp_path, capsys):
    kangaroo = lambda reuse: {"name": "kangaroo", "proposer": "kangaroo", "reuse_shallow": reuse}  # noqa: E731
    write_sweep(tmp_path / "runs" / "multirun" / "reuse", [kangaroo(True), kangaroo(False)], [chain(2), chain(2)],
                temperature=0.0, baseline="paired")
    written = build(tmp_path / "runs", tmp_path / "out")
    assert not [p for p in written if p.name.startswith("sweep_")]
    assert "no numeric method knob varies" in capsys.readouterr().out
    mat = pd.read_csv(tmp_path / "out" / "sweeps" / "reuse" / "mat_by_task.csv", index_col=0)
    assert set(mat.index) == {"kangaroo (reuse_shallow=True)", "kangaroo (reuse_shallow=False)"}


def test_make_figures_writes_the_token_acceptance_table_and_figure(tmp_path, capsys):
    rates = {rule: np.array([[0.30, 0.40], [0.20, 0.35], [0.25, 0.30]]) + shift
             for rule, shift in (("specinfer", 0.0), ("spectr", 0.01), ("khisti", 0.02), ("rsd", 0.005))}
    report = {"model": "tiny", "drafter": "kangaroo", "temperature": 1.0, "top_m": 10, "pairs": 3,
              "rows": summarize_acceptance(rates, np.array([0, 1, 2]), [1, 2])}
    (tmp_path / "runs" / "bench").mkdir(parents=True)
    (tmp_path / "runs" / "bench" / "token_acceptance.json").write_text(json.dumps(report))
    written = build(tmp_path / "runs", tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in written}
    assert {"multidraft/token_acceptance.md", "multidraft/token_acceptance.png"} <= names
    table = pd.read_csv(tmp_path / "out" / "multidraft" / "token_acceptance.csv")
    assert table["spectr-specinfer"].tolist() == pytest.approx([0.01, 0.01])
    assert "token-level acceptance on 3 (p, q) pairs" in capsys.readouterr().out


def test_mat_vs_drafts_keeps_one_colour_per_method_and_a_legend_of_all(monkeypatch, tmp_path):
    rows = [("specinfer", 2, 2), ("spectr", 2, 2), ("rsd", 2, 4), ("specinfer", 2, 4), ("spectr", 2, 4), ("sps", 1, 2)]
    table = pd.DataFrame([{"method": m, "K": k, "L": length, "MAT": 1.5} for m, k, length in rows])
    shown = []
    monkeypatch.setattr(bf.figures, "save", lambda fig, out_dir, name: shown.append(fig) or [])
    bf.mat_vs_drafts(table, tmp_path)
    colour = {}
    for ax in shown[0].axes:
        for line in ax.get_lines():
            assert colour.setdefault(line.get_label(), line.get_color()) == line.get_color()
    assert len(set(colour.values())) == 3  # rsd, specinfer, spectr: three colours, the same in both panels
    legend = [t.get_text() for t in shown[0].axes[0].get_legend().get_texts()]
    assert set(legend) == {"rsd", "specinfer", "spectr", "sps"}
