"""What a run's figures count: ``method_stats`` start at the first timed question (never warm-up, whatever
``warmup_keeps_state`` keeps), every compared method composes its own drafter as ``run.py`` would, and a
resumed sampled run draws exactly as an uninterrupted one (every random stream seeded per question and turn)."""

import json
import shutil

import pytest
from hydra import compose, initialize_config_dir

from specdec.running import compare as compare_module
from specdec.running.compare import compared_methods
from test_compare import compare_cli
from test_run import ROOT, read_answers, run_cli, tiny_args, tiny_model_dir  # noqa: F401 (a fixture)

DRAFT = ("drafter=early_exit", "drafter.exit_layer=1")  # the tiny model has no trained heads


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def steps(run_dir) -> int:
    """Verify steps of the method over every timed question (one accept length per step)."""
    return sum(len(r["choices"][0]["accept_lengths"]) for r in read_answers(run_dir))


def test_method_stats_count_timed_questions_only(tiny_model_dir, tmp_path):
    # recycle keeps its warm-up table (warmup_keeps_state: true) but its update counter starts at question 1
    run_cli(*tiny_args(tiny_model_dir, tmp_path / "recycle", "method=recycle", "warmup=2", "logger=none",
                       "threads=1"))
    # one update per verify step, except (by the released rule) at most the last step of a turn
    turns = sum(len(r["choices"][0]["new_tokens"]) for r in read_answers(tmp_path / "recycle"))
    updates = summary(tmp_path / "recycle")["method_stats"]["updates"]
    assert steps(tmp_path / "recycle") - turns <= updates <= steps(tmp_path / "recycle")
    # the drafter's forward count: a warmed-up run counts what a run without warm-up counts (greedy: same drafts)
    forwards = {}
    for warmup in (0, 2):
        run_dir = tmp_path / f"sps-{warmup}"
        run_cli(*tiny_args(tiny_model_dir, run_dir, "method=sps", *DRAFT, f"warmup={warmup}", "logger=none",
                           "threads=1", "baseline=none"))
        forwards[warmup] = summary(run_dir)["method_stats"]["draft_forwards"]
    assert forwards[0] == forwards[2] > 0


def test_compare_arms_compose_their_own_drafters(monkeypatch):
    """``methods=[kangaroo, eagle2, recycle]``: each method's default drafter (as ``run.py method=<m>``);
    a ``drafter=`` on the command line applies to every method, as it would to run.py."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("compare", overrides=["methods=[kangaroo,eagle2,recycle]"])
        arms = compared_methods(cfg)
        assert {name: arm.drafter.name for name, arm in arms.items()} == {
            "kangaroo": "kangaroo", "eagle2": "eagle", "recycle": "none"}
        assert arms["kangaroo"].method.name == "kangaroo" and arms["eagle2"].method.budget is not None
        monkeypatch.setattr(compare_module, "command_line_overrides", lambda: ["drafter=early_exit"])
        arms = compared_methods(compose("compare", overrides=["methods=[kangaroo,sps]", "drafter=early_exit"]))
        assert {name: arm.drafter.name for name, arm in arms.items()} == {"kangaroo": "early_exit",
                                                                          "sps": "early_exit"}


@pytest.mark.full
def test_compare_runs_draft_methods_with_their_drafters_and_clean_stats(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    compare_cli(f"model.path={tiny_model_dir}", "model.name=tiny", f"hydra.run.dir={out}", "task.per_category=1",
                "max_new_tokens=8", "warmup=2", "threads=1", "methods=[sps,kangaroo]", *DRAFT)
    alone = tmp_path / "sps"
    run_cli(*tiny_args(tiny_model_dir, alone, "method=sps", *DRAFT, "warmup=0", "logger=none", "threads=1",
                       "baseline=none"))
    for name in ("sps", "kangaroo"):
        config = (out / name / ".hydra" / "config.yaml").read_text()
        assert "kind: early_exit" in config and f"name: {name}" in config
        assert all(r["lossless"]["identical"] for r in read_answers(out / name))
    # one drafter per compared method, its forwards counted from the first timed question
    assert summary(out / "sps")["method_stats"]["draft_forwards"] == summary(alone)["method_stats"]["draft_forwards"]


@pytest.mark.full
def test_resumed_sampled_run_draws_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """T = 1 with a sampled draft chain (sps): cut the finished run after 3 of its 6 questions and resume it."""
    args = ("method=sps", *DRAFT, "temperature=1.0", "logger=none", "threads=1", "baseline=none")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_cli(*tiny_args(tiny_model_dir, whole, *args))
    resumed.mkdir()
    lines = (whole / "answers.jsonl").read_text().splitlines(keepends=True)
    (resumed / "answers.jsonl").write_text("".join(lines[:3]))
    shutil.copy(whole / "sessions.jsonl", resumed / "sessions.jsonl")
    run_cli(*tiny_args(tiny_model_dir, resumed, *args))
    ids = [[r["question_id"], r["choices"][0]["output_ids"]] for r in read_answers(whole)]
    assert [[r["question_id"], r["choices"][0]["output_ids"]] for r in read_answers(resumed)] == ids
    drafted = sum(len(r["choices"][0]["accept_lengths"]) for r in read_answers(whole))
    assert drafted < sum(sum(r["choices"][0]["new_tokens"]) for r in read_answers(whole))  # drafts were accepted
