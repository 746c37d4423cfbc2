"""analysis/: loading, Spec-Bench numbers, figures, the cost model, `make figures` and the notebooks.

Every expected number is computed by hand from the fixture runs in tests/fixtures/runs (their per-question
tokens, wall times and accept lengths are listed in tests/fixtures/runs/make_fixtures.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import (Profile, check_against_summaries, check_predictions, export_table, load_runs, load_summaries,
                      predict_speedup, run_stats, spec_bench_table, speedup_stats, speedup_vs, split_ablations, summarize)
from analysis import figures
from analysis.__main__ import build

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "runs"
BASE = FIXTURES / "spec_bench_mini" / "smollm2-135m"
R1 = str(BASE / "recycle" / "2025-01-01_00-00-00")
R2 = str(BASE / "recycle" / "2025-01-01_01-00-00")
PLD = str(BASE / "pld" / "2025-01-01_00-30-00")
AR = str(BASE / "ar" / "2025-01-01_02-00-00")
LOOKAHEAD = str(BASE / "lookahead" / "2025-01-01_03-00-00")


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return load_runs(FIXTURES)


@pytest.fixture(scope="module")
def stats(df) -> pd.DataFrame:
    return run_stats(df)


def pick(frame: pd.DataFrame, run: str, task: str) -> pd.Series:
    rows = frame[(frame["run"] == run) & (frame["task"].astype(str) == task)]
    assert len(rows) == 1, (run, task, len(rows))
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------ loading

def test_load_one_row_per_question_turn(df):
    # 5 single runs x (7 questions, 2 of them with 2 turns) = 45; sweep: 3 jobs x (q81: 2 turns, q321) = 9
    assert len(df) == 5 * 9 + 3 * 3
    assert df["run"].nunique() == 8
    r1 = df[df["run"] == R1]
    assert len(r1) == 9 and set(r1["task"]) == {"mt_bench", "translation", "summarization", "qa",
                                                   "math_reasoning", "rag"}
    q81 = r1[r1["question_id"] == 81].set_index("turn")
    assert q81.loc[0, "accept_lengths"] == [2, 3, 1, 2] and q81.loc[1, "accept_lengths"] == [4, 4]
    assert q81.loc[1, "tree_sizes"] == [17, 17]
    assert q81.loc[1, "wall_time"] == 0.3 and q81.loc[1, "baseline.wall_time"] == 0.6
    assert q81.loc[0, "category"] == "writing" and q81.loc[0, "task"] == "mt_bench"
    # setting columns: knobs flattened, device/dtype from summary.json's env (the config says "auto")
    assert (r1["method.tree_nodes"] == 17).all() and (r1["method.reset"] == "never").all()
    assert set(r1["device"]) == {"cpu"} and set(r1["dtype"]) == {"float32"} and set(r1["model"]) == {"smollm2-135m"}
    assert r1["sweep"].isna().all()
    sweep = df[df["sweep"].notna()]
    assert sorted(sweep["job"].unique()) == [0, 1, 2]
    assert sorted(sweep["method.tree_nodes"].unique()) == [8, 16, 32]
    assert set(df.loc[df["run"] == AR, "baseline.wall_time"].isna()) == {True}


def test_unfinished_sweep_job_takes_env_from_its_siblings(tmp_path):
    sweep = tmp_path / "multirun" / "s"
    shutil.copytree(FIXTURES / "multirun" / "2025-01-02_00-00-00", sweep)
    (sweep / "2" / "summary.json").unlink()  # job 2 was interrupted: only the config says device=auto
    df = load_runs(tmp_path)
    job2 = df[df["job"] == 2]
    assert not job2["complete"].any() and df[df["job"] == 0]["complete"].all()
    assert set(job2["device"]) == {"cpu"} and set(job2["dtype"]) == {"float32"} and set(job2["threads"]) == {2}


def test_load_accepts_globs_and_skips_broken_lines(tmp_path):
    assert load_runs(str(BASE / "recycle" / "2025-*"))["run"].nunique() == 2
    run = tmp_path / "r"
    shutil.copytree(R1, run)
    with open(run / "answers.jsonl", "a") as f:
        f.write('{"question_id": 999, "choices": [')  # a run still writing its last line
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert load_runs(tmp_path)["question_id"].nunique() == 7
    assert load_runs(tmp_path / "nothing_here").empty


# ------------------------------------------------------------------------------------------ Spec-Bench numbers

def test_run_stats_use_spec_bench_formulas(stats):
    mt = pick(stats, R1, "mt_bench")
    # q81: 16 tokens / 0.8 s = 20 (turns pooled; the mean of turn rates would be 21.33); q91: 12 / 0.75 = 16
    assert mt["tokens_per_s"] == pytest.approx(18.0)
    # baselines: q81 16 / 1.6 = 10, q91 12 / 2.4 = 5
    assert mt["baseline_tokens_per_s"] == pytest.approx(7.5)
    assert mt["speedup"] == pytest.approx(2.4)          # ratio of averages; the average of ratios is 2.6
    assert mt["mat"] == pytest.approx(28 / 11)          # pooled: 28 tokens over 6 + 5 steps
    assert mt["mat_per_question"] == pytest.approx((16 / 6 + 12 / 5) / 2)
    overall = pick(stats, R1, "overall")
    assert overall["n"] == 7
    assert overall["tokens_per_s"] == pytest.approx(164 / 7)
    assert overall["speedup"] == pytest.approx(164 / 63)
    assert overall["mat"] == pytest.approx(66 / 27)
    assert overall["total_tokens_per_s"] == pytest.approx(66 / 3.2)
    assert overall["draft_share"] == pytest.approx(0.09 / 3.2)
    assert overall["mean_tree_size"] == 17
    assert pick(stats, PLD, "math_reasoning")["lossless"] == 0.0
    assert pick(stats, PLD, "overall")["lossless"] == pytest.approx(6 / 7)
    assert pick(stats, PLD, "summarization")["speedup"] == pytest.approx(10.0)
    assert math.isnan(pick(stats, AR, "overall")["speedup"])  # no paired baseline


def test_summaries_agree_with_recomputed_figures(stats):
    summaries = load_summaries(FIXTURES)
    assert check_against_summaries(stats, summaries).empty
    tampered = summaries.copy()
    tampered.loc[(tampered["run"] == R1) & (tampered["task"] == "overall"), "speedup"] = 2.6
    bad = check_against_summaries(stats, tampered)
    assert list(bad["figure"]) == ["speedup"] and bad["recomputed"].iloc[0] == pytest.approx(164 / 63)


def test_summarize_mean_std_over_repeats(stats):
    summary = summarize(stats[stats["sweep"].isna()])
    rec = summary[(summary["method"] == "recycle") & (summary["task"] == "overall")].iloc[0]
    assert rec["runs"] == 2 and rec["label"] == "recycle"
    speedups = [164 / 63, 152 / 63]
    assert rec["speedup"] == pytest.approx(np.mean(speedups))
    assert rec["speedup_std"] == pytest.approx(abs(speedups[0] - speedups[1]) / math.sqrt(2))  # ddof=1
    assert rec["tokens_per_s"] == pytest.approx((164 / 7 + 152 / 7) / 2)
    assert rec["tokens_per_s_std"] == pytest.approx(12 / 7 / math.sqrt(2))
    assert rec["mat"] == pytest.approx(132 / 55)  # pooled over both runs' 27 + 28 steps
    mt = summary[(summary["method"] == "recycle") & (summary["task"] == "mt_bench")].iloc[0]
    assert mt["speedup"] == pytest.approx((2.4 + 16 / 7.5) / 2)
    assert mt["speedup_std"] == pytest.approx((2.4 - 16 / 7.5) / math.sqrt(2))
    pld = summary[(summary["method"] == "pld") & (summary["task"] == "overall")].iloc[0]
    assert pld["runs"] == 1 and math.isnan(pld["speedup_std"])


def test_speedup_against_a_separate_ar_run(df):
    methods = df[(df["proposer"] != "ar") & df["sweep"].isna()]
    vs = speedup_vs(methods, df[df["proposer"] == "ar"])
    # AR: 10, 8, 10, 10, 8, 10, 10 tokens/s -> 66 / 7 overall; mt_bench (10 + 8) / 2 = 9
    assert pick(vs, R1, "overall")["speedup"] == pytest.approx(164 / 66)
    assert pick(vs, R2, "overall")["speedup"] == pytest.approx(152 / 66)
    assert pick(vs, LOOKAHEAD, "overall")["speedup"] == pytest.approx(140 / 66)
    assert pick(vs, LOOKAHEAD, "mt_bench")["speedup"] == pytest.approx(20 / 9)
    assert pick(vs, LOOKAHEAD, "overall")["baseline_run"] == AR
    assert pick(vs, LOOKAHEAD, "overall")["lossless"] == 1.0  # same output ids as the AR run
    # as many AR runs as method runs: run k against AR run k (time order); a slower second AR run
    ar = df[df["proposer"] == "ar"]
    ar2 = ar.assign(run="ar2", tstamp=ar["tstamp"] + 1e6, wall_time=ar["wall_time"] * 2)
    vs2 = speedup_vs(methods[methods["method"] == "recycle"], pd.concat([ar, ar2]))
    assert pick(vs2, R1, "overall")["speedup"] == pytest.approx(164 / 66)
    assert pick(vs2, R2, "overall")["speedup"] == pytest.approx(152 / 33)
    # speedup_stats: paired where there is a pair, the AR run for the rest
    both = speedup_stats(df)
    assert pick(both, R1, "overall")["baseline_source"] == "paired"
    assert pick(both, LOOKAHEAD, "overall")["speedup"] == pytest.approx(140 / 66)
    assert AR not in set(both["run"])


def test_spec_bench_table_and_export(stats, tmp_path):
    table = spec_bench_table(summarize(stats[stats["sweep"].isna() & stats["speedup"].notna()]))
    assert list(table.index) == ["pld", "recycle"]            # sorted by overall speedup
    assert list(table.columns[:6]) == ["MT-bench", "Translation", "Summarization", "QA", "Math", "RAG"]
    assert table.loc["recycle", "Overall"] == f"{316 / 126:.2f} ± {12 / 63 / math.sqrt(2):.2f}"  # 2.51 ± 0.13
    assert table.loc["recycle", "MAT"] == "2.40"
    assert table.loc["pld", "Overall"] == f"{174 / 62:.2f}" and table.loc["recycle", "runs"] == 2
    paths = export_table(table, tmp_path / "spec_bench", caption="speedups")
    assert [p.suffix for p in paths] == [".md", ".tex", ".csv"]
    assert "| recycle" in paths[0].read_text()
    tex = paths[1].read_text()
    assert r"\toprule" in tex and r"2.51 $\pm$ 0.13" in tex and "±" not in tex
    assert pd.read_csv(paths[2], index_col=0).loc["pld", "Overall"] == "2.81"


def test_split_ablations_keeps_method_sweeps_in_the_main_table(stats):
    main, ablations = split_ablations(stats)
    assert ablations["run"].nunique() == 3 and ablations["sweep"].notna().all()
    assert set(main["run"]) == {R1, R2, PLD, AR, LOOKAHEAD}
    # a multirun over methods (python run.py -m method=recycle,pld) is not an ablation
    over_methods = stats.copy()
    over_methods.loc[over_methods["run"].isin([R1, PLD]), "sweep"] = "runs/multirun/x"
    assert split_ablations(over_methods)[1]["run"].nunique() == 3
    # a multirun over the drafter's exit layer (Kangaroo's ℓ sweep: -m drafter.exit_layer=1,2,4) is one
    two = stats[stats["run"].isin([R1, R2])].copy().assign(sweep="runs/multirun/l")
    assert split_ablations(two)[1].empty  # same knobs, no exit layer: repeats, not an ablation
    two["drafter.exit_layer"] = two["run"].map({R1: 1, R2: 4})
    assert split_ablations(two)[1]["run"].nunique() == 2


def test_knob_variants_get_labels(stats):
    summary = summarize(split_ablations(stats)[1])
    assert set(summary["label"]) == {"recycle (tree_nodes=8)", "recycle (tree_nodes=16)", "recycle (tree_nodes=32)"}
    mat = summary[summary["task"] == "overall"].set_index("method.tree_nodes")["mat"]
    assert mat.to_dict() == pytest.approx({8: 2.0, 16: 4.0, 32: 24 / 5})


# ------------------------------------------------------------------------------------------ figures

def test_every_figure_function_writes_png_and_pdf(df, stats, tmp_path):
    main, ablations = split_ablations(stats)
    summary, sweep = summarize(main), summarize(ablations)
    profile = Profile.load(FIXTURES / "latency" / "synthetic.json")
    check = check_predictions(df, profile, stats)
    written = [
        figures.speedup_bars(summary, tmp_path),
        figures.knob_sweep(sweep, "method.tree_nodes", tmp_path),
        figures.accept_length_hist(df[df["proposer"] != "ar"], tmp_path),
        figures.speedup_vs_mat(summary, tmp_path),
        figures.latency_profiles([profile], tmp_path),
        figures.predicted_vs_measured(check, tmp_path),
    ]
    for paths in written:
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert len({p for paths in written for p in paths}) == 12


# ------------------------------------------------------------------------------------------ cost model

def test_cost_model_on_a_synthetic_profile(tmp_path):
    # t(N) = 100 ms + 5 ms per extra token
    prof = Profile(n=[1, 2, 4, 8, 16, 32, 64, 128], seconds=[0.1 + 0.005 * (n - 1) for n in [1, 2, 4, 8, 16, 32, 64, 128]])
    assert prof.t(17) == pytest.approx(0.18)
    assert predict_speedup(prof, mat=2.4, tree_size=17) == pytest.approx(2.4 * 0.1 / 0.18)
    assert predict_speedup(prof, mat=2.4, tree_size=17, draft_time_per_step=0.02) == pytest.approx(1.2)
    assert predict_speedup(prof, mat=2.4, tree_size=[1, 33]) == pytest.approx(2.4 * 0.1 / ((0.1 + 0.26) / 2))
    assert predict_speedup(prof, mat=1.0, tree_size=1) == pytest.approx(1.0)  # AR against itself
    # interpolation between points, linear extrapolation past the last one
    kinked = Profile(n=[4, 1, 2], seconds=[0.4, 0.1, 0.2])  # unsorted input is sorted
    assert kinked.t(3) == pytest.approx(0.3) and kinked.t(1.5) == pytest.approx(0.15)
    assert kinked.t(8) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        Profile(n=[2, 4], seconds=[0.1, 0.2])
    # the stored JSON format round-trips (ms on disk, seconds in memory)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"device": "cpu", "dtype": "float32", "threads": 1, "n": [1, 2], "median_ms": [50, 60]}))
    loaded = Profile.load(path)
    assert loaded.seconds == [0.05, 0.06] and loaded.meta["threads"] == 1 and loaded.name == "p"


def test_check_predictions_against_measured_runs(df, stats):
    profile = Profile.load(FIXTURES / "latency" / "synthetic.json")
    check = check_predictions(df, profile, stats)
    assert "ar" not in set(check["method"])
    r1 = pick(check, R1, "overall")
    # MAT 66/27, every tree 17 nodes (t = 0.18 s), draft 9 turns x 10 ms over 27 steps
    assert r1["draft_ms_per_step"] == pytest.approx(90 / 27)
    assert r1["predicted"] == pytest.approx((66 / 27) * 0.1 / (0.18 + 0.09 / 27))  # = 4/3
    assert r1["error"] == pytest.approx((4 / 3) / (164 / 63) - 1)
    # decode-only: wall minus prefill (9 turns x 50 ms): AR 8.0 - 0.45, method 3.2 - 0.45, same tokens
    assert r1["decode_speedup"] == pytest.approx(7.55 / 2.75)
    # in situ: verify per step (wall - 70 ms) vs AR's (wall - 50 ms): 2.57 s / 27 steps vs 7.55 s / 66 steps
    assert r1["verify_ratio"] == pytest.approx((2.57 / 27) / (7.55 / 66))
    assert r1["bound"] == pytest.approx(7.55 / 2.57) and r1["efficiency"] == pytest.approx(2.57 / 2.75)


# ------------------------------------------------------------------------------------------ make figures

def test_make_figures_builds_everything_from_fixtures(tmp_path, capsys):
    written = build(FIXTURES, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    setting = "spec_bench_mini_smollm2-135m_cpu_float32_2thr_temp0.0"
    for name in ["spec_bench.md", "spec_bench.tex", "spec_bench.csv", "speedup_by_task.png", "speedup_by_task.pdf",
                 "speedup_vs_mat.pdf", "accept_lengths.png"]:
        assert f"{setting}/{name}" in names
    assert "sweeps/2025-01-02_00-00-00/sweep_tree_nodes.pdf" in names
    assert "cost_model/synthetic/predictions.csv" in names and "cost_model/latency_profiles.png" in names
    assert all(p.is_file() for p in written)
    table = pd.read_csv(tmp_path / setting / "spec_bench.csv", index_col=0)
    assert set(table.index) == {"recycle", "pld", "lookahead"}
    assert table.loc["lookahead", "baseline"] == "separate"
    assert "disagrees" not in capsys.readouterr().out


def test_make_figures_skips_missing_kinds_of_runs(tmp_path, capsys):
    assert build(tmp_path / "empty", tmp_path / "out1") == []
    assert "no run dirs" in capsys.readouterr().out
    only_ar = tmp_path / "only_ar"
    shutil.copytree(AR, only_ar / "ar" / "run")
    build(only_ar, tmp_path / "out2")
    out = capsys.readouterr().out
    assert "tables skipped" in out and "no latency profile" in out
    only_lookahead = tmp_path / "only_lookahead"
    shutil.copytree(LOOKAHEAD, only_lookahead / "lookahead" / "run")
    build(only_lookahead, tmp_path / "out3")
    assert "neither a paired baseline nor a separate AR run" in capsys.readouterr().out
    one_paired = tmp_path / "one_paired"
    shutil.copytree(R1, one_paired / "recycle" / "run")
    written = build(one_paired, tmp_path / "out4")
    out = capsys.readouterr().out
    assert "no Hydra multirun over a method knob" in out and any(p.name == "speedup_by_task.png" for p in written)


# ------------------------------------------------------------------------------------------ notebooks

@pytest.mark.full
@pytest.mark.parametrize("name", ["speedup_tables.ipynb", "paper_figures.ipynb"])
def test_notebook_runs_top_to_bottom_on_fixtures(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"RUN_ROOT = {str(FIXTURES)!r}\nOUT_DIR = {str(tmp_path)!r}"
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if name == "paper_figures.ipynb":
        assert {p.name for p in tmp_path.glob("*.pdf")} >= {"speedup_by_task.pdf", "accept_lengths.pdf",
                                                            "speedup_vs_mat.pdf", "latency_profiles.pdf"}
    else:
        assert "recycle" in (tmp_path / "spec_bench.md").read_text()


# ------------------------------------------------------------------------------------------ proposer ms
def test_proposer_ms_per_step_matches_the_summary_and_old_records_fall_back(stats, tmp_path):
    from specdec.running.results import aggregate

    run = tmp_path / "pld_steps"
    shutil.copytree(PLD, run)
    records = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    for i, rec in enumerate(records):  # add per-step lists (written since issue 14) with known values
        n = len(rec["choices"][0]["accept_lengths"])
        rec["choices"][0].update(step_draft_time=[1e-4 * (i + k % 7) for k in range(n)],
                                 step_update_time=[2e-5] * n, step_device_time=[3e-4] * n)
    (run / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    new = pick(run_stats(load_runs(run)), str(run), "overall")
    expected = aggregate(records)
    for col in ("proposer_ms_mean", "proposer_ms_p95", "device_ms_mean"):
        assert new[col] == pytest.approx(expected[col]), col
    assert new["device_ms_mean"] == pytest.approx(0.3) and new["proposer_ms_p95"] > new["proposer_ms_mean"]
    old = pick(stats, PLD, "overall")  # the fixture run has no per-step lists: mean from the turn sums
    assert old["proposer_ms_mean"] == pytest.approx(old["draft_ms_per_step"] + 1e3 * old_update_per_step(PLD))
    assert math.isnan(old["proposer_ms_p95"]) and math.isnan(old["device_ms_mean"])
    table = spec_bench_table(summarize(run_stats(load_runs(run))))
    assert table["proposer ms"].iloc[0] == f"{expected['proposer_ms_mean']:.3f}"


def old_update_per_step(run: str) -> float:
    records = [json.loads(line) for line in (Path(run) / "answers.jsonl").read_text().splitlines()]
    choices = [r["choices"][0] for r in records]
    return sum(sum(c.get("update_time", [])) for c in choices) / sum(len(c["accept_lengths"]) for c in choices)
