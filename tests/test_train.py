"""The draft-head training command (specdec/training/train.py) and the heads (specdec/drafters/heads.py) on a tiny random
Llama: the loss goes down, the held-out accept rate goes up, a rerun resumes (with the counters of an
uninterrupted run), checkpoints round-trip, dotted model names keep whole head paths, the teacher cache is
keyed by the model's path and revision, torch's thread count is left alone; the assistant-token mask on
the real SmolLM2 chat template."""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from specdec.errors import UserError
import specdec.training.train as train_module
from specdec.drafters.heads import EagleHead, KangarooAdapter, head_stem, load_head, save_head
from specdec.training.train import (build_teacher_cache, encode_conversation, main, model_identity, parse_args, teacher_dir,
                           train)


def patterned_conversations(n: int, vocab: int, length: int = 48, seed: int = 0) -> list[tuple]:
    """Token sequences each repeating one of 3 fixed random motifs, all positions 'assistant' except the
    first 4. Held-out conversations repeat the training ones: the test checks fitting, not generalisation."""
    gen = torch.Generator().manual_seed(seed)
    motifs = [torch.randint(0, vocab, (k,), generator=gen) for k in (3, 5, 7)]
    convs = []
    for _ in range(n):
        motif = motifs[int(torch.randint(0, 3, (1,), generator=gen))]
        ids = motif.repeat(length // len(motif) + 1)[:length]
        assistant = torch.ones(length, dtype=torch.bool)
        assistant[:4] = False
        convs.append((ids, assistant))
    return convs


@pytest.mark.parametrize("head", ["kangaroo", "eagle"])
def test_tiny_training_lowers_the_loss_and_resumes(head, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(vocab=64, layers=4, seed=1)
    with torch.no_grad():
        model.lm_head.weight *= 30  # a peaked target distribution (a random one is near uniform: nothing to learn)
    convs = patterned_conversations(14, 64)
    cfg = parse_args([f"head={head}", "exit_layer=1", "records=12", "heldout=2", "epochs=4", "lr=3e-3", "warmup=4",
                      "eval_every=16", "ckpt_every=16", f"out_dir={tmp_path / 'run'}", f"save={tmp_path / 'head'}",
                      "wandb=disabled"])
    summary = train(cfg, model=model, label="tiny", convs=convs)
    history = summary["history"]
    assert summary["steps"] == 48 and summary["tokens_seen"] == 4 * 12 * 48
    assert history[-1]["accept_rate"] > history[0]["accept_rate"] + 0.05, history
    assert history[-1]["loss"] < history[0]["loss"] - 0.1, history  # held-out loss
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["kind"] == head and meta["train"]["steps"] == 48
    assert "held-out accept rate" in (tmp_path / "head.md").read_text().lower()
    # rerunning the same command resumes from the final checkpoint: no step is repeated, same weights
    again = train(cfg, model=model, label="tiny", convs=convs)
    assert again["steps"] == 48 and again["history"] == history
    # a different command must not resume someone else's checkpoint
    with pytest.raises(UserError, match="different command"):
        train(dataclasses.replace(cfg, lr=1e-3), model=model, label="tiny", convs=convs)


def tiny_run(tmp_path, *args: str):
    """A 4-conversation Kangaroo config (layer 1) writing only under ``tmp_path``; ``args`` override."""
    return parse_args(["head=kangaroo", "exit_layer=1", "records=4", "heldout=1", "epochs=1", "warmup=2",
                       f"out_dir={tmp_path / 'run'}", f"save={tmp_path / 'head'}", "wandb=disabled", *args])


class Interrupted(Exception):
    pass


def test_resumed_run_counts_tokens_and_time_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Checkpoints (every 3 steps) are more frequent than evaluations (every 8): a run killed after the step-6
    checkpoint resumes with the tokens and training time of step 6, not those of the step-0 evaluation."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    clock, stop = [0.0], [None]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(time=lambda: clock[0], strftime=time.strftime,
                                                              gmtime=time.gmtime))
    real_lr_at = train_module.lr_at

    def lr_at(step, total, cfg):  # one call per training step: 1 s of (fake) training time each
        if step == stop[0]:
            raise Interrupted
        clock[0] += 1.0
        return real_lr_at(step, total, cfg)

    monkeypatch.setattr(train_module, "lr_at", lr_at)
    model, convs = tiny_llama(vocab=64, layers=3, seed=1), patterned_conversations(5, 64, length=16)
    args = ["epochs=3", "eval_every=8", "ckpt_every=3"]
    whole = train(tiny_run(tmp_path / "whole", *args), model=model, label="tiny", convs=convs)
    cfg = tiny_run(tmp_path / "cut", *args)
    stop[0] = 7  # killed during step 7: the last checkpoint is step 6's, the last evaluation step 0's
    with pytest.raises(Interrupted):
        train(cfg, model=model, label="tiny", convs=convs)
    stop[0] = None
    resumed = train(cfg, model=model, label="tiny", convs=convs)
    assert whole["steps"] == resumed["steps"] == 12 and whole["tokens_seen"] == 12 * 16
    assert resumed["tokens_seen"] == whole["tokens_seen"]
    counters = lambda s: [(h["step"], h["tokens"], h.get("train_time")) for h in s["history"]]  # noqa: E731
    assert counters(resumed) == counters(whole) == [(0, 0, None), (8, 8 * 16, 8.0), (12, 12 * 16, 12.0)]
    assert resumed["history"] == whole["history"]  # the weights too: resuming repeats no step


def test_teacher_cache_key_holds_the_model_path_and_revision(tmp_path, monkeypatch):
    """Two models with one name (and one label) but another path or another revision never share teacher states."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("specdec.running.corpus.corpus_fingerprint", lambda corpus: "corpus")
    cfg = tiny_run(tmp_path)
    dirs = []
    for where in ("a", "b"):
        d = tmp_path / where / "qwen2.5-0.5b"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"weights")
        dirs.append(d)
    key = lambda path: teacher_dir(cfg, "qwen2.5-0.5b", model_identity(str(path)))  # noqa: E731
    assert key(dirs[0]) != key(dirs[1]) and key(dirs[0]) == key(dirs[0])
    before = key(dirs[0])
    (dirs[0] / "model.safetensors").write_bytes(b"other weights")  # a new revision in place
    assert key(dirs[0]) != before
    # hub ids: the cached snapshot (commit) from_pretrained loaded
    snapshot = {"org/m": "1111", "org/m@new": "2222"}
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, filename: f"/hub/models--org--m/snapshots/{snapshot[repo]}/config.json")
    assert model_identity("org/m") == "org/m@1111"
    snapshot["org/m"] = "2222"
    assert model_identity("org/m") == "org/m@2222"
    # train() keys its cache by the model it was given
    model, convs = tiny_llama(vocab=64, layers=3, seed=1), patterned_conversations(3, 64, length=16)
    for i, d in enumerate(dirs):
        model.config._name_or_path = str(d)
        train(tiny_run(tmp_path / str(i), "records=2"), model=model, label="qwen2.5-0.5b", convs=convs)
    assert len(list((tmp_path / "cache" / "teacher").iterdir())) == 2


def test_dotted_model_names_keep_whole_head_paths(tmp_path, monkeypatch):
    """``kangaroo-qwen2.5-0.5b-l1`` is not cut at its first dot when saved, loaded, carded or checkpointed."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    name = "kangaroo-qwen2.5-0.5b-l1"
    assert head_stem(f"a/{name}") == head_stem(f"a/{name}.safetensors") == head_stem(f"a/{name}.json") == \
        head_stem(f"a/{name}.md") == tmp_path.__class__(f"a/{name}")
    model = tiny_llama(vocab=64, layers=3, seed=1)
    assert save_head(KangarooAdapter(model, 1), tmp_path / "saved" / name, "qwen2.5-0.5b") == \
        tmp_path / "saved" / f"{name}.safetensors"
    for path in (name, f"{name}.safetensors", f"{name}.json"):
        assert load_head(tmp_path / "saved" / path, model).exit_layer == 1
    cfg = parse_args(["head=kangaroo", "exit_layer=1", "records=2", "heldout=1", "epochs=1",
                      f"save={tmp_path / 'heads' / name}", "wandb=disabled"])  # default out_dir: named after the head
    train(cfg, model=model, label="qwen2.5-0.5b", convs=patterned_conversations(3, 64, length=16))
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == [f"{name}.json", f"{name}.md",
                                                                       f"{name}.safetensors"]
    assert (tmp_path / "heads" / f"{name}.md").read_text().startswith(f"# {name}\n")
    assert (tmp_path / "cache" / "train" / name / "ckpt.pt").is_file()


def test_training_leaves_the_thread_count_alone(tmp_path, monkeypatch):
    """``threads`` is the command line's (process-wide); the library function does not set it."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    summary = train(tiny_run(tmp_path, f"threads={before + 1}", "records=2"), model=tiny_llama(vocab=64, layers=3),
                    label="tiny", convs=patterned_conversations(3, 64, length=16))
    assert torch.get_num_threads() == before and summary["threads"] == before


def test_teacher_cache_keeps_the_layers_it_held(tmp_path):
    """Adapters for several exit layers share one teacher cache: a new ℓ is added to the cached shards (by the
    first layers only), and a shard that already holds ℓ is not rewritten."""
    model = tiny_llama(vocab=64, layers=4, seed=1)
    convs = patterned_conversations(3, 64, length=16)
    build_teacher_cache(model, convs, [1], tmp_path)
    build_teacher_cache(model, convs, [3], tmp_path)
    shard = tmp_path / "00000.pt"
    items = torch.load(shard)
    assert len(items) == 3 and {"layer1", "layer3", "final"} <= set(items[0])
    with torch.no_grad():
        hidden = model.model(input_ids=convs[0][0][None], output_hidden_states=True).hidden_states
    assert torch.equal(items[0]["layer1"], hidden[1][0].half())                # the full teacher forward's
    assert torch.allclose(items[0]["layer3"].float(), hidden[3][0], atol=1e-2)  # added by a 3-layer forward
    stamp = shard.stat().st_mtime_ns
    build_teacher_cache(model, convs, [1, 3], tmp_path)
    assert shard.stat().st_mtime_ns == stamp


def test_heads_round_trip_and_dims_check(tmp_path):
    model = tiny_llama(vocab=64, layers=3, seed=2)
    hidden, pos = torch.randn(1, 5, 32), torch.arange(5)[None]
    for head in (KangarooAdapter(model, 2), EagleHead(model)):
        torch.nn.init.normal_(next(iter(head.parameters())))
        x = hidden if head.kind == "kangaroo" else (hidden, torch.randint(0, 64, (1, 5)))
        exact = load_head(save_head(head, tmp_path / head.kind, "tiny", dtype=torch.float32), model)
        torch.testing.assert_close(exact(x, pos), head.eval()(x, pos))
        half = load_head(save_head(head, tmp_path / f"{head.kind}16", "tiny"), model)  # the fp16 default
        assert (tmp_path / f"{head.kind}16.safetensors").stat().st_size < (tmp_path / f"{head.kind}.safetensors").stat().st_size
        torch.testing.assert_close(half(x, pos), head(x, pos), rtol=2e-2, atol=2e-2)
    other = tiny_llama(vocab=96, layers=3)
    with pytest.raises(UserError, match="trained for tiny"):
        load_head(tmp_path / "kangaroo", other)


def test_bad_arguments_exit_2(capsys):
    assert main(["hed=kangaroo"]) == 2
    assert main(["epochs=two"]) == 2
    assert main(["head=lookahead"]) == 2  # not a trainable head (medusa and hydra are, since issue 22)
    assert capsys.readouterr().err.count("error:") == 3


def test_assistant_mask_on_the_smollm2_template(smollm2):
    _, tok, _ = smollm2
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is one."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ids, assistant = encode_conversation(tok, msgs, max_len=512)
    masked = tok.decode(ids[assistant])
    assert "Blue is one." in masked and "Green." in masked
    assert "colour" not in masked and "Another" not in masked and "assistant" not in masked
    short_ids, short_mask = encode_conversation(tok, msgs, max_len=10)
    assert len(short_ids) == len(short_mask) == 10
