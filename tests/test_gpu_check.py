"""``make gpu-check`` (specdec/measure/gpu_check.py) on CPU, so the script cannot rot before a GPU runs it: the whole
check on tiny random models with the packages a stock CUDA image lacks blocked, each section's ability to fail, and
the GPU loading details of issue 21 item 9 (weights straight to the device, warm-up of a method's tree sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import method_env, tiny_llama
from specdec.measure import gpu_check
from specdec.verify.proposer import WARM_SIZES, Proposer, build_proposer, sizes_up_to
from specdec.verify.target import Target, warm

ROOT = Path(__file__).resolve().parent.parent
# Not on a stock CUDA image (torch, transformers, numpy, numba, pandas, pytest): the check must run without them.
BLOCKED = ("hydra", "omegaconf", "datasets", "wandb", "scipy", "accelerate", "matplotlib", "tabulate", "gguf",
           "submitit")
BLOCKING_RUNNER = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as where it is not installed
from specdec.measure.gpu_check import main
code = main(sys.argv[1:])
print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """The whole check, CPU, tiny size, in a subprocess where the stock image's missing packages cannot import."""
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", BLOCKING_RUNNER, "--device", "cpu", "--size", "tiny", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.full
def test_the_cpu_check_runs_without_hydra_datasets_wandb_and_passes(cpu_report):
    done, report = cpu_report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout
    assert report["pass"] and list(report["sections"]) == list(gpu_check.SECTIONS)
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["layers"] == 4
    for name, section in report["sections"].items():
        assert section["pass"] is True and "error" not in section and section["seconds"] >= 0, name


@pytest.mark.full
def test_tree_and_compaction_sections_hold_numbers(cpu_report):
    sections = cpu_report[1]["sections"]
    kernels = sections["tree_vs_paths"]["kernels"]
    assert {"default", "math", "efficient", "flash"} <= set(kernels)
    for name in ("default", "math"):                                       # required on every device
        cases = kernels[name]["cases"]
        assert kernels[name]["status"] == "ok" and len(cases) == len(gpu_check.TREE_NODES) * 2
        assert {c["nodes"] for c in cases} == set(gpu_check.TREE_NODES)
        assert all(0 <= c["max_diff"] <= c["tol"] and not c["nan"] for c in cases)
    assert kernels["efficient"]["status"] == "refused" and kernels["efficient"]["refused"]  # no such kernel on CPU
    compaction = sections["compaction"]["cases"]
    assert len(compaction) >= 8 and all(c["rows_equal_index_select"] for c in compaction)
    assert any(len(c["path"]) > 2 for c in compaction) and all(c["cache_max_diff"] <= c["tol"] for c in compaction)


@pytest.mark.full
def test_every_method_config_is_checked_against_ar(cpu_report):
    """Each conf/method YAML ran (or is skipped with a reason), equals AR or diverged at a near-tie, and its warm-up
    sizes (``Proposer.tree_sizes``) reach the largest tree it verified."""
    methods = cpu_report[1]["sections"]["methods"]
    names = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert names <= set(methods["methods"]) and methods["some_method_accepted_drafts"]
    ran = {name: row for name, row in methods["methods"].items() if "skipped" not in row}
    assert set(methods["methods"]) - set(ran) <= set(gpu_check.SKIPPED)
    for name, row in ran.items():
        assert row["accept_lengths_sum_to_tokens"] and row["new_tokens"] == methods["new_tokens"], name
        assert row["identical"] or row["divergence"]["near_tie"], name
        assert max(row["warm_sizes"]) >= row["max_tree_size"] and 1 in row["warm_sizes"], name
    assert ran["ar"]["mat"] == 1.0 and ran["recycle"]["max_tree_size"] == 81


@pytest.mark.full
def test_drafter_syncs_speed_and_memory_sections_hold_numbers(cpu_report):
    sections = cpu_report[1]["sections"]
    drafters = sections["drafters"]
    assert drafters["eagle_head"]["draft_calls"] > 0 and drafters["eagle_head"]["nonfinite_draft_logits"] == 0
    assert all(c["shallow"] and c["nodes"] > 2 for c in drafters["kangaroo_score_from"]["score_from_vs_full"])
    assert drafters["hf_drafter_t1"]["trees"] > 0 and drafters["hf_drafter_t1"]["bad_draft_prob_rows"] == 0
    syncs = sections["syncs"]
    if syncs.get("status") != "skipped":
        assert syncs["ar_counted"] and all(row["pass"] for row in syncs["methods"].values())
    speed = sections["speed"]
    assert speed["harness_ar_tokens_per_s"] > 0 and speed["generate_tokens_per_s"] > 0
    assert set(speed["t_over_t1"]) == {str(n) for n in gpu_check.SPEED_NS} and speed["t_over_t1"]["1"] == 1.0
    memory = sections["memory"]
    assert memory["new_tokens"] == memory["tokens"] and memory["max_rss_after_mb"] >= memory["max_rss_before_mb"] > 0


# --------------------------------------------------------------------------------------------- each check can fail

def tiny_setup():
    import argparse

    args = argparse.Namespace(device="cpu", dtype="auto", size="tiny", layers=None, seed=0, memory_tokens=16,
                              tie_gap=None)
    return gpu_check.build_setup(args)


def test_a_failing_section_is_recorded_and_the_exit_code_is_nonzero(tmp_path, monkeypatch):
    def broken(setup):
        raise RuntimeError("injected failure")

    monkeypatch.setitem(gpu_check.SECTIONS, "compaction", broken)
    out = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--size", "tiny", "--sections", "compaction,speed",
                           "--memory-tokens", "16", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["pass"] is False
    assert report["sections"]["compaction"]["pass"] is False
    assert "injected failure" in report["sections"]["compaction"]["error"]
    assert report["sections"]["speed"]["pass"] is True  # the other section still ran


def test_an_unknown_section_is_one_line(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--size", "tiny", "--sections", "nope", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "unknown section" in capsys.readouterr().err


def test_a_wrong_tree_mask_fails_tree_vs_paths(monkeypatch):
    """A mask that lets every node see every earlier node (the flattening's causal mask) is caught."""
    from specdec.verify.layers import attention_mask, causal_ancestors

    monkeypatch.setattr(Target, "tree_mask", lambda self, tree, P: attention_mask(
        causal_ancestors(tree.size, tree.tokens.device), P, self.dtype))
    result = gpu_check.section_tree_vs_paths(tiny_setup())
    assert not result["pass"] and result["kernels"]["math"]["status"] == "mismatch"


def test_a_commit_that_moves_no_rows_fails_compaction(monkeypatch):
    """Compaction that only crops (keeps the first rows instead of the accepted path's) is caught."""
    def crop_only(self, tree, path):
        self.cache.crop(-(tree.size - len(path)))

    monkeypatch.setattr(Target, "commit", crop_only)
    result = gpu_check.section_compaction(tiny_setup())
    assert not result["pass"] and not all(c["rows_equal_index_select"] for c in result["cases"])


def test_a_wide_divergence_is_not_a_near_tie():
    setup = tiny_setup()
    prompt = setup.prompt()
    ref = gpu_check.run_greedy(setup, Proposer(setup.env()), prompt, 4).output_ids
    with torch.inference_mode():
        logits = setup.model(input_ids=torch.tensor([prompt])).logits[0, -1]
    worst = int(logits.argmin())                                               # the least likely first token
    found = gpu_check.divergence(setup, prompt, [worst] + ref[1:], ref)
    assert found["position"] == 0 and not found["near_tie"] and found["chosen_logit_gap"] > setup.tie_gap
    assert gpu_check.divergence(setup, prompt, ref, ref) is None


# --------------------------------------------------------------------------------------------- issue 21, item 9

class _Loaded:
    dtype = torch.float32

    def to(self, device):
        return self

    def eval(self):
        return self


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_load_model_sends_weights_straight_to_a_gpu(monkeypatch, device):
    """On CUDA ``from_pretrained`` gets ``device_map={"": device}`` (the tokenizer does not); on CPU nothing changes."""
    import transformers

    from specdec import backends, models

    seen = {}

    def tokenizer(location, **kwargs):
        seen["tokenizer"] = kwargs

    def model(location, **kwargs):
        seen["model"] = kwargs
        return _Loaded()

    monkeypatch.setattr(models, "resolve_source", lambda path, *args: ("somewhere", {}))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(backends, "apply_backend", lambda model, name: model)
    models.load_model("some/model", torch.device(device), torch.float16 if device == "cuda" else torch.float32)
    assert "device_map" not in seen["tokenizer"]
    if device == "cuda":
        assert seen["model"]["device_map"] == {"": torch.device("cuda")}
    else:
        assert "device_map" not in seen["model"]


def test_warm_runs_the_proposer_tree_sizes_and_always_one():
    """``warm`` meets every size a method verifies (here recycle's 81-token template, past a 64-token vocabulary)."""
    cfg = yaml.safe_load((ROOT / "conf" / "method" / "recycle.yaml").read_text())
    model = tiny_llama(vocab=64)
    proposer = build_proposer(cfg, method_env(model))
    target, seen = Target(model), []
    score = target.score
    target.score = lambda tree: seen.append(tree.size) or score(tree)
    warm(target, proposer.tree_sizes())
    assert proposer.tree_sizes() == (1, 81) and sorted(set(seen)) == [1, 81] and target.cache is None
    seen.clear()
    warm(target, (5,))
    assert sorted(set(seen)) == [1, 5]


def test_default_tree_sizes_and_sizes_up_to():
    assert Proposer(method_env(tiny_llama())).tree_sizes() == WARM_SIZES
    assert sizes_up_to(11) == (1, 2, 4, 8, 11) and sizes_up_to(8) == (1, 2, 4, 8) and sizes_up_to(1) == (1,)
