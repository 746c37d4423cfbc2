"""The MBPP task (tasks/mbpp/, conf/task/mbpp*.yaml): Token Recycling's 399 prompts as one category ``mbpp``,
unchanged apart from the category; its configs load; a run's summary and the comparison report carry an
``mbpp`` row (from fake answer records: no model is run)."""

import hashlib
import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from specdec import PROJECT_ROOT
from specdec.running.report import compare_table
from specdec.running.results import answer_record, summarize
from specdec.running.runner import task_questions
from specdec.verify.decode import Generation
from tasks import MBPP, REPORT_ORDER, TASKS, load_questions

UPSTREAM_SHA256 = "4ef443d46893b3c806247b8b074da1f4f2d04cd97f64b7934549dad16d292399"  # TR data/mbpp/question.jsonl
WRAPPER = "Create a Python script for this problem:\n```python\n\"\"\"\n"


def test_mbpp_holds_399_questions_in_one_category():
    questions = load_questions(MBPP)
    assert len(questions) == 399
    assert set(questions["category"]) == {"mbpp"} and set(questions["task"]) == {"mbpp"}
    ids = questions["question_id"]
    assert ids == sorted(set(ids)) and (ids[0], ids[-1]) == (2, 809)
    for turns in questions["turns"]:
        assert len(turns) == 1 and turns[0].startswith(WRAPPER) and "\nassert " in turns[0]
        assert turns[0].endswith('"""\n\n```')
    assert len(load_questions(MBPP, per_category=12)) == 12


def test_file_is_upstream_apart_from_the_category():
    """Writing the category back as upstream's "code" must give the upstream file byte for byte (its sha256)."""
    lines = MBPP.read_text(encoding="utf-8").splitlines()
    upstream = "".join(json.dumps({**json.loads(line), "category": "code"}) + "\n" for line in lines)
    assert hashlib.sha256(upstream.encode()).hexdigest() == UPSTREAM_SHA256
    licence = (MBPP.parent / "LICENSE-DATA.md").read_text(encoding="utf-8")
    assert UPSTREAM_SHA256 in licence and hashlib.sha256(MBPP.read_bytes()).hexdigest() in licence


@pytest.mark.parametrize("name,count", [("mbpp", 399), ("mbpp_mini", 12)])
def test_task_configs_load_the_file(name, count):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"task={name}"])
    questions, order = task_questions(cfg)
    assert len(questions) == count and set(questions["task"]) == {"mbpp"}
    assert cfg.task.name == name and cfg.max_new_tokens == cfg.task.max_new_tokens


def fake_record(question_id: int, category: str, task: str, accept: list[int], seconds: float) -> dict:
    gen = Generation(output_ids=list(range(sum(accept))), accept_lengths=accept, wall_time=seconds)
    base = Generation(output_ids=list(range(sum(accept))), accept_lengths=[1] * sum(accept), wall_time=2 * seconds)
    question = {"question_id": question_id, "category": category, "task": task}
    return answer_record(question, "fake", ["text"], [gen], baseline=[base], order="method_first")


def test_summary_and_report_have_an_mbpp_row():
    records = [fake_record(2, "mbpp", "mbpp", [3, 1], 1.0), fake_record(3, "mbpp", "mbpp", [2, 2], 0.5),
               fake_record(81, "writing", "mt_bench", [1, 1], 1.0)]
    tasks = summarize(records, TASKS)
    assert list(tasks) == ["mt_bench", "mbpp", "overall"]  # Spec-Bench's order, then mbpp
    assert tasks["mbpp"]["n"] == 2 and tasks["mbpp"]["mat"] == pytest.approx(2.0)
    assert tasks["mbpp"]["speedup"] == pytest.approx(2.0)
    assert list(summarize(records[:2], TASKS)) == ["mbpp", "overall"]
    rows = [{"method": "m", "task": task, **figures} for task, figures in tasks.items()]
    table = compare_table(pd.DataFrame(rows))
    assert table["task"].tolist() == ["mt_bench", "mbpp", "overall"]  # no category lost in the report
    assert REPORT_ORDER.index("mbpp") == len(TASKS)
