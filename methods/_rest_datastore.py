"""REST's datastore and retrieval: a suffix array over a tokenized corpus, searched for the longest suffix of
the context, and the frequency trie of what followed. Used by ``methods/rest.py``; registers no proposer.

Restated (not copied) from FasterDecoding/REST @ 50a5fc1 (2024-11-28): the builder
``datastore/get_datastore_chat.py`` and the Rust retriever ``DraftRetriever/src/lib.rs`` (``Writer``,
``Reader::search``, ``cut_to_choices``, ``get_draft_choices``). Design notes: docs/rest.md.

Layout (numpy, cached outside git under ``<cache_dir>/rest/datastore-<hash>/``, memory-mapped at load):
  * ``tokens`` uint16 (uint32 for ids >= 65535) [N]: every corpus entry (a ShareGPT turn) tokenized without
    special tokens, each followed by the **separator** ``max id + 1`` (``entry_separator: true``, [design]);
    with ``entry_separator: false`` the entries are concatenated as released and one separator ends the array;
  * ``suffixes`` int32 (int64 past 2**31 tokens) [N]: the suffix array, lexicographic over token ids, so the
    separator sorts after every real token and a suffix after its proper prefixes (libdivsufsort through
    ``pydivsufsort``; the release uses libsais over the same order);
  * ``meta.json``: corpus, records, entries, tokens, separator, build seconds, file bytes.

Retrieval per step (``retrieve``), as released with ``Reader.search(query, choices=64)`` and its defaults:
  1. the longest suffix of the context (root last), of length ``max_span`` down to ``min_span`` (16 .. 2), that
     occurs in the datastore followed by at least one real token (found by bisection over the lengths:
     occurrence is monotone in the length, so this is the first hit of the released 16, 15, ..., 2 loop);
  2. its first ``max_matches`` (5000) occurrences in suffix-array order, i.e. those followed by the
     lexicographically smallest continuations (the release's per-chunk cap; one chunk here);
  3. each occurrence's next ``continuation`` (10) tokens, cut at the separator (released: at the chunk end);
  4. every prefix of every continuation counted; the ``num_draft`` (64) most frequent kept, ties by shorter
     first, then token ids (released: a min-heap over a hash map, so ties at the cut are arbitrary);
  5. the released budget cut: while the kept prefixes' distinct-token counts sum past ``num_draft``, drop the
     prefix with the most distinct tokens (among equals the lowest-ranked; released: hash order).
The kept prefixes are ancestor-closed (a prefix counts at least as often as its extensions and ranks before
them), so they are exactly the trie's nodes: no ancestor has to be added and the trie holds <= ``num_draft``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from specdec.running.corpus import (corpus_fingerprint, corpus_records, publish_arrays, record_texts,
                                    tokenize_documents, tokenizer_fingerprint)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the on-disk layout or the build rule changes
BUDGETS = ("distinct_tokens", "nodes")


# ---------------------------------------------------------------------------------------------- build
def concatenate(entries: Iterable[Sequence[int]], entry_separator: bool = True) -> tuple[np.ndarray, int]:
    """(tokens, separator): the entries back to back, each followed by the separator (``max id + 1``) when
    ``entry_separator``, else only the whole array. The dtype is the smallest unsigned one holding the separator."""
    parts = [p for p in (np.asarray(e, dtype=np.uint32) for e in entries) if len(p)]
    separator = max((int(p.max()) for p in parts), default=-1) + 1
    dtype = np.uint16 if separator < 2**16 else np.uint32
    sep = np.array([separator], dtype=dtype)
    if entry_separator:
        pieces = [x for p in parts for x in (p, sep)]
    else:
        pieces = [*parts, sep]
    return (np.concatenate(pieces).astype(dtype, copy=False) if pieces else sep), separator


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of all suffixes of ``tokens`` in lexicographic order (int32 below 2**31 tokens)."""
    from pydivsufsort import divsufsort

    suffixes = np.asarray(divsufsort(np.ascontiguousarray(tokens)))
    return suffixes.astype(np.int32 if len(tokens) < 2**31 else np.int64)


def corpus_entries(tokenizer, corpus: str, max_records: Optional[int], roles: Optional[Sequence[str]],
                   batch_size: int, progress: bool) -> tuple[list[np.ndarray], int]:
    """(uint32 token ids of every entry, number of records): one entry per conversation turn (``roles``
    filters them), tokenized without special tokens."""
    from tqdm import tqdm

    records = list(corpus_records(corpus, max_records))
    texts = [t for r in records for t in record_texts(r, roles)]
    ids = tqdm(tokenize_documents(tokenizer, texts, batch_size, progress=False), total=len(texts), unit="entry",
               desc="rest: tokenizing corpus", disable=not progress)
    return [np.asarray(e, dtype=np.uint32) for e in ids], len(records)


def build_datastore(tokenizer, corpus: str = "sharegpt", max_records: Optional[int] = None,
                    roles: Optional[Sequence[str]] = None, entry_separator: bool = True, batch_size: int = 512,
                    progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenize the corpus, concatenate it and sort its suffixes. Returns (arrays, meta)."""
    start = time.perf_counter()
    entries, n_records = corpus_entries(tokenizer, corpus, max_records, roles, batch_size, progress)
    tokens, separator = concatenate(entries, entry_separator)
    log.info("rest: sorting the suffixes of %d tokens", len(tokens))
    sorted_at = time.perf_counter()
    suffixes = suffix_array(tokens)
    meta = {"format": FORMAT_VERSION, "corpus": corpus, "max_records": max_records, "roles": roles,
            "entry_separator": entry_separator, "records": n_records, "entries": len(entries),
            "tokens": int(sum(len(e) for e in entries)), "array_length": int(len(tokens)), "separator": separator,
            "suffix_seconds": round(time.perf_counter() - sorted_at, 2),
            "build_seconds": round(time.perf_counter() - start, 2)}
    return {"tokens": tokens, "suffixes": suffixes}, meta


def datastore_dir(cache_dir: Path, tokenizer, corpus: str, max_records: Optional[int],
                  roles: Optional[Sequence[str]], entry_separator: bool) -> Path:
    """``<cache_dir>/rest/datastore-<hash>``, the hash over tokenizer, corpus file and build settings."""
    ident = json.dumps([FORMAT_VERSION, tokenizer_fingerprint(tokenizer), corpus_fingerprint(corpus), max_records,
                        list(roles) if roles else None, bool(entry_separator)])
    return Path(cache_dir) / "rest" / f"datastore-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def ensure_datastore(cache_dir: Path, tokenizer, corpus: str = "sharegpt", max_records: Optional[int] = None,
                     roles: Optional[Sequence[str]] = None, entry_separator: bool = True, batch_size: int = 512,
                     progress: bool = True) -> Path:
    """The cached datastore directory for these settings, building it first if missing."""
    out = datastore_dir(cache_dir, tokenizer, corpus, max_records, roles, entry_separator)
    if (out / "meta.json").exists():
        return out
    log.info("rest: building the datastore of %s (max_records=%s) into %s", corpus, max_records, out)
    arrays, meta = build_datastore(tokenizer, corpus, max_records, roles, entry_separator, batch_size, progress)
    publish_arrays(out, arrays, meta)
    log.info("rest: datastore built in %.1f s: %s", meta["build_seconds"], meta)
    return out


@dataclass(frozen=True)
class Datastore:
    """The token array, its suffix array and the separator id (module docstring)."""

    tokens: np.ndarray
    suffixes: np.ndarray
    separator: int
    meta: dict

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], meta: dict) -> "Datastore":
        return Datastore(np.asarray(arrays["tokens"]), np.asarray(arrays["suffixes"]), int(meta["separator"]), meta)


@lru_cache(maxsize=2)
def load_datastore(directory: str) -> Datastore:
    """A cached datastore, memory-mapped (read-only; one copy per process)."""
    path = Path(directory)
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("tokens", "suffixes")}
    return Datastore.from_arrays(arrays, json.loads((path / "meta.json").read_text()))


# ---------------------------------------------------------------------------------------------- retrieval
def suffix_range(store: Datastore, query: Sequence[int]) -> tuple[int, int]:
    """[lo, hi) of the suffix array: the suffixes that start with ``query``."""
    tokens, n = store.tokens, len(query)
    query = list(query)
    head = lambda pos: tokens[int(pos):int(pos) + n].tolist()  # noqa: E731  a suffix's first n tokens; shorter = less
    lo = bisect_left(store.suffixes, query, key=head)
    return lo, bisect_right(store.suffixes, query, lo=lo, key=head)


def has_continuation(store: Datastore, query: Sequence[int]) -> Optional[tuple[int, int]]:
    """The suffix range of ``query`` if one occurrence is followed by a real token, else None. The separator
    sorts last, so it is enough to look after the first occurrence."""
    lo, hi = suffix_range(store, query)
    if lo < hi and int(store.tokens[int(store.suffixes[lo]) + len(query)]) != store.separator:
        return lo, hi
    return None


def longest_match(store: Datastore, context: Sequence[int], max_span: int, min_span: int
                  ) -> Optional[tuple[int, int, int]]:
    """(span, lo, hi) of the longest context suffix of ``min_span`` .. ``max_span`` tokens that has a
    continuation, or None. A query is cut to the context (released ``ids[-span:]``); tokens the store cannot
    hold (>= the separator) end the usable suffix."""
    context = list(context[-max_span:])
    foreign = [i for i, t in enumerate(context) if t >= store.separator or t < 0]
    usable = len(context) - (foreign[-1] + 1 if foreign else 0)
    lengths = sorted({min(s, len(context)) for s in range(min_span, max_span + 1)})
    lengths = [n for n in lengths if 0 < n <= usable]
    best, lo_i, hi_i = None, 0, len(lengths) - 1
    while lo_i <= hi_i:  # a query with a continuation implies every shorter suffix has one
        mid = (lo_i + hi_i) // 2
        found = has_continuation(store, context[-lengths[mid]:])
        if found:
            best, lo_i = (lengths[mid], *found), mid + 1
        else:
            hi_i = mid - 1
    return best


def continuations(store: Datastore, lo: int, hi: int, span: int, max_matches: int, length: int) -> np.ndarray:
    """int64 [m, length]: the next ``length`` tokens after the first ``max_matches`` occurrences (suffix-array
    order), the separator from each one's first separator on."""
    starts = store.suffixes[lo:min(hi, lo + max_matches)].astype(np.int64) + span
    index = np.minimum(starts[:, None] + np.arange(length), len(store.tokens) - 1)
    rows = store.tokens[index].astype(np.int64)
    rows[np.maximum.accumulate(rows == store.separator, axis=1)] = store.separator
    return rows


def ranked_prefixes(rows: np.ndarray, separator: int, limit: int) -> list[tuple[int, tuple[int, ...]]]:
    """(count, prefix) of the ``limit`` top distinct prefixes of the rows: most frequent first, then shorter,
    then by tokens.

    ``rows`` are in suffix-array (= lexicographic) order, so the rows sharing a depth-d prefix are one run:
    a run starts where the common prefix with the previous row is shorter than d, and runs of one depth come
    in token order."""
    m, length = rows.shape
    same = np.zeros(rows.shape, dtype=bool)
    same[1:] = rows[1:] == rows[:-1]
    common = np.cumprod(same, axis=1).sum(axis=1)                      # [m] common prefix with the previous row
    counts, depths, firsts = [], [], []
    for d in range(1, length + 1):
        starts = np.flatnonzero(common < d)
        real = rows[starts, d - 1] != separator
        counts.append(np.diff(np.r_[starts, m])[real])
        depths.append(np.full(int(real.sum()), d))
        firsts.append(starts[real])
    counts, depths, firsts = (np.concatenate(a) for a in (counts, depths, firsts))
    key = ((m - counts) * (length + 1) + depths) * m + firsts           # (count desc, depth, tokens) as one int64
    top = np.argpartition(key, limit)[:limit] if limit < len(key) else np.arange(len(key))
    top = top[np.argsort(key[top])]
    return [(int(counts[i]), tuple(rows[firsts[i], :depths[i]].tolist())) for i in top]


def budget_cut(paths: list[tuple[int, ...]], budget: int) -> list[tuple[int, ...]]:
    """The released cut on ranked prefixes: while the distinct-token counts sum past ``budget``, drop the prefix
    with the most distinct tokens (the lowest-ranked among equals). Keeps rank order and ancestor closure."""
    weights = [len(set(p)) for p in paths]
    total, dropped = sum(weights), set()
    for i in sorted(range(len(paths)), key=lambda i: (-weights[i], -i)):
        if total <= budget:
            break
        total -= weights[i]
        dropped.add(i)
    return [p for i, p in enumerate(paths) if i not in dropped]


def retrieve(store: Datastore, context: Sequence[int], max_span: int = 16, min_span: int = 2,
             max_matches: int = 5000, continuation: int = 10, num_draft: int = 64,
             budget: str = "distinct_tokens") -> tuple[list[tuple[int, ...]], int]:
    """(draft paths in rank order, the span that matched; 0 = no match): steps 1-5 of the module docstring.
    ``budget: nodes`` skips step 5 (the top ``num_draft`` prefixes = a trie of ``num_draft`` nodes)."""
    match = longest_match(store, context, max_span, min_span)
    if match is None:
        return [], 0
    span, lo, hi = match
    ranked = ranked_prefixes(continuations(store, lo, hi, span, max_matches, continuation), store.separator, num_draft)
    paths = [p for _, p in ranked]
    return (budget_cut(paths, num_draft) if budget == "distinct_tokens" else paths), span
