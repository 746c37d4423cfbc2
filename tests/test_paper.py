"""analysis.paper: TR Table 1 and Spec-Bench's leaderboard from synthetic compare dirs (no model runs).

Each compare dir is written as ``specdec.running.compare`` writes one: ``<dir>/<method>/summary.json`` (its
``tasks`` computed by ``specdec.running.results.summarize`` from synthetic answer records) and, for most arms,
``.hydra/config.yaml`` naming the proposer."""

import json
import math

import pandas as pd
import pytest
import yaml

from analysis import paper
from specdec.running.results import SCHEMA_VERSION, summarize
from tasks import REPORT_ORDER, TASKS

AR_SECONDS = 6.0   # every synthetic AR turn: 60 tokens in 6 s = 10 tokens/s
TOKENS = 60


def record(qid: int, task: str, speedup: float, mat: int, paired: bool) -> dict:
    """One answer record: 60 tokens at ``speedup`` x AR's 10 tokens/s, accept lengths of ``mat`` each."""
    choice = {"new_tokens": [TOKENS], "wall_time": [AR_SECONDS / speedup], "decoding_steps": [TOKENS // mat],
              "accept_lengths": [mat] * (TOKENS // mat), "draft_time": [0.0], "prefill_time": [0.1],
              "verify_time": [AR_SECONDS / speedup - 0.1]}
    rec = {"question_id": qid, "task": task, "category": task, "choices": [choice]}
    if paired:
        rec["baseline"] = {"new_tokens": [TOKENS], "wall_time": [AR_SECONDS], "decoding_steps": [TOKENS],
                           "accept_lengths": [1] * TOKENS, "prefill_time": [0.1], "verify_time": [AR_SECONDS - 0.1]}
        rec["lossless"] = {"identical": True, "near_tie": False}
    return rec


def write_arm(root, key, tasks, speedup=1.0, mat=1, proposer=None, drafter=None, model="smollm2-135m",
              task_set="spec_bench", config=True):
    """``root/<key>/summary.json`` (+ ``.hydra/config.yaml`` when ``config``), one question per task."""
    is_ar = (proposer or key) == "ar"
    records = [record(i, t, 1.0 if is_ar else speedup, 1 if is_ar else mat, paired=not is_ar)
               for i, t in enumerate(tasks)]
    run_dir = root / key
    run_dir.mkdir(parents=True)
    summary = {"schema_version": SCHEMA_VERSION, "method": key, "model": model, "task": task_set,
               "tasks": summarize(records, REPORT_ORDER),
               "env": {"device": "cpu", "dtype": "float32", "threads": 2, "backend": "onednn",
                       "device_name": "x86_64"},
               "warmup": 1, "warmup_keeps_state": True, "temperature": 0.0, "max_new_tokens": 64,
               "baseline": "none" if is_ar else "paired", "method_stats": {}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if config:
        (run_dir / ".hydra").mkdir()
        cfg = {"method": {"name": key, "proposer": proposer or key}, "model": {"name": model},
               "task": {"name": task_set}, "drafter": {"name": drafter or "none"}, "max_new_tokens": 64,
               "temperature": 0.0, "device": "auto", "dtype": "auto", "threads": None}
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


@pytest.fixture
def compare_dirs(tmp_path):
    """A Spec-Bench comparison (ar, recycle_cpu, pld without config, lookahead_cpu) and an MBPP one (ar,
    recycle_cpu: pld not run there)."""
    sb, mbpp = tmp_path / "spec_bench", tmp_path / "mbpp"
    write_arm(sb, "ar", TASKS)
    write_arm(sb, "recycle_cpu", TASKS, speedup=1.5, mat=2, proposer="recycle")
    write_arm(sb, "pld", TASKS, speedup=1.2, mat=3, config=False)
    write_arm(sb, "lookahead_cpu", TASKS, speedup=0.8, mat=2, proposer="lookahead")
    write_arm(mbpp, "ar", ["mbpp"], task_set="mbpp")
    write_arm(mbpp, "recycle_cpu", ["mbpp"], speedup=2.0, mat=4, proposer="recycle", task_set="mbpp")
    return sb, mbpp


def rows_of(table, method):
    return table[table["method"] == method].reset_index(drop=True)


def test_tr_table_layout_rows_and_columns(compare_dirs):
    table, caption = paper.tr_table(*compare_dirs)
    assert list(table.columns) == ["method", "row", "setting", "MT", "Trans", "Sum", "QA", "Math", "RAG", "MAT",
                                   "Ts/s", "Speed", "MBPP MAT", "MBPP Ts/s", "MBPP Speed"]
    # the paper's rows in its order, each measured then reported, then the methods the paper has no row for
    assert list(table["method"]) == ["AR", "AR", "Lade", "Lade", "PLD", "PLD", "REST", "REST", "Medusa", "Medusa",
                                     "TR", "TR", "lookahead_cpu", "lookahead_cpu"]
    assert list(table["row"]) == ["ar", "reported", "not measured", "reported", "pld", "reported", "not measured",
                                  "reported", "not measured", "reported", "recycle_cpu", "reported", "lookahead_cpu",
                                  "reported"]
    assert any("smollm2-135m" in line and "cpu" in line for line in caption)


def test_tr_table_measured_cells(compare_dirs):
    table, _ = paper.tr_table(*compare_dirs)
    tr, ar, pld = rows_of(table, "TR").iloc[0], rows_of(table, "AR").iloc[0], rows_of(table, "PLD").iloc[0]
    assert [tr[c] for c in ("MT", "RAG", "Speed", "MAT")] == pytest.approx([1.5, 1.5, 1.5, 2.0])
    assert tr["Ts/s"] == pytest.approx(15.0)
    assert [tr["MBPP MAT"], tr["MBPP Ts/s"], tr["MBPP Speed"]] == pytest.approx([4.0, 20.0, 2.0])
    assert [ar[c] for c in ("MT", "Speed", "MAT", "Ts/s", "MBPP Speed")] == pytest.approx([1, 1, 1, 10, 1])
    assert pld["Speed"] == pytest.approx(1.2)  # matched by its key: this arm has no .hydra/config.yaml
    # not measured: blank (NaN), never 0
    assert all(math.isnan(pld[c]) for c in ("MBPP MAT", "MBPP Ts/s", "MBPP Speed"))
    lade = rows_of(table, "Lade").iloc[0]
    assert all(math.isnan(lade[c]) for c in ("MT", "MAT", "Ts/s", "MBPP Speed"))
    assert tr["setting"].startswith("measured: smollm2-135m, cpu, float32")


def test_tr_table_reported_rows(compare_dirs):
    table, _ = paper.tr_table(*compare_dirs)
    reported = table[table["row"] == "reported"].set_index("method")
    source = paper.load_reported("tr_table1").rows.set_index(["size", "method"])
    assert reported.loc["TR", "MT"] == source.loc[("7B", "TR"), "mt_bench"]
    assert reported.loc["Lade", "MBPP Ts/s"] == source.loc[("7B", "Lade"), "mbpp_tokens_per_s"]
    assert reported.loc["Medusa", "MBPP MAT"] == paper.NOT_REPORTED  # the paper did not run Medusa on MBPP
    assert (reported.loc["lookahead_cpu", list(paper.TR_TABLE1.columns.values())] == paper.NOT_REPORTED).all()
    assert reported.loc["TR", "setting"].startswith("reported: Vicuna-7B")


def test_spec_bench_layout(tmp_path):
    sb = tmp_path / "sb"
    write_arm(sb, "ar", TASKS)
    write_arm(sb, "lade_cpu", TASKS, speedup=1.1, mat=2, proposer="lade")
    write_arm(sb, "sps", TASKS, speedup=0.5, mat=2, proposer="sps", drafter="draft_model")
    write_arm(sb, "lookahead", TASKS, speedup=0.9, mat=2, proposer="lookahead")
    write_arm(sb, "kangaroo", TASKS, speedup=0.7, mat=1, proposer="kangaroo")
    table, caption = paper.spec_bench_table(sb)
    assert list(table.columns)[3:] == ["Multi-turn Conversation", "Translation", "Summarization",
                                       "Question Answering", "Mathematical Reasoning", "Retrieval-aug. Generation",
                                       "#Mean Accepted Tokens", "Overall"]
    board = ["EAGLE2", "Recycling", "Hydra", "Medusa", "PLD", "SpS", "REST", "Lookahead"]
    assert list(dict.fromkeys(table["method"])) == board + ["kangaroo", "lookahead"]  # no AR row
    lookahead_row = rows_of(table, "Lookahead")  # Spec-Bench's Lookahead is LADE, not Alipay's lookahead
    assert list(lookahead_row["row"]) == ["lade_cpu", "reported"]
    assert lookahead_row.loc[0, "Overall"] == pytest.approx(1.1)
    assert rows_of(table, "SpS").loc[0, "row"] == "sps (drafter draft_model)"
    assert rows_of(table, "lookahead").loc[1, "Overall"] == paper.NOT_REPORTED
    assert math.isnan(rows_of(table, "EAGLE2").loc[0, "Overall"])
    assert any("AR 10.00 tokens/s" in line for line in caption)


def test_reported_size_follows_the_measured_model(tmp_path):
    sb = tmp_path / "sb"
    write_arm(sb, "ar", TASKS, model="vicuna-13b")
    write_arm(sb, "recycle", TASKS, speedup=2.0, mat=3, model="vicuna-13b")
    table, caption = paper.tr_table(sb, None)
    source = paper.load_reported("tr_table1").rows.set_index(["size", "method"])
    reported = table[table["row"] == "reported"].set_index("method")
    assert reported.loc["TR", "MT"] == source.loc[("13B", "TR"), "mt_bench"]
    assert reported.loc["AR", "Ts/s"] == source.loc[("13B", "AR"), "tokens_per_s"]
    assert math.isnan(rows_of(table, "TR").loc[0, "MBPP MAT"])  # no MBPP comparison given
    assert any(line.startswith("Reported (Vicuna-13B)") for line in caption)


def test_methods_select_and_order_the_measured_rows(compare_dirs):
    table, _ = paper.tr_table(*compare_dirs, methods=["lookahead_cpu", "recycle_cpu", "rest"])
    assert list(rows_of(table, "PLD")["row"]) == ["not measured", "reported"]
    rest = rows_of(table, "REST").iloc[0]  # listed but never run: its row, blank
    assert rest["row"] == "rest" and math.isnan(rest["Speed"])
    assert "lookahead_cpu" in set(table["method"])


def test_reported_tables_are_complete():
    tr = paper.load_reported("tr_table1")
    board = paper.load_reported("spec_bench_a100")
    for reported in (tr, board):
        assert {"paper", "table", "model", "device"} <= set(reported.meta)
    for size in ("7B", "13B", "33B"):
        for method in paper.TR_TABLE1.rows.values():
            assert tr.row(size, method) is not None, (size, method)
        for method in paper.SPEC_BENCH_BOARD.rows.values():
            assert board.row(size, method) is not None, (size, method)
        ar = tr.row(size, "AR")
        assert all(ar[t] == 1.0 for t in TASKS)


def test_cli_writes_csv_and_markdown(compare_dirs, tmp_path, capsys):
    sb, mbpp = compare_dirs
    out = tmp_path / "out"
    assert paper.main(["tr", "--spec-bench", str(sb), "--mbpp", str(mbpp), "--out", str(out)]) == 0
    csv = pd.read_csv(out / "tr_table1.csv", keep_default_na=False)
    assert len(csv) == 14
    pld = csv[(csv["method"] == "PLD") & (csv["row"] == "pld")].iloc[0]
    assert pld["MBPP MAT"] == ""           # not measured: blank
    medusa = csv[(csv["method"] == "Medusa") & (csv["row"] == "reported")].iloc[0]
    assert medusa["MBPP MAT"] == "-"       # not reported
    markdown = (out / "tr_table1.md").read_text()
    assert "Token Recycling, Table 1" in markdown and "| TR" in markdown
    assert paper.main(["spec-bench", "--runs", str(sb), "--out", str(out)]) == 0
    assert (out / "spec_bench_leaderboard.csv").is_file() and (out / "spec_bench_leaderboard.md").is_file()
    assert "1.50x" in (out / "spec_bench_leaderboard.md").read_text()  # recycle_cpu's overall speedup
    assert paper.main(["spec-bench", "--runs", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
