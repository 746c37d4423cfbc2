"""A frequency-ranked draft vocabulary (FR-Spec: Zhao et al. 2025, arXiv 2502.14856): the drafter's LM head keeps
only the k tokens most frequent in a corpus under the target's tokenizer; the target verifies over its full
vocabulary, so the output is unchanged (greedy: identical; sampling: exact, q is simply zero outside the subset).

    python run.py method=sps drafter=kangaroo drafter.vocab=top-8192
    python run.py method=eagle2 drafter.vocab=top-4096

``drafter.vocab`` (conf/drafter/*.yaml): ``full`` (the default) or ``top-<k>``. Drafters that run an LM head
apply it: ``early_exit`` / ``kangaroo`` (the target's LM head after the exit layer), ``eagle`` (the target's
frozen LM head over predicted features), ``medusa`` / ``hydra`` (each head's projection: the shared target
weight or its own, bias kept). ``hf`` (a separate model) refuses it: its LM head sits inside the model's own
forward, which may scale or cap the logits after it, so cutting its rows from outside is not safe in general.

The subset (``frequent_ids``): token counts of ShareGPT (every turn, no special tokens; counted once and cached
by ``specdec.running.corpus.token_counts``; the caller hands them in, this module does not read corpora),
ranked by count (ties: the smaller id first [design]), the top k; the target's stop ids always belong to it,
replacing the least frequent kept tokens -- as the release's ``fr/fr.py`` (thunlp/FR-Spec @ 9d40eea) forces
the EOS into every subset. The release counts SlimPajama-627B (its first 1M lines); the ShareGPT corpus here
is the one ADED and REST already use [design].

``ReducedHead`` holds the kept rows of the projection, [k, H] (+ bias [k]), and scatters its k logits into a
full-vocabulary row filled with -inf, so every consumer -- greedy argmax, softmax q under the target's
processors, top-k of the tree builders -- sees zero draft probability outside the subset without knowing of
it. The release instead keeps reduced logits plus an index map (``llamacu/speculative/eagle.py``); the
scatter is what keeps every method of this harness unchanged. Cost (rough, 1 thread on the shared machine,
SmolLM2's 49152 x 576 head): k = 4096 takes 0.5 ms for one row vs 12.6 ms for the full head; the scatter adds
0.07 ms (1 row) to 2 ms (60 rows) to the reduced product (docs/fr_spec.md).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from specdec.backends import PackedLinear
from specdec.errors import UserError

FULL = "full"
_TOP = re.compile(r"top-([1-9][0-9]*)")
KINDS = ("early_exit", "eagle", "medusa", "hydra")  # drafters that run an LM head this module can cut


def parse_vocab(value) -> Optional[int]:
    """``drafter.vocab`` -> k (``top-<k>``) or None (``full`` / unset); one UserError line otherwise."""
    if value is None or str(value) == FULL:
        return None
    match = _TOP.fullmatch(str(value).strip())
    if not match:
        raise UserError(f"drafter.vocab={value!r}: use {FULL} or top-<k> (e.g. top-8192: the k most frequent tokens)")
    return int(match.group(1))


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the EOS ids of the model's generation config (the ids the loop stops on)."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {int(i) for i in ids if i is not None}


def frequent_ids(counts: np.ndarray, k: int, vocab_size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """int64 [k], ascending: the k ids < ``vocab_size`` with the highest ``counts`` (ties: smaller id first), with
    every id of ``always`` in place of the least frequent others."""
    if not 1 <= k < vocab_size:
        raise UserError(f"drafter.vocab=top-{k} must keep between 1 and {vocab_size - 1} of this model's {vocab_size} "
                        f"tokens (drafter.vocab={FULL} keeps them all)")
    counts = np.asarray(counts, np.int64)[:vocab_size]
    counts = np.pad(counts, (0, vocab_size - len(counts)))
    ranked = np.argsort(-counts, kind="stable")                      # [V] most frequent first, ties by id
    forced = sorted({int(i) for i in always if 0 <= int(i) < vocab_size})
    if len(forced) > k:
        raise UserError(f"drafter.vocab=top-{k} is smaller than the {len(forced)} stop ids it must keep")
    rest = ranked[~np.isin(ranked, forced)][:k - len(forced)]
    return torch.from_numpy(np.sort(np.concatenate([rest, np.asarray(forced, np.int64)])))


def draft_vocabulary(k: int, model, tokenizer, vocab_size: int,
                     counts: Optional[Callable[[], np.ndarray]]) -> torch.Tensor:
    """The kept ids of ``drafter.vocab=top-<k>``. ``counts()`` returns the corpus token counts (the runner passes
    ``specdec.running.corpus.token_counts`` bound to its cache dir and tokenizer)."""
    if counts is None:
        raise UserError(f"drafter.vocab=top-{k} needs the corpus token counts, which this entry point does not "
                        f"provide: use python run.py / specdec.running.compare, or drafter.vocab={FULL}")
    return frequent_ids(counts(), k, vocab_size, stop_token_ids(model, tokenizer))


class ReducedHead(nn.Module):
    """A vocabulary projection cut to the rows ``ids`` [k]: ``forward(x [..., H]) -> [..., V]`` with the kept
    rows' logits at ``ids`` (equal to the full projection's) and -inf everywhere else. A prepacked (oneDNN)
    projection is cut into a prepacked one, so the back end's kernels stay comparable."""

    def __init__(self, projection: nn.Module, ids: torch.Tensor):
        super().__init__()
        weight = projection.weight
        self.out_features = weight.shape[0]
        ids = ids.to(device=weight.device, dtype=torch.long)
        if ids.numel() == 0 or int(ids.max()) >= self.out_features or int(ids.min()) < 0:
            raise ValueError(f"ReducedHead: kept ids must lie in [0, {self.out_features})")
        bias = getattr(projection, "bias", None)
        cut = nn.Linear(weight.shape[1], ids.numel(), bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            cut.weight.copy_(weight.detach().index_select(0, ids))
            if bias is not None:
                cut.bias.copy_(bias.detach().index_select(0, ids))
        cut.requires_grad_(False)
        self.proj = PackedLinear(cut) if isinstance(projection, PackedLinear) else cut
        self.register_buffer("ids", ids, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The kept rows [k, H]."""
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.proj(x)                                                       # [..., k]
        out = kept.new_full((*kept.shape[:-1], self.out_features), float("-inf"))  # [..., V]
        return out.index_copy_(-1, self.ids, kept)

    def extra_repr(self) -> str:
        return f"kept={self.ids.numel()}, out_features={self.out_features}"
