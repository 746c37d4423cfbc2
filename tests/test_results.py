"""Accounting on a hand-computed example (Spec-Bench's formulas) and the append-only answer file."""

import json

import pytest

from specdec.running.results import AnswerFile, aggregate, cost_split, format_table, summarize, write_report


def record(qid, task, new_tokens, wall_time, accept_lengths, base_tokens, base_wall, identical=True, drafts=(0.0,)):
    return {"question_id": qid, "task": task, "category": task,
            "choices": [{"new_tokens": new_tokens, "wall_time": wall_time, "accept_lengths": accept_lengths,
                         "draft_time": list(drafts), "update_time": [0.25], "verify_time": [2.0],
                         "commit_time": [0.25]}],
            "baseline": {"new_tokens": base_tokens, "wall_time": base_wall},
            "lossless": {"identical": identical}}


RECORDS = [
    # two turns pooled: (10 + 30) / (1 + 3) = 10 tok/s; baseline (10 + 30) / (2 + 2) = 10 tok/s
    record(1, "mt_bench", [10, 30], [1.0, 3.0], [4, 4, 2] + [3] * 10, [10, 30], [2.0, 2.0], drafts=(0.5, 0.5)),
    # 20 / 1 = 20 tok/s; baseline 20 / 4 = 5 tok/s
    record(2, "qa", [20], [1.0], [5, 5, 5, 5], [20], [4.0], identical=False),
]


def test_aggregate_uses_spec_bench_formulas():
    mt = aggregate(RECORDS[:1])
    assert mt["tokens_per_s"] == pytest.approx(10.0) and mt["baseline_tokens_per_s"] == pytest.approx(10.0)
    assert mt["mat"] == pytest.approx(40 / 13) and mt["draft_share"] == pytest.approx(1.0 / 4.0)
    assert mt["proposer_share"] == pytest.approx((1.0 + 0.25) / (1.0 + 0.25 + 2.0 + 0.25))
    overall = aggregate(RECORDS)
    assert overall["tokens_per_s"] == pytest.approx((10 + 20) / 2)          # mean of per-question rates
    assert overall["baseline_tokens_per_s"] == pytest.approx((10 + 5) / 2)
    assert overall["speedup"] == pytest.approx(15 / 7.5)                    # ratio of the averages (not 1.5)
    assert overall["mat"] == pytest.approx(60 / 17)                         # pooled over all 17 steps
    assert overall["mat_per_question"] == pytest.approx((40 / 13 + 5) / 2)
    assert overall["total_tokens_per_s"] == pytest.approx(60 / 5)
    assert overall["lossless"] == 0.5 and overall["n"] == 2


def test_summarize_orders_tasks_and_adds_overall():
    tasks = summarize(RECORDS, ["mt_bench", "translation", "qa"])
    assert list(tasks) == ["mt_bench", "qa", "overall"]


def test_answer_file_drops_a_cut_line_and_never_duplicates(tmp_path):
    path = tmp_path / "answers.jsonl"
    answers = AnswerFile(path)
    for r in RECORDS:
        answers.append(r)
    text = path.read_text()
    path.write_text(text + '{"question_id": 3, "tas')  # interrupted mid-write
    reread = AnswerFile(path)
    assert reread.done == {1, 2} and path.read_text() == text
    reread.append(record(3, "qa", [1], [1.0], [1], [1], [1.0]))
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_proposer_ms_mean_and_p95_pool_the_steps_and_exclude_device_work():
    rec = record(1, "qa", [4], [1.0], [1, 1, 1, 1], [4], [1.0])
    host = [0.001, 0.002, 0.003, 0.010]  # seconds of propose per step
    rec["choices"][0].update(step_draft_time=host, step_update_time=[0.0005] * 4, step_device_time=[0.004] * 4)
    out = aggregate([rec])
    assert out["proposer_ms_mean"] == pytest.approx(1e3 * (sum(host) / 4 + 0.0005))
    assert out["proposer_ms_p95"] == pytest.approx(8.95 + 0.5)  # linear: rank 0.95 * 3 = 2.85 -> 3 + .85 * 7 ms
    assert out["device_ms_mean"] == pytest.approx(4.0)
    old = aggregate(RECORDS[:1])  # records without per-step lists (fixture runs): mean from the turn sums
    assert old["proposer_ms_mean"] == pytest.approx(1e3 * (1.0 + 0.25) / 13) and old["proposer_ms_p95"] is None
    assert aggregate([rec] + RECORDS[:1])["proposer_ms_p95"] is None  # a mixed set falls back as a whole


def test_cost_split_of_a_paired_run_by_hand():
    """verify_ratio, bound and efficiency (issue 13) from a record's turns: 20 verify steps of 2 tokens."""
    choice = {"new_tokens": [30, 10], "wall_time": [1.1, 0.6], "prefill_time": [0.1, 0.1], "accept_lengths": [2] * 20,
              "verify_time": [0.6, 0.3], "draft_time": [0.1, 0.1]}
    base = {"new_tokens": [30, 10], "wall_time": [2.1, 0.8], "prefill_time": [0.1, 0.1], "accept_lengths": [1] * 40,
            "verify_time": [1.6, 0.6]}
    out = aggregate([{"question_id": 1, "task": "qa", "category": "qa", "choices": [choice], "baseline": base}])
    verify_ratio = (0.9 / 20) / (2.2 / 40)                      # 0.045 s vs 0.055 s per step
    assert out["verify_ratio"] == pytest.approx(verify_ratio)
    assert out["bound"] == pytest.approx(2 / verify_ratio)      # MAT 2
    assert out["decode_speedup"] == pytest.approx((40 / 1.5) / (40 / 2.7))
    assert out["efficiency"] == pytest.approx(1.8 / (2 / verify_ratio))
    assert cost_split(2.0, 40, 0, 1.5, 0.9, 40, 40, 2.7, 2.2)["bound"] is None  # no steps: no ratio
    assert "bound" not in aggregate([{"question_id": 1, "task": "qa", "category": "qa", "choices": [choice]}])


def test_console_table_shows_proposer_ms():
    rec = record(1, "qa", [4], [1.0], [1, 1, 1, 1], [4], [1.0])
    rec["choices"][0].update(step_draft_time=[0.002] * 4, step_update_time=[0.0] * 4, step_device_time=[0.0] * 4)
    table = format_table(summarize([rec], ["qa"]))
    assert "prop. ms" in table.splitlines()[0] and "2.000" in table.splitlines()[2]


def test_write_report_makes_its_folder_writes_json_and_prints_the_rows(tmp_path, capsys):
    path = tmp_path / "bench" / "new" / "report.json"        # a fresh checkout has no runs/bench/
    write_report(path, {"rows": [{"K": 2, "rate": 0.3125}]}, [{"K": 2, "rate": 0.3125}], floatfmt=".2f")
    assert json.loads(path.read_text()) == {"rows": [{"K": 2, "rate": 0.3125}]}
    out = capsys.readouterr().out
    assert "|    K |   rate |" in out and "0.31 |" in out and "0.3125" not in out


def test_lossless_splits_into_identical_near_tie_and_diverged():
    tie, wide = record(3, "qa", [20], [1.0], [5] * 4, [20], [4.0], identical=False), \
        record(4, "qa", [20], [1.0], [5] * 4, [20], [4.0], identical=False)
    tie["lossless"]["near_tie"], wide["lossless"]["near_tie"] = True, False
    split = aggregate([RECORDS[0], tie, wide, tie])
    assert (split["lossless"], split["near_tie"], split["diverged"]) == (0.25, 0.5, 0.25)
