"""One benchmark run: load the target, build the method, answer every question of the task (each
turn one generation), pair each question with the autoregressive baseline, write the results.

``baseline: paired`` runs AR on the same question right next to the method, alternating which goes
first, so the speedup is a side-by-side ratio on a noisy machine; ``baseline: none`` skips it.
Resume: questions already in ``answers.jsonl`` are skipped; every process appends its environment to
``sessions.jsonl`` before the first question (the summary lists them all). A run dir resumes only with
the settings it was started with (``RESULT_KEYS``); another method or drafter into it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from specdec import PROJECT_ROOT
from specdec.verify.acceptance import make_rule
from specdec.backends import backend_of, one_row_kernels
from specdec.verify.decode import Generation, Stopwatch, generate
from specdec.drafters import build_drafter
from specdec.errors import UserError
from specdec.models import default_cache_dir, load_model, near_tie_gap, resolve_device, resolve_dtype, vocab_size
from specdec.running.context import ContextPolicy
from specdec.running.corpus import token_counts
from specdec.running.prompts import PromptBuilder, stop_ids
from specdec.verify.proposer import MethodEnv, Proposer, build_proposer
from specdec.running.results import SCHEMA_VERSION, AnswerFile, answer_record, format_table, summarize, write_json
from specdec.running.settings import check_settings
from specdec.verify.target import Target, warm
from specdec.running.tracking import make_tracker

log = logging.getLogger(__name__)


@dataclass
class Answer:
    texts: list[str]
    gens: list[Generation]
    prompts: list[list[int]]


class Runner:
    """Everything loaded once per run; ``answer`` runs one question through one proposer."""

    def __init__(self, cfg: DictConfig):
        check_settings(cfg)  # one clear line for a bad setting; numeric settings coerced to their types
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.device = resolve_device(str(cfg.device))
        self.dtype = resolve_dtype(str(cfg.dtype), self.device)
        torch.manual_seed(int(cfg.seed))
        self.model, self.tokenizer = load_model(cfg.model.path, self.device, self.dtype,
                                                cfg.model.get("attn_implementation", "sdpa"), default_cache_dir(),
                                                backend=str(cfg.backend))
        self.target = Target(self.model)
        self.prompts = PromptBuilder(self.tokenizer, cfg.model.get("chat_template"))
        self.stops = stop_ids(self.tokenizer, self.model.generation_config)
        self.context = ContextPolicy.of(self.model, str(cfg.context_policy))
        self.clock = Stopwatch(self.device)
        self.proposer = self.build(cfg)
        if self.target.backend == "compile":  # compile the method's tree sizes before anything is timed (logged)
            warm(self.target, self.proposer.tree_sizes())
        self.baseline = Proposer(self.proposer.env) if cfg.baseline == "paired" else None

    def build(self, cfg: DictConfig) -> Proposer:
        """The proposer of a run config -- its ``method`` with its own ``drafter`` -- on this run's target
        (``specdec.running.compare`` builds one per compared method, each with the drafter its composition names)."""
        def plain(key):  # a config group as a dict (None if absent)
            return OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) else None

        drafter = build_drafter(plain("drafter"), self.model, self.tokenizer, vocab_size(self.model), default_cache_dir(),
                                partial(token_counts, default_cache_dir(), self.tokenizer))  # for drafter.vocab=top-k
        env = MethodEnv(vocab_size=vocab_size(self.model), device=self.device, tokenizer=self.tokenizer,
                        model=self.model, seed=int(cfg.seed), cache_dir=str(default_cache_dir()), drafter=drafter,
                        temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p),
                        auto_budget=plain("auto_budget"))
        return build_proposer(OmegaConf.to_container(cfg.method, resolve=True), env)

    def new_token_cap(self, question: dict, prompt_ids: list[int]) -> int:
        """This turn's new-token budget under ``context_policy`` (specdec/running/context.py); raises when refused."""
        return self.context.new_token_cap(question["question_id"], len(prompt_ids), int(self.cfg.max_new_tokens))

    def answer(self, question: dict, proposer: Proposer, seed: int) -> Answer:
        """Every turn of ``question``; each turn's random streams (acceptance here, drafting in the proposer
        via ``Context.seed``) are seeded from (``seed``, turn) alone, so a resumed run answers as an
        uninterrupted one."""
        proposer.reset("question")
        texts, gens, prompts = [], [], []
        for turn in range(len(question["turns"])):
            prompt_ids = self.prompts.ids(question["turns"][:turn + 1], texts)
            cap = self.new_token_cap(question, prompt_ids)
            proposer.reset("turn")
            turn_seed = seed * 1000 + turn
            rule = make_rule(self.cfg.temperature, self.cfg.top_k, self.cfg.top_p,
                             torch.Generator().manual_seed(turn_seed))
            gen = generate(self.target, proposer, prompt_ids, cap, self.stops, rule, self.clock,
                           seed=turn_seed) if cap else Generation()
            if cap < int(self.cfg.max_new_tokens) and gen.stop_reason == "max_new_tokens":
                gen.stop_reason = "context"
            gen.prompt_tokens, gen.past_context = len(prompt_ids), self.context.past(len(prompt_ids), gen.new_tokens)
            texts.append(self.prompts.answer_text(gen.output_ids))
            gens.append(gen)
            prompts.append(prompt_ids)
        return Answer(texts, gens, prompts)

    @torch.inference_mode()
    def divergence(self, method: Answer, baseline: Answer) -> dict:
        """First turn/position where the method's ids leave the baseline's, the target's top-2 logit gap
        there, and whether that is a ``near_tie`` (gap below ``near_tie_gap(dtype)``: numerics may flip it)
        or a real divergence (a wide gap: a verifier or method bug)."""
        threshold = near_tie_gap(self.dtype)
        for turn, (ours, ref) in enumerate(zip(method.gens, baseline.gens)):
            if ours.output_ids == ref.output_ids:
                continue
            pos = next((i for i, (a, b) in enumerate(zip(ours.output_ids, ref.output_ids)) if a != b),
                       min(len(ours.output_ids), len(ref.output_ids)))
            ids = torch.tensor([baseline.prompts[turn] + ref.output_ids[:pos]], device=self.device)
            top2 = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().topk(2).values
            gap = float(top2[0] - top2[1])
            return {"identical": False, "near_tie": gap < threshold, "turn": turn, "position": pos,
                    "top2_logit_gap": gap, "near_tie_threshold": threshold}
        return {"identical": True, "near_tie": False, "turn": None, "position": None, "top2_logit_gap": None,
                "near_tie_threshold": threshold}

    def warm_up(self, question: dict) -> None:
        """Untimed generations on the first question (kernels, allocator, caches; Spec-Bench runs 3)."""
        for i in range(int(self.cfg.warmup)):
            for proposer in filter(None, (self.proposer, self.baseline)):
                self.answer(question, proposer, seed=-1 - i)
        if not self.cfg.warmup_keeps_state:
            self.proposer.reset("run")


def rotated(items: list, i: int) -> list:
    """The order of run ``i``: ``items`` rotated by ``i`` (two items alternate which goes first), so machine
    drift hits every side-by-side system alike."""
    shift = i % len(items)
    return items[shift:] + items[:shift]


def model_id(cfg: DictConfig, dtype: torch.dtype) -> str:
    return f"{cfg.model.name}-{cfg.method.name}-{str(dtype).removeprefix('torch.')}-temp-{float(cfg.temperature)}"


def environment(runner: Runner) -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"device": str(runner.device), "device_name": torch.cuda.get_device_name(runner.device)
            if runner.device.type == "cuda" else platform.processor() or platform.machine(),
            "dtype": str(runner.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "git_commit": commit, "git_dirty": dirty, "attn_implementation": runner.model.config._attn_implementation,
            "sdpa_force_gqa": os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA"), "backend": backend_of(runner.model),
            "one_row_kernels": one_row_kernels(runner.model)}


# What a run dir's answers depend on: every session of one run dir must agree on these. How a session
# runs (device, back end, threads, logger) may differ and is recorded in its ``env`` instead.
RESULT_KEYS = ("model", "method", "drafter", "auto_budget", "task", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
               "dtype", "baseline", "warmup", "warmup_keeps_state", "context_policy")


def run_identity(cfg: DictConfig) -> dict:
    """The settings of ``RESULT_KEYS`` in ``cfg``, resolved, as JSON values. ``drafter.vocab: full`` is left out: the
    key came later (FR-Spec, docs/fr_spec.md), and run dirs made before it drafted with the full vocabulary."""
    identity = json.loads(json.dumps({key: OmegaConf.to_container(cfg[key], resolve=True)
                                      if OmegaConf.is_config(cfg[key]) else cfg[key]
                                      for key in RESULT_KEYS if key in cfg}))
    if isinstance(identity.get("drafter"), dict) and identity["drafter"].get("vocab") == "full":
        del identity["drafter"]["vocab"]
    return identity


def record_session(path: Path, env: dict, questions_done: int, cfg: DictConfig) -> list[dict]:
    """Append this process's environment to ``sessions.jsonl`` before any question runs (an interrupted
    run still says where it ran) and return every session so far. A resumed run restarts stateful
    methods cold (recycle's table, lookahead's tries): ``questions_done`` shows where that happened.

    A run dir whose sessions ran other settings (``run_identity``) is refused; the launch's
    ``.hydra/config.yaml`` is put back to the run's own, so nothing the run wrote is lost."""
    identity = run_identity(cfg)
    sessions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()] if path.exists() else []
    for old in sessions:
        # a setting added to RESULT_KEYS after a run started is not in its old sessions: compare the shared ones
        keys = sorted(k for k in set(identity) & set(old.get("identity", {})) if identity[k] != old["identity"][k])
        if keys:
            OmegaConf.save(OmegaConf.create(sessions[-1]["config"]), path.parent / ".hydra" / "config.yaml")
            raise UserError(f"{path.parent} holds a run with other settings ({', '.join(keys)} differ; its method is "
                            f"{old['identity'].get('method', {}).get('name')!r}): resume it with the same settings "
                            f"or write to a new hydra.run.dir / hydra.sweep.dir")
    session = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "questions_done": questions_done,
               "env": env, "identity": identity, "config": OmegaConf.to_container(cfg, resolve=True)}
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(session) + "\n")
    return sessions + [session]


def task_path(cfg: DictConfig) -> Path:
    path = Path(cfg.task.path)
    return PROJECT_ROOT / path if not path.is_absolute() and not path.exists() else path


def task_questions(cfg: DictConfig):
    from tasks import TASKS, load_questions

    return load_questions(task_path(cfg), cfg.task.get("per_category")), TASKS


def warmup_question(cfg: DictConfig, questions) -> dict:
    """The question warm-up runs on: the first one of the task's file that is not timed, so a method that
    keeps its warm-up state (``warmup_keeps_state``) is never timed on an answer it has already seen.
    Spec-Bench warms up on its first timed question; with state kept that inflates the question's MAT
    (measured on spec_bench_mini: lookahead_cpu 5.05 instead of 1.49 on question 1). When the task times
    every question of its file, Spec-Bench's choice (the first question) is the only one left."""
    from tasks import load_questions

    timed = set(questions["question_id"])
    spare = next((q for q in load_questions(task_path(cfg)) if q["question_id"] not in timed), None)
    if spare is None:
        log.warning("every question of %s is timed: warm-up runs on the first one (as Spec-Bench)", cfg.task.path)
    return spare or questions[0]


def run_summary(cfg: DictConfig, records: list[dict], task_order, sessions: list[dict], proposer: Proposer,
                run_dir: Path, answered: int) -> dict:
    """``summary.json`` of one run dir (``cfg.method`` names the method whose records these are).

    ``method_stats`` are the proposer's counters over the ``answered`` questions of this process; a
    resume that answered none keeps the previous summary's."""
    stats, stats_questions = proposer.stats(), answered
    previous = run_dir / "summary.json"
    if not answered and previous.exists():
        old = json.loads(previous.read_text(encoding="utf-8"))
        stats, stats_questions = old.get("method_stats", stats), old.get("method_stats_questions")
    return {
        "schema_version": SCHEMA_VERSION, "method": cfg.method.name, "model": cfg.model.name, "task": cfg.task.name,
        "tasks": summarize(records, task_order), "env": sessions[-1]["env"],
        "sessions": [{k: v for k, v in session.items() if k != "config"} for session in sessions],
        "warmup": int(cfg.warmup), "warmup_keeps_state": bool(cfg.warmup_keeps_state),
        "temperature": float(cfg.temperature), "max_new_tokens": int(cfg.max_new_tokens),
        "baseline": cfg.baseline, "method_stats": stats, "method_stats_questions": stats_questions,
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run the configured method on the configured task into ``run_dir``; return the summary."""
    questions, task_order = task_questions(cfg)
    runner = Runner(cfg)
    answers = AnswerFile(run_dir / "answers.jsonl")
    todo = [q for q in questions if q["question_id"] not in answers.done]
    for q in todo:
        runner.new_token_cap(q, runner.prompts.ids(q["turns"][:1], []))  # a refused question fails before any runs
    if answers.records:
        log.info("resuming: %d of %d questions already in %s", len(answers.records), len(questions), answers.path)
    sessions = record_session(run_dir / "sessions.jsonl", environment(runner), len(answers.records), cfg)
    tracker = make_tracker(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    mid = model_id(cfg, runner.dtype)
    runner.proposer.reset("run")
    if todo and cfg.warmup:
        runner.warm_up(warmup_question(cfg, questions))
    runner.proposer.reset_stats()  # method_stats count timed questions only, whatever warm-up kept
    position = {qid: i for i, qid in enumerate(questions["question_id"])}  # stable across resumes
    for q in tqdm(todo, desc=f"{cfg.method.name} on {cfg.task.name}", unit="question"):
        index = position[q["question_id"]]
        seed = int(cfg.seed) + index
        method_first = index % 2 == 0
        baseline = None
        if runner.baseline is not None and not method_first:
            baseline = runner.answer(q, runner.baseline, seed)
        method = runner.answer(q, runner.proposer, seed)
        if runner.baseline is not None and method_first:
            baseline = runner.answer(q, runner.baseline, seed)
        lossless = runner.divergence(method, baseline) if baseline is not None and not cfg.temperature else None
        record = answer_record(q, mid, method.texts, method.gens, baseline and baseline.gens, lossless,
                               None if baseline is None else ("method_first" if method_first else "baseline_first"))
        answers.append(record)
        tracker.log_question(record)
    summary = run_summary(cfg, answers.records, task_order, sessions, runner.proposer, run_dir, len(todo))
    write_json(run_dir / "summary.json", summary)
    table = format_table(summary["tasks"])
    print(f"\n{cfg.method.name} vs AR on {cfg.task.name} ({cfg.model.name}, {summary['env']['device']}, "
          f"{summary['env']['dtype']}) -> {run_dir}\n{table}")
    tracker.log_summary(summary)
    tracker.finish()
    return summary
