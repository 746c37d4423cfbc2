"""specdec/running/settings.py: shared settings as the command line gives them (Hydra's parsing) are coerced to
their types or rejected with one clear line; two cases end to end through ``run.py`` (exit 2)."""

import pytest
from omegaconf import OmegaConf
from test_configs import compose_config
from test_run import assert_user_error, run_cli, tiny_args, tiny_model_dir  # noqa: F401  (module fixture)

from specdec.verify.acceptance import make_rule
from specdec.errors import UserError
from specdec.running.settings import check_settings

BAD = [
    ("temperature=-1", "temperature must be >= 0"),
    ("temperature=abc", "temperature must be a number, got 'abc'"),
    ("temperature=true", "temperature must be a number, got True"),
    ("temperature=nan", "temperature must be finite"),
    ("top_p=2.0", "top_p must be in (0, 1]"),
    ("top_p=0", "top_p must be in (0, 1]"),
    ("top_k=-1", "top_k must be >= 0"),
    ("top_k=2.5", "top_k must be an integer, got 2.5"),
    ("threads=-1", "threads must be >= 0 or null"),
    ("max_new_tokens=0", "max_new_tokens must be a positive integer, got 0"),
    ("max_new_tokens=null", "max_new_tokens must be a number, got None"),
    ("seed=x", "seed must be a number, got 'x'"),
    ("warmup=-1", "warmup must be >= 0"),
    ("baseline=maybe", "baseline must be one of paired, none; got 'maybe'"),
    ("warmup_keeps_state=yes", "warmup_keeps_state must be true or false, got 'yes'"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_setting_is_one_clear_error(override, message):
    cfg = compose_config(override)
    with pytest.raises(UserError) as err:
        check_settings(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numeric_settings_are_coerced_to_their_types():
    cfg = compose_config("temperature=1", "top_p=1", "top_k=50.0", "max_new_tokens='64'", "threads=2", "seed=3")
    assert isinstance(cfg.temperature, int)  # what Hydra hands over for `temperature=1`
    with pytest.raises(ValueError, match="strictly positive float"):  # the crash a new user met
        make_rule(cfg.temperature, cfg.top_k, cfg.top_p)
    check_settings(cfg)
    values = (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.threads, cfg.seed)
    assert values == (1.0, 1.0, 50, 64, 2, 3)
    assert [type(v) for v in values] == [float, float, int, int, int, int]
    make_rule(cfg.temperature, cfg.top_k, cfg.top_p)  # now accepted by transformers' processors


def test_defaults_pass_unchanged():
    cfg = compose_config()
    before = OmegaConf.to_container(cfg, resolve=True)
    check_settings(cfg)
    after = OmegaConf.to_container(cfg, resolve=True)
    assert after == before and cfg.threads is None and cfg.warmup_keeps_state is True


@pytest.mark.parametrize("override,message", [("temperature=-1", "error: temperature must be >= 0"),
                                              ("top_p=2.0", "error: top_p must be in (0, 1]")])
def test_run_py_exits_2_with_one_line(override, message, tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "logger=none", override, check=False)
    assert_user_error(proc, message)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_run_py_samples_with_an_int_temperature(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "t1"
    run_cli(*tiny_args(tiny_model_dir, run_dir, "method=ar", "logger=none", "temperature=1", "baseline=none",
                       "warmup=0", "max_new_tokens=4"))
    summary = (run_dir / "summary.json").read_text()
    assert '"temperature": 1.0' in summary
