"""Every method side by side on one model — what ``make run`` shows a new user.

    python -m specdec.running.compare                                              # conf/compare.yaml
    python -m specdec.running.compare 'methods=[pld,lookahead_cpu]' task.per_category=1
    python -m specdec.running.compare hydra.run.dir=runs/compare/<existing dir>    # resume

The model is loaded once. Per question, AR and every method of ``methods`` answer it in an order that
rotates by one each question (so each method runs before AR on some questions and after it on others),
and AR's answer is every method's paired baseline: speedups are ratios of runs made side by side on the
same question. Each method gets a standard run dir (``answers.jsonl``, ``summary.json``, ``sessions.jsonl``,
``.hydra/config.yaml``: what ``analysis/`` and ``make figures`` load); the ``ar`` dir holds AR's own
answers without a baseline. A question already in every run dir is skipped on a rerun (resume).
At the end: one per-task table (``compare.md`` / ``compare.csv``, printed) and ``speedup_by_task.png``.

Sizing of ``make run`` (12 questions, 64 new tokens, ~8 min on 2 idle cores): ``max_new_tokens`` in
conf/compare.yaml. ADED builds its ShareGPT tri-gram table once (~71 s, then cached under
``~/.cache/specdec``), which the first run pays.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from specdec import PROJECT_ROOT
from specdec.errors import UserError, run_in_output_dir
from specdec.running.report import compare_report
from specdec.running.results import AnswerFile, answer_record, write_json
from specdec.running.runner import (Answer, Runner, environment, model_id, record_session, run_summary,
                                    rotated, task_questions, warmup_question)
from specdec.verify.proposer import Proposer

log = logging.getLogger(__name__)
BASELINE = "ar"


@dataclass
class Arm:
    """One compared method: its run config, proposer and run dir."""
    name: str
    cfg: DictConfig       # the run config with ``method`` = this method's conf/method YAML
    proposer: Proposer
    answers: AnswerFile   # <out_dir>/<name>/answers.jsonl

    @property
    def run_dir(self) -> Path:
        return self.answers.path.parent


def command_line_overrides() -> list[str]:
    """This process's command-line overrides except ``methods``, ``method`` and ``hydra.*`` ([] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by @hydra.main (e.g. a test composing configs itself)
        return []
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("methods", "method")
            and not o.lstrip("+~").startswith("hydra.")]


def method_config(name: str, overrides: list[str] = ()) -> DictConfig:
    """The run config Hydra composes for ``run.py method=<name>`` plus this command line's ``overrides``: the
    method's YAML and its drafter -- the method's default drafter (e.g. kangaroo's adapter) unless the
    command line names one (``drafter=...``, then for every compared method, as for run.py)."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    try:
        return compose(config_name="config", overrides=[*overrides, f"method={name}"])
    except MissingConfigException:
        known = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "method").glob("*.yaml"))
        raise UserError(f"unknown method {name!r} in methods; available: {', '.join(known)}") from None


def compared_methods(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each compared method's composed run config by name (``method_config``), after the checks that only
    apply to a comparison (before the model loads, so a typo fails at once)."""
    names = list(cfg.get("methods") or [])
    if not names or len(set(names)) != len(names) or BASELINE in names:
        raise UserError(f"methods must be a non-empty list of distinct method keys without {BASELINE!r} "
                        f"(AR always runs as the baseline), got {names}")
    if cfg.baseline != "paired":
        raise UserError(f"a comparison pairs every method with AR: baseline must be 'paired', got {cfg.baseline!r}")
    if cfg.logger.get("name", "none") != "none":
        raise UserError("a comparison writes no W&B runs (logger must be none); run.py logs one method to W&B")
    if cfg.method.proposer != BASELINE:
        raise UserError(f"a comparison's method must be {BASELINE!r} (the baseline), got {cfg.method.name!r}")
    overrides = command_line_overrides()
    return {name: method_config(name, overrides) for name in names}


def make_arm(runner: Runner, cfg: DictConfig, out_dir: Path, name: str, composed: DictConfig) -> Arm:
    """One compared method: the comparison's config with the method and drafter ``composed`` for it."""
    arm_cfg = copy.deepcopy(cfg)
    with open_dict(arm_cfg):
        del arm_cfg["methods"]
        if name == BASELINE:
            arm_cfg.baseline = "none"  # AR's own answers; they are the others' paired baselines
        else:
            arm_cfg.method, arm_cfg.drafter = composed.method, composed.drafter
    run_dir = out_dir / name
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(arm_cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    proposer = runner.proposer if name == BASELINE else runner.build(arm_cfg)
    if name != BASELINE:
        log.info("%s drafts with drafter=%s", name, arm_cfg.drafter.get("name", "none"))
    return Arm(name, arm_cfg, proposer, AnswerFile(run_dir / "answers.jsonl"))


def warm_up(runner: Runner, arms: list[Arm], question: dict) -> None:
    """Untimed generations of the warm-up question by every arm (as ``Runner.warm_up`` does for one)."""
    rounds = [(i, arm) for i in range(int(runner.cfg.warmup)) for arm in arms]
    for i, arm in tqdm(rounds, desc=f"warm-up on question {question['question_id']} (untimed)", unit="generation"):
        runner.answer(question, arm.proposer, seed=-1 - i)
    if not runner.cfg.warmup_keeps_state:
        for arm in arms:
            arm.proposer.reset("run")


def answer_question(runner: Runner, arms: list[Arm], question: dict, index: int) -> None:
    """AR and every arm still missing ``question``, in the order rotated by ``index``; append the records."""
    seed = int(runner.cfg.seed) + index
    order = rotated(arms, index)
    results: dict[str, Answer] = {}
    for arm in order:
        if arm.name == BASELINE or question["question_id"] not in arm.answers.done:
            results[arm.name] = runner.answer(question, arm.proposer, seed)
    ar = results[BASELINE]
    ar_pos = [a.name for a in order].index(BASELINE)
    for pos, arm in enumerate(order):
        if arm.name not in results or question["question_id"] in arm.answers.done:
            continue
        mid = model_id(arm.cfg, runner.dtype)
        if arm.name == BASELINE:
            arm.answers.append(answer_record(question, mid, ar.texts, ar.gens))
            continue
        got = results[arm.name]
        lossless = None if runner.cfg.temperature else runner.divergence(got, ar)
        arm.answers.append(answer_record(question, mid, got.texts, got.gens, ar.gens, lossless,
                                         "method_first" if pos < ar_pos else "baseline_first"))


def compare(cfg: DictConfig, out_dir: Path) -> list[Path]:
    """Run AR and ``cfg.methods`` side by side into ``out_dir/<method>/``; write and print the table and
    the chart; return their paths."""
    methods = {BASELINE: cfg, **compared_methods(cfg)}
    questions, task_order = task_questions(cfg)
    runner = Runner(cfg)  # cfg.method is ar (conf/compare.yaml): runner.proposer answers as AR
    arms = [make_arm(runner, cfg, out_dir, name, method_cfg) for name, method_cfg in methods.items()]
    todo = [q for q in questions if any(q["question_id"] not in arm.answers.done for arm in arms)]
    for q in todo:
        runner.new_token_cap(q, runner.prompts.ids(q["turns"][:1], []))  # a refused question fails before any runs
    env = environment(runner)
    sessions = {arm.name: record_session(arm.run_dir / "sessions.jsonl", env, len(arm.answers.records), arm.cfg)
                for arm in arms}
    answered = {arm.name: sum(q["question_id"] not in arm.answers.done for q in questions) for arm in arms}
    for arm in arms:
        arm.proposer.reset("run")
    if todo and cfg.warmup:
        warm_up(runner, arms, warmup_question(cfg, questions))
    for arm in arms:
        arm.proposer.reset_stats()  # method_stats count timed questions only, whatever warm-up kept
    position = {qid: i for i, qid in enumerate(questions["question_id"])}  # stable across resumes
    for q in tqdm(todo, desc=f"{'+'.join(a.name for a in arms)} on {cfg.task.name}", unit="question"):
        answer_question(runner, arms, q, position[q["question_id"]])
    summaries = {arm.name: run_summary(arm.cfg, arm.answers.records, task_order, sessions[arm.name], arm.proposer,
                                       arm.run_dir, answered[arm.name]) for arm in arms}
    for arm in arms:
        write_json(arm.run_dir / "summary.json", summaries[arm.name])
    return compare_report(out_dir, summaries, f"{cfg.model.name} on {cfg.task.name}, {cfg.max_new_tokens} new tokens, "
                                              f"{env['device']} {env['dtype']}, {env['threads']} threads")


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="compare")
def main(cfg: DictConfig):
    return run_in_output_dir(lambda out_dir: compare(cfg, out_dir))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
