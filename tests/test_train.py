"""The draft-head training command (specdec/train.py) and the heads (specdec/heads.py) on a tiny random
Llama: the loss goes down, the held-out accept rate goes up, a rerun resumes, checkpoints round-trip;
the assistant-token mask on the real SmolLM2 chat template."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_llama

from specdec.errors import UserError
from specdec.heads import EagleHead, KangarooAdapter, load_head, save_head
from specdec.train import build_teacher_cache, encode_conversation, main, parse_args, train


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
    assert main(["head=medusa"]) == 2
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
