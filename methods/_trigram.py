"""ADED's tri-gram table: the offline build (cached outside git), load-time
pruning and the online boost. Used by ``methods/aded.py``; registers no proposer.

Design notes: docs/aded.md § Tri-gram table / § Online update. Build it ahead of a run with

    python -m methods.aded build [--corpus sharegpt|PATH] [--max-records N]

(a run whose table is missing builds it the same way, with a progress bar).

Layout (all numpy, token ids < 2**20):
  * a key is ``a << 20 | b`` for the two previous tokens (a, b); a triple code is ``key << 20 | c``;
  * on disk (``<cache_dir>/aded/<hash>/``): the **unpruned** normalised table as CSR arrays
    ``keys`` int64 [K] (sorted), ``offsets`` int64 [K+1], ``succ`` int32 [E], ``prob`` float32 [E],
    each key's successors sorted by probability (descending), then token id; plus ``meta.json``;
  * in memory: the same arrays after keeping the top ``prune_topk`` successors per key (load time,
    as released), plus a small dict overlay holding every key the online boost has touched, mirrored
    into arrays for the compiled search (``arrays()``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from specdec.running.corpus import (corpus_fingerprint, corpus_records, publish_arrays, record_texts,
                                    tokenize_documents, tokenizer_fingerprint)

log = logging.getLogger(__name__)

SHIFT = 20                      # bits per token id in a key / triple code
MASK = (1 << SHIFT) - 1
FORMAT_VERSION = 1              # bump when the on-disk layout or the counting rule changes


# ---------------------------------------------------------------------------------------------- build
def triple_codes(ids: Sequence[int]) -> np.ndarray:
    """int64 [len-2]: ``a << 40 | b << 20 | c`` for every consecutive triple of one document."""
    arr = np.asarray(ids, dtype=np.int64)
    return (arr[:-2] << (2 * SHIFT)) | (arr[1:-1] << SHIFT) | arr[2:]


def count_table(codes: np.ndarray) -> dict[str, np.ndarray]:
    """Counts of triple codes -> CSR table with successors sorted by probability (desc), then id.

    prob(c | a, b) = count(a, b, c) / count(a, b, *): the normalisation of the released builder."""
    uniq, counts = np.unique(codes, return_counts=True)          # [E], sorted by (key, succ)
    keys_all = uniq >> SHIFT                                      # [E]
    starts = np.flatnonzero(np.r_[True, keys_all[1:] != keys_all[:-1]])  # [K] first entry of each key
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(uniq)]))  # [E] key index
    totals = np.add.reduceat(counts, starts) if len(uniq) else counts  # [K]
    order = np.lexsort((uniq & MASK, -counts, group))             # within a key: count desc, id asc
    return {
        "keys": keys_all[starts],
        "offsets": np.r_[starts, len(uniq)].astype(np.int64),
        "succ": (uniq[order] & MASK).astype(np.int32),
        "prob": (counts[order] / totals[group[order]]).astype(np.float32),
    }


def build_table(tokenizer, corpus: str = "sharegpt", max_records: Optional[int] = None,
                batch_size: int = 512, progress: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenize the corpus and count its tri-grams. Returns (CSR arrays, meta)."""
    start = time.perf_counter()
    records = list(corpus_records(corpus, max_records))
    texts = [t for r in records for t in record_texts(r)]
    chunks, n_tokens = [], 0
    for ids in tokenize_documents(tokenizer, texts, batch_size, progress, total=len(texts),
                                  desc="aded: tokenizing corpus"):
        n_tokens += len(ids)
        if len(ids) >= 3:
            chunks.append(triple_codes(ids))
    codes = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    table = count_table(codes)
    meta = {"format": FORMAT_VERSION, "corpus": corpus, "records": len(records), "documents": len(texts),
            "tokens": n_tokens, "triples": int(len(codes)), "keys": int(len(table["keys"])),
            "entries": int(len(table["succ"])), "build_seconds": round(time.perf_counter() - start, 2)}
    return table, meta


def table_dir(cache_dir: Path, tokenizer, corpus: str, max_records: Optional[int]) -> Path:
    """``<cache_dir>/aded/trigram-<hash>``, the hash over tokenizer, corpus file and build params."""
    ident = json.dumps([FORMAT_VERSION, tokenizer_fingerprint(tokenizer), corpus_fingerprint(corpus), max_records])
    return Path(cache_dir) / "aded" / f"trigram-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def ensure_table(cache_dir: Path, tokenizer, corpus: str = "sharegpt", max_records: Optional[int] = None,
                 batch_size: int = 512, progress: bool = True) -> Path:
    """The cached table directory for these settings, building it first if missing."""
    out = table_dir(cache_dir, tokenizer, corpus, max_records)
    if (out / "meta.json").exists():
        return out
    log.info("aded: building the tri-gram table of %s (max_records=%s) into %s", corpus, max_records, out)
    table, meta = build_table(tokenizer, corpus, max_records, batch_size, progress)
    publish_arrays(out, table, meta)
    log.info("aded: table built in %.1f s: %s", meta["build_seconds"], meta)
    return out


# ---------------------------------------------------------------------------------------------- table
def prune(table: dict[str, np.ndarray], topk: Optional[int]) -> dict[str, np.ndarray]:
    """Keep the first ``topk`` successors of every key (they are stored best first)."""
    offsets = np.asarray(table["offsets"])
    sizes = np.diff(offsets)                                       # [K]
    if not topk or topk <= 0 or len(sizes) == 0 or sizes.max() <= topk:
        return {k: np.asarray(v) for k, v in table.items()}
    rank = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)  # [E] position within its key
    keep = rank < topk
    return {"keys": np.asarray(table["keys"]),
            "offsets": np.r_[0, np.cumsum(np.minimum(sizes, topk))].astype(np.int64),
            "succ": np.asarray(table["succ"])[keep], "prob": np.asarray(table["prob"])[keep]}


@lru_cache(maxsize=2)
def load_pruned(directory: str, topk: Optional[int]) -> tuple[dict[str, np.ndarray], dict]:
    """(pruned CSR arrays, meta) of a cached table; memory-mapped, so only the kept rows are read.
    Cached per process: the arrays are never written (the boost lives in an overlay)."""
    path = Path(directory)
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("keys", "offsets", "succ", "prob")}
    return prune(arrays, topk), json.loads((path / "meta.json").read_text())


class TrigramTable:
    """``S[(a, b)] -> {c: score}``: a read-only pruned base table plus the boost overlay.

    ``row(a, b)`` returns the successors and scores of key (a, b): the overlay's copy if the key has
    been boosted, else the base row; both are ordered best first at creation (boosted new successors
    are appended in the order they were first seen)."""

    def __init__(self, arrays: Optional[dict[str, np.ndarray]] = None):
        arrays = arrays or {"keys": np.zeros(0, np.int64), "offsets": np.zeros(1, np.int64),
                            "succ": np.zeros(0, np.int32), "prob": np.zeros(0, np.float32)}
        self.keys = arrays["keys"]        # int64 [K], sorted
        self.offsets = arrays["offsets"]  # int64 [K+1]
        self.succ = arrays["succ"]        # int32 [E]
        self.prob = arrays["prob"]        # float32 [E]
        self.boosted: dict[int, dict[int, float]] = {}  # key -> {successor: score}, insertion-ordered
        self.base_max_row = int(np.diff(self.offsets).max()) if len(self.keys) else 0
        self._clear_mirror()

    # The overlay mirrored for the compiled search (methods/_aded_search.py): the boosted keys, sorted, with
    # their slots, and per slot a run of a pool; a row that outgrows its run moves to the pool's end.
    def _clear_mirror(self) -> None:
        self.boosted_keys, self.slots = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.start, self.length, self.capacity = (np.zeros(64, np.int64) for _ in range(3))
        self.pool_succ, self.pool_score, self.pool_used = np.zeros(1024, np.int32), np.zeros(1024, np.float64), 0
        self.max_row = self.base_max_row

    def _mirror(self, key: int) -> None:
        row = self.boosted[key]
        n = len(row)
        i = int(np.searchsorted(self.boosted_keys, key))
        if i < len(self.boosted_keys) and self.boosted_keys[i] == key:
            s = int(self.slots[i])
        else:  # a new key: the next slot
            s = len(self.slots)
            self.boosted_keys, self.slots = np.insert(self.boosted_keys, i, key), np.insert(self.slots, i, s)
            if s == len(self.start):
                self.start, self.length, self.capacity = (np.r_[a, np.zeros_like(a)] for a in
                                                          (self.start, self.length, self.capacity))
        if n > self.capacity[s]:  # (re)allocate a run of twice the length at the pool's end
            need = self.pool_used + 2 * n
            if need > len(self.pool_succ):
                size = max(need, 2 * len(self.pool_succ))
                self.pool_succ = np.r_[self.pool_succ, np.zeros(size - len(self.pool_succ), np.int32)]
                self.pool_score = np.r_[self.pool_score, np.zeros(size - len(self.pool_score))]
            self.start[s], self.capacity[s], self.pool_used = self.pool_used, 2 * n, need
        lo = self.start[s]
        self.pool_succ[lo:lo + n] = list(row)
        self.pool_score[lo:lo + n] = list(row.values())
        self.length[s] = n
        self.max_row = max(self.max_row, n)

    def arrays(self) -> tuple:
        """The tuple the compiled search reads (layout in methods/_aded_search.py)."""
        return (self.keys, self.offsets, self.succ, self.prob, self.boosted_keys, self.slots, self.start,
                self.length, self.pool_succ, self.pool_score)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.offsets.nbytes + self.succ.nbytes + self.prob.nbytes)

    def base_row(self, key: int) -> tuple[list[int], list[float]]:
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            return [], []
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.succ[lo:hi].tolist(), self.prob[lo:hi].tolist()

    def row(self, a: int, b: int) -> tuple[list[int], list[float]]:
        key = (a << SHIFT) | b
        overlay = self.boosted.get(key)
        if overlay is not None:
            return list(overlay), list(overlay.values())
        return self.base_row(key)

    def boost(self, window: Sequence[int], delta: float, cap: float) -> None:
        """``S[(a,b)][c] = min(S[(a,b)][c] + delta, cap)`` for every consecutive triple of ``window``
        (absent keys / successors start from 0). No renormalisation, no decay: the table only grows."""
        touched = {}
        for a, b, c in zip(window, window[1:], window[2:]):
            key = (a << SHIFT) | b
            overlay = self.boosted.get(key)
            if overlay is None:
                overlay = self.boosted[key] = dict(zip(*self.base_row(key)))
            overlay[c] = min(overlay.get(c, 0.0) + delta, cap)
            touched[key] = None
        for key in touched:
            self._mirror(key)

    def clear_boost(self) -> None:
        self.boosted.clear()
        self._clear_mirror()
