"""Task suites: Spec-Bench-style question files (``question.jsonl``) and their report categories.

``spec_bench/question.jsonl`` is the Spec-Bench question set (480 questions; provenance and licence
in ``spec_bench/LICENSE-DATA.md``). Each line holds ``question_id``, ``category`` and ``turns``;
MT-bench's 8 categories are reported together as ``mt_bench`` (Spec-Bench's ``evaluation/speed.py``).
``mbpp/question.jsonl`` is Token Recycling's MBPP set (399 code questions, category ``mbpp``; provenance
and licence in ``mbpp/LICENSE-DATA.md``), reported as one more Spec-Bench-style category.

Order: a run's summary lists the tasks its file holds, Spec-Bench's six in Spec-Bench's order and any other
category (``mbpp``) after them (``specdec.running.results.summarize``); the comparison report and the analysis
tables order their rows by ``REPORT_ORDER`` (Spec-Bench's six, then ``mbpp``).

    from tasks import load_questions
    questions = load_questions("tasks/spec_bench/question.jsonl", per_category=2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from specdec.errors import UserError

ROOT = Path(__file__).resolve().parent
SPEC_BENCH = ROOT / "spec_bench" / "question.jsonl"
MBPP = ROOT / "mbpp" / "question.jsonl"

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")  # Spec-Bench's six, its order
REPORT_ORDER = TASKS + ("mbpp",)  # every task a shipped question file holds, in report order


def task_of(category: str) -> str:
    """Spec-Bench report name of a question category (the 8 MT-bench categories -> ``mt_bench``)."""
    return "mt_bench" if category in MT_BENCH_CATEGORIES else category


def _parse(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"question file {path} does not exist")
    questions, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        turns = record.get("turns")
        if "question_id" not in record or not isinstance(record.get("category"), str) or \
                not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{path}:{lineno}: needs question_id, category (string) and turns (non-empty list of strings)")
        if record["question_id"] in seen:
            raise UserError(f"{path}:{lineno}: duplicate question_id {record['question_id']}")
        seen.add(record["question_id"])
        questions.append({"question_id": record["question_id"], "category": record["category"],
                          "task": task_of(record["category"]), "turns": turns})
    if not questions:
        raise UserError(f"question file {path} holds no questions")
    return questions


def load_questions(path: str | Path = SPEC_BENCH, per_category: Optional[int] = None):
    """Questions in file order as a ``datasets.Dataset``; ``per_category=N`` keeps the first N of each task."""
    from datasets import Dataset

    questions = _parse(Path(path))
    if per_category is not None:
        if per_category <= 0:
            raise UserError(f"task.per_category must be positive, got {per_category}")
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            counts[q["task"]] = counts.get(q["task"], 0) + 1
            if counts[q["task"]] <= per_category:
                kept.append(q)
        questions = kept
    return Dataset.from_list(questions)
