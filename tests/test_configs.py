"""Every config composes; method YAMLs, their ``name`` and the registry agree; every method's
constructor accepts its YAML; every registered method reproduces greedy AR output on SmolLM2."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import method_env, run_generation
from specdec.drafters import build_drafter
from specdec.errors import UserError
from specdec.verify.proposer import build_proposer, registry

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASK_FILES = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


def compose_config(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_defaults():
    cfg = compose_config()
    assert (cfg.model.name, cfg.task.name, cfg.logger.name, cfg.logger.mode) == ("smollm2-135m", "spec_bench_mini", "wandb", "offline")
    assert cfg.method.name in ("ar", "recycle") and cfg.temperature == 0 and cfg.baseline == "paired"
    assert cfg.max_new_tokens == cfg.task.max_new_tokens


@pytest.mark.parametrize("name", METHODS)
def test_method_yaml_matches_registry(name):
    cfg = compose_config(f"method={name}")
    assert cfg.method.name == name  # file stem == name
    assert cfg.method.proposer in registry()


@pytest.mark.parametrize("name", MODELS)
def test_model_yaml_composes(name):
    cfg = compose_config(f"model={name}")
    assert cfg.model.name == name and cfg.model.path


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_yaml_composes(name):
    cfg = compose_config(f"task={name}")
    assert cfg.task.name == name and cfg.max_new_tokens > 0


def test_vicuna_template_matches_fastchat(smollm2):
    """The configured template renders FastChat's vicuna_v1.1 prompt, turn 2 included."""
    from specdec.running.prompts import PromptBuilder

    _, tok, _ = smollm2
    builder = PromptBuilder(tok, compose_config("model=vicuna-7b").model.chat_template)
    text = tok.apply_chat_template(builder.messages(["Hi?", "More?"], ["Hello."]), chat_template=builder.chat_template,
                                   tokenize=False, add_generation_prompt=True)
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert text == f"{system} USER: Hi? ASSISTANT: Hello.</s>USER: More? ASSISTANT:"


def test_slurm_launcher_and_experiments_compose():
    cfg = compose_config("hydra/launcher=slurm_gpu", hydra_cfg=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
    cfg = compose_config("+experiment=speedup_table")
    assert (cfg.model.name, cfg.task.name, cfg.max_new_tokens) == ("vicuna-7b", "spec_bench", 1024)
    cfg = compose_config("+debug=quick")
    assert cfg.logger.name == "none" and cfg.max_new_tokens == 16


def test_unknown_method_setting_fails_at_start(smollm2):
    model, tok, _ = smollm2
    with pytest.raises(UserError, match="unknown setting"):
        build_proposer({"name": "ar", "proposer": "ar", "typo_knob": 3}, method_env(model, tok))


def test_only_a_refused_setting_reads_as_a_config_error(tiny_model, monkeypatch):
    """A constructor's SettingError (or a missing setting) is one UserError line naming the method; any other
    error raised while building it is a bug and keeps its type and traceback."""
    from specdec.verify import proposer as proposer_module
    from specdec.errors import SettingError
    from specdec.verify.proposer import Proposer

    class Picky(Proposer):
        def __init__(self, env, size: int, bug: bool = False):
            super().__init__(env)
            if size < 1:
                raise SettingError(f"size must be >= 1, got {size}")
            if bug:
                int("not a number")  # a ValueError from a bug, not from the config

    monkeypatch.setitem(proposer_module._REGISTRY, "picky", Picky)
    env = method_env(tiny_model)
    with pytest.raises(UserError, match=r"^method 'p': size must be >= 1, got 0$"):
        build_proposer({"name": "p", "proposer": "picky", "size": 0}, env)
    with pytest.raises(UserError, match="missing a required argument: 'size'"):
        build_proposer({"name": "p", "proposer": "picky"}, env)
    with pytest.raises(ValueError, match="invalid literal") as bug:
        build_proposer({"name": "p", "proposer": "picky", "size": 1, "bug": True}, env)
    assert not isinstance(bug.value, UserError)
    assert isinstance(build_proposer({"name": "p", "proposer": "picky", "size": 2}, env), Picky)


def shipped_proposer(name: str, model, tok):
    """``conf/method/<name>.yaml`` as shipped, with the drafter its YAML composes (a missing head fails here:
    never an untrained stand-in): the sampling family's is the model's draft model (``drafter=draft_model``; on
    SmolLM2 the Kangaroo adapter)."""
    cfg = compose_config(f"method={name}")
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    env = method_env(model, tok)
    if registry()[method_cfg["proposer"]].needs_drafter:
        drafter_cfg = OmegaConf.to_container(cfg.drafter, resolve=True)
        env = dataclasses.replace(env, drafter=build_drafter(drafter_cfg, model, tok, env.vocab_size))
    proposer = build_proposer(method_cfg, env)
    proposer.reset("run")
    return proposer


BOTH = ("mt_bench", "summarization")


@pytest.mark.parametrize("backend,tasks", [("eager", ("summarization",)),
                                           pytest.param("eager", BOTH, marks=pytest.mark.full, id="eager-both"),
                                           pytest.param("onednn", BOTH, marks=pytest.mark.full, id="onednn-both")])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_is_lossless_under_greedy(name, backend, tasks, smollm2, smollm2_onednn, task_prompts,
                                               ar_outputs):
    """A guard for new methods: each YAML, as shipped, reproduces eager AR on real prompts (summarization: long
    copies, so every method's trees get accepted nodes) on eager; the full suite adds a second prompt and the
    CPU default back end (onednn, one-row kernels forced to oneDNN: the case that can differ from eager)."""
    model, tok = smollm2_onednn if backend == "onednn" else smollm2[:2]
    proposer = shipped_proposer(name, model, tok)
    accepted = 0
    for task in tasks:
        proposer.reset("question")
        gen = run_generation(model, proposer, task_prompts[task], 24, smollm2[2])
        assert gen.output_ids == ar_outputs[task][:24], (name, backend, task)
        assert name == "ar" or max(gen.tree_sizes) > 1, f"{name}: never drafted (a vacuous check)"
        accepted += sum(n > 1 for n in gen.accept_lengths)
    assert name == "ar" or len(tasks) == 1 or accepted > 0, f"{name}: no draft accepted on either prompt"
