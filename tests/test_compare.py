"""``python -m specdec.running.compare`` (what ``make run`` runs): one run dir per method in the format ``analysis/``
loads, AR's answer as every method's paired baseline, resume, the combined table and the chart; bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from analysis import check_against_summaries, load_runs, load_summaries, run_stats
from analysis.tables import compare_markdown, compare_table
from specdec.running.compare import compared_methods
from specdec.errors import UserError
from test_run import assert_user_error, read_answers, tiny_model_dir  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "tasks" / "spec_bench" / "question.jsonl"
FIXTURES = ROOT / "tests" / "fixtures" / "runs"
TASKS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
METHODS = ["recycle_cpu", "lookahead_cpu", "pld"]


def compare_cli(*overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "specdec.running.compare", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model_dir}", "model.name=tiny", f"hydra.run.dir={out}", "task.per_category=1",
            "max_new_tokens=8", "warmup=1", "threads=1", f"methods=[{','.join(METHODS)}]", *extra]


def assert_paired_with_ar(out: Path, methods: list[str]) -> None:
    """Every method's baseline is the AR run's own answer to the same question, and equals the method's."""
    ar = {r["question_id"]: r["choices"][0]["output_ids"] for r in read_answers(out / "ar")}
    assert all("baseline" not in r for r in read_answers(out / "ar"))
    for name in methods:
        records = read_answers(out / name)
        assert [r["question_id"] for r in records] == list(ar)
        for r in records:
            assert r["baseline"]["output_ids"] == ar[r["question_id"]] == r["choices"][0]["output_ids"]
            assert r["lossless"]["identical"]
        assert {r["order"] for r in records} == {"method_first", "baseline_first"}  # the order rotates


def test_tiny_compare_writes_run_dirs_table_chart_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    proc = compare_cli(*tiny_args(tiny_model_dir, out))
    for name in ["ar", *METHODS]:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["method"] == name and summary["tasks"]["overall"]["n"] == 6
        assert summary["baseline"] == ("none" if name == "ar" else "paired")
        assert (out / name / ".hydra" / "config.yaml").is_file() and (out / name / "sessions.jsonl").is_file()
    assert_paired_with_ar(out, METHODS)

    table = pd.read_csv(out / "compare.csv")
    assert list(zip(table["method"], table["task"])) == [(m, t) for m in ["ar", *METHODS] for t in [*TASKS, "overall"]]
    assert table.loc[table["method"] == "ar", "speedup"].isna().all()  # AR alone: no ratio to itself
    assert (table.loc[table["method"] != "ar", "lossless"] == 1.0).all()
    assert (table.loc[table["method"] == "ar", "mat"] == 1.0).all()
    png = out / "speedup_by_task.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert str(out / "compare.md") in proc.stdout and str(png) in proc.stdout and "| pld" in proc.stdout

    # analysis/ loads the run dirs; its recomputed figures agree with the summaries compare wrote
    df = load_runs(out)
    assert sorted(df["method"].unique()) == sorted(["ar", *METHODS])
    stats = run_stats(df[df["method"] != "ar"])
    assert check_against_summaries(stats, load_summaries(out)).empty

    # interrupted in the middle of question 4: pld has 3 records and a cut line, the others have 4
    kept = {name: (out / name / "answers.jsonl").read_text().splitlines(keepends=True) for name in ["ar", *METHODS]}
    for name, lines in kept.items():
        cut = lines[:3] + [lines[3][:50]] if name == "pld" else lines[:4]
        (out / name / "answers.jsonl").write_text("".join(cut))
    compare_cli(*tiny_args(tiny_model_dir, out))
    for name, lines in kept.items():
        after = read_answers(out / name)
        assert len(after) == 6
        done = 3 if name == "pld" else 4
        assert [r["answer_id"] for r in after[:done]] == [json.loads(x)["answer_id"] for x in lines[:done]]
    assert_paired_with_ar(out, METHODS)
    sessions = json.loads((out / "pld" / "summary.json").read_text())["sessions"]
    assert [s["questions_done"] for s in sessions] == [0, 3]


def checked(*overrides: str) -> dict:
    """``compared_methods`` on conf/compare.yaml composed with ``overrides`` (in-process, no model)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compared_methods(compose("compare", overrides=list(overrides)))


def test_compare_config_composes_every_listed_method():
    methods = checked()
    assert list(methods) == ["recycle_cpu", "lookahead_cpu", "pld", "aded_fast"]  # conf/compare.yaml
    assert all(cfg.method.name == name and cfg.drafter.name == "none" for name, cfg in methods.items())


@pytest.mark.parametrize("override,message", [
    ("methods=[ar,pld]", "methods must be a non-empty list of distinct method keys without 'ar'"),
    ("methods=[pld,pld]", "methods must be a non-empty list"),
    ("methods=[]", "methods must be a non-empty list"),
    ("methods=[pld,nosuch]", "unknown method 'nosuch' in methods; available: aded"),
    ("baseline=none", "a comparison pairs every method with AR: baseline must be 'paired'"),
    ("logger=wandb", "a comparison writes no W&B runs"),
    ("method=pld", "a comparison's method must be 'ar'"),
])
def test_bad_compare_settings(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        checked(override)


def test_bad_compare_setting_exits_2_before_loading_the_model(tmp_path):
    proc = compare_cli(f"hydra.run.dir={tmp_path / 'bad'}", "methods=[pld,nosuch]", check=False)
    assert proc.returncode == 2
    assert_user_error(proc, "error: unknown method 'nosuch' in methods; available:")
    assert not (tmp_path / "bad" / "ar").exists()


def test_compare_table_from_fixture_runs():
    base = FIXTURES / "spec_bench_mini" / "smollm2-135m"
    summaries = load_summaries([base / "pld" / "2025-01-01_00-30-00", base / "recycle" / "2025-01-01_00-00-00",
                                base / "ar" / "2025-01-01_02-00-00"])
    table = compare_table(summaries, ["pld", "recycle", "ar"])
    assert list(dict.fromkeys(table["method"])) == ["pld", "recycle", "ar"]
    for method, rows in table.groupby("method", sort=False):  # tasks in Spec-Bench order, overall last
        tasks = list(rows["task"])
        assert tasks[-1] == "overall" and tasks[:-1] == [t for t in TASKS if t in tasks]
    pld = summaries[(summaries["method"] == "pld") & (summaries["task"] == "overall")].iloc[0]
    row = table[(table["method"] == "pld") & (table["task"] == "overall")].iloc[0]
    assert row["speedup"] == pld["speedup"] and row["mat"] == pld["mat"]
    markdown = compare_markdown(table)
    lines = markdown.splitlines()
    assert len(lines) == 2 + len(table) and "proposer ms p95" in lines[0]
    overall = next(line for line in lines if line.startswith("| pld") and "Overall" in line)
    assert f"{pld['speedup']:.3f}×" in overall
    if "proposer_ms_mean" not in summaries:  # summaries written before the key existed show "-"
        assert overall.rstrip(" |").endswith("-")


def test_smollm2_compare_end_to_end(tmp_path):
    """The one end-to-end run of the real model (the default model, and run.py's default method recycle
    among the compared): 2 questions, 12 new tokens; every method equals AR; table and chart written."""
    lines = QUESTIONS.read_text().splitlines()
    two = tmp_path / "two.jsonl"
    two.write_text(lines[80] + "\n" + lines[240] + "\n")  # a translation and a QA question (short prompts)
    out = tmp_path / "smol"
    methods = [*METHODS, "recycle"]
    compare_cli(f"hydra.run.dir={out}", f"task.path={two}", "max_new_tokens=12", "warmup=0", "threads=1",
                f"methods=[{','.join(methods)}]")
    assert_paired_with_ar(out, methods)
    assert json.loads((out / "recycle" / "summary.json").read_text())["model"] == "smollm2-135m"
    texts = [r["choices"][0]["turns"][0] for r in read_answers(out / "recycle")]
    assert all(isinstance(t, str) and t for t in texts)
    table = pd.read_csv(out / "compare.csv")
    assert len(table) == 5 * 3 and (table.loc[table["method"] != "ar", "lossless"] == 1.0).all()
    assert (out / "speedup_by_task.png").is_file()
