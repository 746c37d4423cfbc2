"""Prompt lookup decoding (PLD): draft by copying what followed the last n-gram earlier in the context.

Saxena, "Prompt Lookup Decoding" (2023, github.com/apoorvumang/prompt-lookup-decoding); Spec-Bench's
PLD row (Xia et al., arXiv 2401.07851) uses ``max_ngram_size=3``, ``num_pred_tokens=10``.
transformers ships the same drafter as ``generate(..., prompt_lookup_num_tokens=10,
max_matching_ngram_size=3)`` (``PromptLookupCandidateGenerator``); with ``lookup: transformers`` (the
default) our drafts are identical to it step for step, so output ids and the number of target
forwards match (tests/test_pld.py), while our loop does the timing.

    python run.py method=pld

Each step: for n = min(max_ngram_size, len(context) - 1) down to 1, find the *earliest* earlier
occurrence of the last n committed tokens (root included) and propose the (up to)
``num_pred_tokens`` tokens that followed it as a single chain; no match -> root-only (an AR step).

Details decided here (none is [U] in a spec; they are read from the two released codes):
* ``lookup: transformers``: a continuation may be shorter than ``num_pred_tokens`` (cut by the end
  of the context) and the draft is cut before its first stop id (transformers does this so that a
  stop id and what follows it is never drafted). ``lookup: spec_bench``: Spec-Bench's
  ``find_candidate_pred_tokens`` (model/pld/pld.py) only accepts a match whose continuation holds
  all ``num_pred_tokens`` tokens and lies before the final n-gram; no stop-id cut. Spec-Bench drafts
  a dummy token 100 when nothing matches; we propose the root alone instead (same output, no
  wasted row).
* The draft is clipped to ``ctx.remaining - 1`` tokens (tokens past the budget could never be
  committed). This changes neither the output nor the number of forwards, only their width.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from specdec.errors import SettingError
from specdec.running.prompts import stop_ids
from specdec.verify.proposer import Context, MethodEnv, Proposer, register, sizes_up_to
from specdec.verify.tree import DraftTree

LOOKUPS = ("transformers", "spec_bench")


def lookup_continuation(seq: np.ndarray, max_ngram_size: int, num_pred_tokens: int,
                        full_only: bool = False) -> np.ndarray:
    """Tokens that followed the earliest earlier match of the longest matching suffix n-gram.

    ``seq`` int64 [L] is the committed context (root last). Returns int64 [<= num_pred_tokens];
    empty when no n-gram (n >= 1) recurs. ``full_only`` = Spec-Bench's rule (see module docstring).
    """
    L = len(seq)
    for n in range(min(max_ngram_size, L - 1), 0, -1):
        windows = sliding_window_view(seq, n)                          # [L - n + 1, n]
        starts = np.flatnonzero((windows == seq[L - n:]).all(axis=1)) + n  # continuation starts
        for start in starts.tolist():
            if full_only:
                if start + num_pred_tokens <= L and start < L - n:
                    return seq[start:start + num_pred_tokens]
            elif start < L:  # start == L is the final n-gram matching itself
                return seq[start:start + num_pred_tokens]
    return seq[:0]


@register("pld")
class PromptLookup(Proposer):
    """A single-chain draft copied from the context after the longest recurring suffix n-gram."""

    def __init__(self, env: MethodEnv, num_pred_tokens: int = 10, max_ngram_size: int = 3,
                 lookup: str = "transformers"):
        super().__init__(env)
        if num_pred_tokens < 1 or max_ngram_size < 1:
            raise SettingError("num_pred_tokens and max_ngram_size must be >= 1")
        if lookup not in LOOKUPS:
            raise SettingError(f"lookup must be one of {LOOKUPS}, not {lookup!r}")
        self.num_pred_tokens = num_pred_tokens
        self.max_ngram_size = max_ngram_size
        self.lookup = lookup
        model_cfg = getattr(env.model, "generation_config", None)
        # transformers cuts drafts at generation_config's EOS ids (the tokenizer's EOS included here).
        self.stop_ids = stop_ids(env.tokenizer, model_cfg) if env.tokenizer is not None else frozenset()

    def draft(self, tokens: list[int], remaining: int) -> list[int]:
        """The draft chain (root excluded) for committed ``tokens`` with ``remaining`` tokens to go."""
        room = min(self.num_pred_tokens, remaining - 1)
        if room <= 0:
            return []
        seq = np.asarray(tokens, dtype=np.int64)
        found = lookup_continuation(seq, self.max_ngram_size, self.num_pred_tokens,
                                    full_only=self.lookup == "spec_bench").tolist()
        if self.lookup == "transformers":
            for i, tok in enumerate(found):
                if tok in self.stop_ids:
                    found = found[:i]
                    break
        return found[:room]

    def propose(self, ctx: Context) -> DraftTree:
        return DraftTree.chain(ctx.root, self.draft(ctx.tokens, ctx.remaining), self.env.device)

    def tree_sizes(self) -> tuple[int, ...]:
        return sizes_up_to(self.num_pred_tokens + 1)  # a chain as long as the match allows

    def stats(self) -> dict:
        return {"lookup": self.lookup, "num_pred_tokens": self.num_pred_tokens,
                "max_ngram_size": self.max_ngram_size}
