"""Target back ends (specdec/backends.py, issue 13): the fast CPU path changes kernels, never outputs.

The oneDNN back end is checked the way the verifier is: tree logits equal each path run alone, KV
compaction equals recomputation, and on the real SmolLM2 prompts its greedy AR output equals eager
AR (every method on it equals AR: tests/test_configs.py's guard runs on it)."""

import pytest
import torch
from torch import nn

from conftest import EMBEDDED, LOSSLESS_NEW_TOKENS, method_env, run_generation, tiny_llama
from specdec.backends import (PackedLinear, _as_inference_inputs, apply_backend, backend_of, one_row_kernels,
                              onednn_supports, pack_linears, resolve_backend)
from specdec.errors import UserError
from specdec.models import load_model
from specdec.verify.proposer import Proposer
from specdec.verify.target import Target, warm
from test_verifier import check_tree_equals_paths, random_tree


def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "onednn"
    assert resolve_backend("auto", torch.device("cuda")) == "eager"
    assert resolve_backend("eager", torch.device("cpu")) == "eager"
    with pytest.raises(UserError, match="unknown backend 'fast'"):
        resolve_backend("fast", torch.device("cpu"))
    with pytest.raises(UserError, match="CPU"):
        resolve_backend("onednn", torch.device("cuda"))
    if onednn_supports(torch.bfloat16):
        assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "onednn"
    else:  # e.g. this AVX2 EPYC: oneDNN refuses to prepack bf16
        assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "eager"
        with pytest.raises(UserError, match="cannot prepack bfloat16"):
            resolve_backend("onednn", torch.device("cpu"), torch.bfloat16)


def test_load_model_rejects_a_bad_backend_before_loading():
    with pytest.raises(UserError, match="unknown backend"):
        load_model("/nonexistent/model", torch.device("cpu"), torch.float32, backend="turbo")


@pytest.mark.parametrize("shape", [(7,), (1, 1, 48), (3, 5, 48)])
def test_packed_linear_matches_linear(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[-1] if len(shape) > 1 else 7, 33)
    packed = PackedLinear(linear)
    x = torch.randn(*shape[:-1], linear.in_features)
    with torch.inference_mode():
        assert torch.allclose(packed(x), linear(x), atol=1e-5)
    assert packed.weight is linear.weight and packed(x).shape == linear(x).shape


def test_one_row_kernels():
    """A single row takes eager's GEMV bit for bit by default (``mkl``), or the packed oneDNN weight."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for x in (torch.randn(96), torch.randn(1, 1, 96)):
            assert torch.equal(packed(x), linear(x))
            packed.one_row_kernel = "onednn"
            assert torch.allclose(packed(x), linear(x), atol=1e-5) and packed(x).shape == linear(x).shape
            packed.one_row_kernel = "mkl"


def test_tune_one_row_sets_every_shape():
    """The onednn back end times both one-row kernels per weight shape at load and records the choice."""
    model = apply_backend(tiny_llama(), "onednn")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    shapes = {f"{m.out_features}x{m.in_features}" for m in layers}
    assert set(one_row_kernels(model)) == shapes and set(one_row_kernels(model).values()) <= {"mkl", "onednn"}
    assert all(m.one_row_kernel == one_row_kernels(model)[f"{m.out_features}x{m.in_features}"] for m in layers)
    assert one_row_kernels(apply_backend(tiny_llama(), "eager")) is None


def test_packed_linear_falls_back_to_autograd():
    """Training through a frozen packed head (e.g. an adapter before the LM head) still gets gradients."""
    linear = nn.Linear(8, 4)
    packed = PackedLinear(linear)
    x = torch.randn(2, 8, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, linear.weight.sum(0).expand(2, 8).detach())


def test_pack_linears_swaps_every_linear_and_keeps_tied_head():
    model = tiny_llama()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    apply_backend(model, "onednn")
    assert backend_of(model) == "onednn" and Target(model).backend == "onednn"
    assert n_linear == sum(isinstance(m, PackedLinear) for m in model.modules()) and n_linear > 0
    assert not any(type(m) is nn.Linear for m in model.modules()) and pack_linears(model) == 0


@pytest.mark.parametrize("backend", ["eager", "onednn"])
def test_tree_logits_equal_paths_on_each_backend(backend):
    model = apply_backend(tiny_llama(), backend)
    check_tree_equals_paths(model, list(range(3, 20)), random_tree(64), atol=1e-4)


def test_warm_meets_every_size_and_cache_layout_and_leaves_no_cache():
    """Each size is scored four times (after the prefill, an append, a crop of one tree, an append), the returned seconds
    are the call's own (within its wall time), and no cache is left behind."""
    import time

    target = Target(apply_backend(tiny_llama(), "onednn"))
    sizes_seen, cache_lens, score = [], [], target.score

    def spy(tree):
        sizes_seen.append(tree.size)
        cache_lens.append(target.cache_len)
        return score(tree)

    target.score = spy
    start = time.perf_counter()
    seconds = warm(target, sizes=(1, 3))
    wall = time.perf_counter() - start
    assert sizes_seen == [1] * 4 + [3] * 4 and 0 < seconds <= wall and target.cache is None
    assert cache_lens == [16, 17, 17, 18, 16, 19, 19, 22]  # per size: after the prefill, an append, a crop, an append


def test_compiled_forward_gets_inference_tensors_under_inference_mode():
    """compile's wrapper: a tensor made outside inference mode reaches the compiled forward as an inference
    tensor (one dispatch-key set, one graph), equal in value; outside inference mode nothing changes."""
    seen = []
    forward = _as_inference_inputs(lambda **kw: seen.append(kw) or kw["input_ids"].sum())
    ids, mask = torch.tensor([[3, 4, 5]]), None
    with torch.inference_mode():
        assert forward(input_ids=ids, attention_mask=mask, use_cache=True) == 12
        made_inside = torch.tensor([[1]])
        forward(input_ids=made_inside)
    assert seen[0]["input_ids"].is_inference() and torch.equal(seen[0]["input_ids"], ids) and not ids.is_inference()
    assert seen[0]["attention_mask"] is None and seen[0]["use_cache"] is True
    assert seen[1]["input_ids"] is made_inside  # already an inference tensor: passed as is
    forward(input_ids=ids)
    assert seen[2]["input_ids"] is ids


# --------------------------------------------------------------------------- real SmolLM2 prompts

@pytest.mark.full
def test_onednn_tree_logits_equal_paths_smollm2(smollm2_onednn, task_prompts):
    model, _ = smollm2_onednn
    check_tree_equals_paths(model, task_prompts["qa"][:-1], random_tree(49152, seed=1), atol=1e-3)


@pytest.mark.full
def test_onednn_ar_equals_eager_ar(smollm2, smollm2_onednn, task_prompts, ar_outputs):
    """fp32: the prepacked path's greedy AR output is eager's on all six task prompts."""
    model, tok = smollm2_onednn
    stops = smollm2[2]
    for task, prompt in task_prompts.items():
        gen = run_generation(model, Proposer(method_env(model, tok)), prompt, LOSSLESS_NEW_TOKENS, stops)
        assert gen.output_ids == ar_outputs[task], task


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "compile"])
def test_cuda_backends_keep_tree_logits(backend):
    model = apply_backend(tiny_llama().to("cuda"), backend)
    check_tree_equals_paths(model, list(range(3, 20)), random_tree(64), atol=1e-4)


# --------------------------------------------------------------------------- roofline in latency profiles

def test_weight_bytes_counts_a_tied_head_once():
    from analysis.latency import weight_bytes

    model = tiny_llama()  # untied: the input embedding is not read by a forward
    all_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes(model) == all_bytes - model.get_input_embeddings().weight.numel() * 4
    model.lm_head.weight = model.get_input_embeddings().weight  # tied: the head reads the shared matrix once
    assert weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())


def test_profile_records_backend_and_roofline(tmp_path):
    """A real (tiny) profile through the CLI: back end, bandwidth and roofline are stored, and the table
    shows t(1) as a multiple of the roofline."""
    import shutil

    from analysis.latency import Profile, main, profile_table
    from specdec.models import cached_embedded_copy, default_cache_dir

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=49152).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cached_embedded_copy(EMBEDDED, default_cache_dir()) / name, model_dir / name)
    out = tmp_path / "profile.json"
    main(["profile", "--model", str(model_dir), "--context", "16", "--ns", "1", "4", "--repeats", "2",
          "--warmup", "1", "--backend", "onednn", "--out", str(out)])
    profile = Profile.load(out)
    meta = profile.meta
    assert meta["backend"] == "onednn" and meta["read_bandwidth_GBps"] > 0 and meta["weight_bytes"] > 49152 * 32 * 4
    assert profile.roofline == pytest.approx(meta["weight_bytes"] / (meta["read_bandwidth_GBps"] * 1e9), rel=0.01)
    row = profile_table([profile]).iloc[0]
    assert row["backend"] == "onednn" and row["t1_over_roofline"] == pytest.approx(profile.t(1) / profile.roofline)
    assert row["t4/t1"] == pytest.approx(profile.t(4) / profile.t(1))
