"""``run.py`` end to end (tiny random model and the embedded SmolLM2), resume, the result files,
and every bad input: one ``error:`` line, a non-zero exit, no stack trace, nothing lost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import EMBEDDED, tiny_llama
from specdec.models import cached_embedded_copy, default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "tasks" / "spec_bench" / "question.jsonl"


def run_cli(*overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (context 2048) with SmolLM2's tokenizer and chat template, saved like a hub checkpoint."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=49152, context=2048).save_pretrained(out)
    tokenizer_dir = cached_embedded_copy(EMBEDDED, default_cache_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def tiny_args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model_dir}", "model.name=tiny", f"hydra.run.dir={run_dir}", "task.per_category=1",
            "max_new_tokens=8", "warmup=1", *extra]


def read_answers(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]


def test_tiny_run_writes_records_summary_and_resumes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny_args(tiny_model_dir, run_dir, "method=ar", "logger.mode=offline"))
    assert "overall" in proc.stdout  # the per-task table
    records = read_answers(run_dir)
    assert [r["task"] for r in records] == ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    first = records[0]
    choice = first["choices"][0]
    assert len(choice["turns"]) == len(choice["output_ids"]) == 2  # MT-bench: two turns
    assert choice["new_tokens"] == [len(ids) for ids in choice["output_ids"]]
    assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
    assert first["lossless"]["identical"] and first["baseline"]["output_ids"] == choice["output_ids"]
    assert {r["order"] for r in records} == {"method_first", "baseline_first"}
    summary = json.loads((run_dir / "summary.json").read_text())
    overall = summary["tasks"]["overall"]
    assert overall["n"] == 6 and overall["mat"] == 1.0 and overall["lossless"] == 1.0  # AR: one token a step
    assert set(summary["tasks"]) == {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "overall"}
    assert summary["env"]["dtype"] == "float32" and summary["env"]["torch"] == torch.__version__
    assert (run_dir / ".hydra" / "config.yaml").exists() and any((run_dir / "wandb").glob("offline-run-*"))

    # an interrupted run: the last record is cut in the middle of its line
    lines = (run_dir / "answers.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "answers.jsonl").write_text("".join(lines[:4]) + lines[4][:40])
    run_cli(*tiny_args(tiny_model_dir, run_dir, "method=ar", "logger=none"))
    resumed = read_answers(run_dir)
    assert [r["question_id"] for r in resumed] == [r["question_id"] for r in records]
    assert [r["answer_id"] for r in resumed[:4]] == [r["answer_id"] for r in records[:4]]  # kept, not redone

    run_cli(*tiny_args(tiny_model_dir, run_dir, "method=ar", "logger=none"))  # all done: nothing is duplicated
    assert len(read_answers(run_dir)) == 6
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["questions_done"] for s in summary["sessions"]] == [0, 4, 6]  # where each process started
    assert all(s["env"]["torch"] == torch.__version__ for s in summary["sessions"])
    assert summary["method_stats_questions"] == 2  # the last process answered none: the resume's stats are kept

    # another method into the same dir is refused before anything is written
    proc = run_cli(*tiny_args(tiny_model_dir, run_dir, "method=pld", "logger=none"), check=False)
    assert proc.returncode == 2 and "holds a run with other settings (method differ" in proc.stderr
    assert len(read_answers(run_dir)) == 6 and json.loads((run_dir / "summary.json").read_text()) == summary
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").method.name == "ar"  # Hydra's overwrite undone


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    for fragment in fragments:
        assert fragment in message, message[-2000:]


@pytest.mark.parametrize("group,value", [("method", "nosuchmethod"), ("model", "nosuchmodel"), ("task", "nosuchtask")])
def test_unknown_config_choice_lists_the_options(group, value):
    proc = run_cli(f"{group}={value}", check=False)
    assert_user_error(proc, f"Could not find '{group}/{value}'", "Available options")


def test_unreachable_hub_model(tmp_path):
    proc = run_cli("model=vicuna-7b", f"hydra.run.dir={tmp_path}", "logger=none", check=False)
    assert_user_error(proc, "error: model 'lmsys/vicuna-7b-v1.3' is not in the local Hugging Face cache")


def test_missing_and_malformed_question_files(tiny_model_dir, tmp_path):
    proc = run_cli(*tiny_args(tiny_model_dir, tmp_path / "a", f"task.path={tmp_path / 'none.jsonl'}"), check=False)
    assert_user_error(proc, "error: question file", "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(QUESTIONS.read_text().splitlines()[0] + "\n{not json\n")
    proc = run_cli(*tiny_args(tiny_model_dir, tmp_path / "b", f"task.path={bad}"), check=False)
    assert_user_error(proc, f"error: {bad}:2: not valid JSON")


def test_bad_settings(tiny_model_dir, tmp_path):
    proc = run_cli(*tiny_args(tiny_model_dir, tmp_path / "a", "max_new_tokens=0"), check=False)
    assert_user_error(proc, "error: max_new_tokens must be a positive integer")
    if not torch.cuda.is_available():
        proc = run_cli(*tiny_args(tiny_model_dir, tmp_path / "b", "device=cuda"), check=False)
        assert_user_error(proc, "error: device=cuda was asked for but CUDA is not available")


def test_prompt_longer_than_context_keeps_finished_records(tiny_model_dir, tmp_path):
    """context_policy=refuse checks every question before any generation; answers already written stay untouched."""
    run_dir = tmp_path / "ctx"
    short = tmp_path / "short.jsonl"
    lines = QUESTIONS.read_text().splitlines()
    short.write_text(lines[80] + "\n")  # question 161 (translation, a short prompt)
    run_cli(*tiny_args(tiny_model_dir, run_dir, "logger=none", f"task.path={short}"))
    before = (run_dir / "answers.jsonl").read_text()
    short.write_text(lines[80] + "\n" + lines[160] + "\n")  # + question 241 (summarization, a long article)
    proc = run_cli(*tiny_args(tiny_model_dir, run_dir, "logger=none", f"task.path={short}", "max_new_tokens=1500",
                              "context_policy=refuse"), check=False)
    assert_user_error(proc, "error: question 241: prompt of", "passes the model's trained length of 2048")
    assert (run_dir / "answers.jsonl").read_text() == before


def test_warmup_runs_on_a_question_outside_the_timed_set():
    """With warm-up state kept, warming up on a timed question would time an answer the method has seen."""
    from omegaconf import OmegaConf

    from specdec.running.runner import task_questions, warmup_question

    mini = OmegaConf.create({"task": {"path": str(QUESTIONS), "per_category": 2}})
    questions, _ = task_questions(mini)
    spare = warmup_question(mini, questions)
    assert spare["question_id"] not in set(questions["question_id"])
    full = OmegaConf.create({"task": {"path": str(QUESTIONS), "per_category": None}})
    questions, _ = task_questions(full)
    assert warmup_question(full, questions)["question_id"] == questions[0]["question_id"]


def test_a_sweep_survives_a_bad_job_and_lists_it_at_the_end(tiny_model_dir, tmp_path):
    """Three jobs, the middle one refused (max_new_tokens=-1): the others finish, the bad one leaves its
    reason in its run dir, and the sweep ends by listing it with exit code 2."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", f"model.path={tiny_model_dir}", "model.name=tiny", f"hydra.sweep.dir={sweep}",
                   "task.per_category=1", "warmup=0", "method=ar", "logger=none", "threads=1", "baseline=none",
                   "max_new_tokens=4,-1,6", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [json.loads((sweep / str(n) / "summary.json").read_text())["max_new_tokens"] for n in (0, 2)] == [4, 6]
    reason = (sweep / "1" / "error.txt").read_text().strip()
    assert "max_new_tokens" in reason and not (sweep / "1" / "summary.json").exists()
    assert "error: 1 sweep job(s) failed" in proc.stderr and f"{sweep / '1'}: {reason}" in proc.stderr
