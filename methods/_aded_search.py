"""ADED's per-step search, compiled with numba: the MCTS, the draft paths, the budget cut and the trie of
``methods/aded.py`` in one call, draft for draft the same as that file's Python reference (``mcts``,
``draft_paths``, ``budget_cut``, ``DraftTree.from_paths``). Registers no proposer.

Why compiled: the released search is Rust; in Python the 150 simulations (pUCT over up to 12 children,
rollouts, rewards) cost ~2.8 ms per step on this CPU, 10-15 % of a 7B model's verify step on an A100
(issue 14). Profile of the Python search: ``select_child`` ~40 %, the simulation loop ~20 %, rewards ~20 %,
row look-ups ~15 % of the time -- interpreter overhead spread over ~400 small calls per step, which
vectorising cannot remove (each simulation depends on the last), so the loop is compiled.

Same drafts: the arithmetic is the reference's, in the same order (plain left-to-right sums, the pUCT
expression term by term, ``math.log``/``math.sqrt`` from the same libm), and the rollouts draw from the
same stream as ``random.Random.random()``: ``MTStream`` holds CPython's Mersenne-Twister state and
``_random`` reproduces ``genrand_uint32`` and the 53-bit float construction of ``_randommodule.c``.

Table layout the kernel reads (``TrigramTable.arrays()``): the base CSR arrays (``keys`` sorted,
``offsets``, ``succ``, ``prob``) and the boost overlay mirrored into ``boosted_keys`` (sorted) with their
``slots``, and per slot a run (``start``, ``length``) of a pool (``pool_succ``, ``pool_score``).
"""

from __future__ import annotations

import math
import random

import numba as nb
import numpy as np

SHIFT = 20
_N, _M = 624, 397


class MTStream:
    """CPython's ``random.Random`` state as arrays the kernel advances in place (same draws, same order)."""

    def __init__(self, rng: random.Random):
        version, internal, gauss = rng.getstate()
        self.version, self.gauss = version, gauss
        self.mt = np.array(internal[:_N], dtype=np.int64)  # 624 words, each < 2**32
        self.pos = np.array([internal[_N]], dtype=np.int64)

    def to_random(self) -> random.Random:
        rng = random.Random()
        rng.setstate((self.version, tuple(self.mt.tolist()) + (int(self.pos[0]),), self.gauss))
        return rng


@nb.njit(cache=True)
def _genrand(mt, pos):
    """``genrand_uint32`` of CPython's _randommodule.c (MT19937), in int64 words masked to 32 bits."""
    if pos[0] >= _N:
        for kk in range(_N):
            y = (mt[kk] & 0x80000000) | (mt[(kk + 1) % _N] & 0x7FFFFFFF)
            mt[kk] = mt[(kk + _M) % _N] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
        pos[0] = 0
    y = mt[pos[0]]
    pos[0] += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y & 0xFFFFFFFF


@nb.njit(cache=True)
def _random(mt, pos):
    """``random.Random.random()``: 53 random bits from two words."""
    a = _genrand(mt, pos) >> 5
    b = _genrand(mt, pos) >> 6
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)


# ---------------------------------------------------------------------------------------------- table
@nb.njit(cache=True)
def _row(tab, a, b):
    """Row of key (a, b): (from_pool, lo, n); entries lo .. lo+n-1 of the base arrays or of the pool."""
    keys, offsets, succ, prob, boosted_keys, slots, start, length, pool_succ, pool_score = tab
    key = (a << SHIFT) | b
    i = np.searchsorted(boosted_keys, key)
    if i < len(boosted_keys) and boosted_keys[i] == key:
        s = slots[i]
        return True, start[s], length[s]
    i = np.searchsorted(keys, key)
    if i == len(keys) or keys[i] != key:
        return False, 0, 0
    return False, offsets[i], offsets[i + 1] - offsets[i]


@nb.njit(cache=True)
def _tok(tab, from_pool, i):
    return tab[8][i] if from_pool else tab[2][i]


@nb.njit(cache=True)
def _score(tab, from_pool, i):
    return tab[9][i] if from_pool else np.float64(tab[3][i])


@nb.njit(cache=True)
def _lookup(tab, a, b, c):
    """S[(a, b)].get(c, 0.0)."""
    from_pool, lo, n = _row(tab, a, b)
    for j in range(lo, lo + n):
        if _tok(tab, from_pool, j) == c:
            return _score(tab, from_pool, j)
    return 0.0


# ---------------------------------------------------------------------------------------------- MCTS
@nb.njit(cache=True)
def _select(node, first, nkids, cursor, visits, value, prior, c1, c2):
    """``aded.select_child``: the first unvisited child, else the first pUCT maximum."""
    fk, nk = first[node], nkids[node]
    cur = cursor[node]
    while cur < nk and visits[fk + cur] != 0:
        cur += 1
    cursor[node] = cur
    if cur < nk:
        return fk + cur
    parent_n = visits[node]
    coef = (c1 + math.log((parent_n + c2 + 1) / c2)) * math.sqrt(parent_n)
    best, best_score = fk, -np.inf
    for child in range(fk, fk + nk):
        n = visits[child]
        score = value[child] / n + coef * prior[child] / (1 + n)
        if score > best_score:
            best, best_score = child, score
    return best


@nb.njit(cache=True)
def search(tab, prev, root, sims, max_keys, c1, c2, path_score, mt, pos, capacity):
    """``aded.mcts``: returns (tokens, parents, visits, n_nodes) of the search tree (first n_nodes valid)."""
    tokens = np.empty(capacity, np.int64)
    parents = np.empty(capacity, np.int64)
    depth = np.empty(capacity, np.int64)
    prior = np.empty(capacity, np.float64)
    visits = np.zeros(capacity, np.int64)
    value = np.zeros(capacity, np.float64)
    first = np.full(capacity, -1, np.int64)   # index of the first child; -1 = not expanded
    nkids = np.zeros(capacity, np.int64)
    cursor = np.zeros(capacity, np.int64)
    tokens[0], parents[0], depth[0], prior[0] = root, -1, 0, 0.0
    n_nodes = 1
    path = np.empty(max_keys + 1, np.int64)
    seq = np.empty(max_keys + 2, np.int64)
    for _ in range(sims):
        node, plen = 0, 1
        path[0] = 0
        while first[node] >= 0 and nkids[node] > 0 and depth[node] + 1 < max_keys:  # selection
            node = _select(node, first, nkids, cursor, visits, value, prior, c1, c2)
            path[plen] = node
            plen += 1
        if first[node] < 0 and depth[node] + 1 < max_keys:  # expansion: every successor
            a = tokens[parents[node]] if node else prev
            from_pool, lo, n = _row(tab, a, tokens[node])
            first[node], nkids[node] = n_nodes, n
            for j in range(n):
                k = n_nodes + j
                tokens[k], prior[k] = _tok(tab, from_pool, lo + j), _score(tab, from_pool, lo + j)
                parents[k], depth[k] = node, depth[node] + 1
            n_nodes += n
            if n > 0:  # step into the last child added
                node = n_nodes - 1
                path[plen] = node
                plen += 1
        seq[0] = prev
        for i in range(plen):
            seq[i + 1] = tokens[path[i]]
        slen = plen + 1
        while slen - 1 < max_keys:  # rollout: sample successors in proportion to their scores
            from_pool, lo, n = _row(tab, seq[slen - 2], seq[slen - 1])
            if n == 0:
                break
            total = 0.0
            for j in range(lo, lo + n):
                total += _score(tab, from_pool, j)
            threshold, acc = _random(mt, pos) * total, 0.0
            pick = _tok(tab, from_pool, lo + n - 1)
            for j in range(lo, lo + n):
                acc += _score(tab, from_pool, j)
                if threshold < acc:
                    pick = _tok(tab, from_pool, j)
                    break
            seq[slen] = pick
            slen += 1
        gain = 1.0  # reward
        for i in range(slen - 2):
            gain += _lookup(tab, seq[i], seq[i + 1], seq[i + 2] if path_score else seq[i + 1])
        for i in range(plen):  # backup
            visits[path[i]] += 1
            value[path[i]] += gain
    return tokens, parents, visits, n_nodes


# ---------------------------------------------------------------------------------------------- drafts
@nb.njit(cache=True)
def _paths(tab, prev, tokens, parents, visits, n_nodes, top_sequences, max_keys):
    """``aded.draft_paths``: rows of token paths (padded with -1) and their lengths."""
    order = np.argsort(-visits[:n_nodes], kind="mergesort")[:top_sequences]  # stable: ties by node id
    paths = np.full((len(order), max_keys + 1), -1, np.int64)
    lengths = np.zeros(len(order), np.int64)
    rev = np.empty(max_keys + 1, np.int64)
    count = 0
    for node in order:
        m, cur = 0, node
        while cur >= 0:
            rev[m] = tokens[cur]
            m += 1
            cur = parents[cur]
        a = tokens[parents[node]] if node else prev
        from_pool, lo, n = _row(tab, a, tokens[node])
        length = m - 1 + (1 if n > 0 else 0)  # root dropped, argmax successor appended
        if length == 0:
            continue
        for i in range(m - 1):
            paths[count, i] = rev[m - 2 - i]
        if n > 0:
            best, best_score = lo, _score(tab, from_pool, lo)
            for j in range(lo + 1, lo + n):
                if _score(tab, from_pool, j) > best_score:
                    best, best_score = j, _score(tab, from_pool, j)
            paths[count, m - 1] = _tok(tab, from_pool, best)
        lengths[count] = length
        count += 1
    return paths[:count], lengths[:count]


@nb.njit(cache=True)
def _budget_cut(paths, lengths, budget):
    """``aded.budget_cut``: dedup, then drop the last path with the most distinct tokens until within budget."""
    keep = np.zeros(len(paths), np.bool_)
    sizes = np.zeros(len(paths), np.int64)
    for i in range(len(paths)):
        keep[i] = True
        for j in range(i):
            if keep[j] and lengths[j] == lengths[i] and np.all(paths[j] == paths[i]):
                keep[i] = False
                break
        for t in range(lengths[i]):  # distinct tokens of path i
            seen = False
            for u in range(t):
                seen = seen or paths[i, u] == paths[i, t]
            sizes[i] += not seen
    while keep.any() and sizes[keep].sum() > budget:
        worst, drop = -1, -1
        for i in range(len(paths)):
            if keep[i] and sizes[i] >= worst:
                worst, drop = sizes[i], i
        keep[drop] = False
    return paths[keep], lengths[keep]


@nb.njit(cache=True)
def _less(x, y):
    """Python's list order on -1-padded rows: element-wise, a proper prefix first."""
    for t in range(len(x)):
        if x[t] != y[t]:
            return x[t] < y[t]
    return False


@nb.njit(cache=True)
def _trie(root, paths, lengths, max_nodes):
    """``DraftTree.from_paths(root, sorted(paths), max_nodes=max_nodes)``: (tokens, parents) in BFS order."""
    order = list(range(len(paths)))
    for i in range(1, len(order)):  # insertion sort (<= top_sequences rows), stable
        j = i
        while j > 0 and _less(paths[order[j]], paths[order[j - 1]]):
            order[j], order[j - 1] = order[j - 1], order[j]
            j -= 1
    size = 1 + lengths.sum()
    tokens = np.empty(size, np.int64)
    parents = np.empty(size, np.int64)
    depth = np.empty(size, np.int64)
    tokens[0], parents[0], depth[0] = root, -1, 0
    n = 1
    for p in order:
        node = 0
        for t in range(lengths[p]):
            tok, nxt = paths[p, t], -1
            for k in range(1, n):  # the existing child of node holding tok, if any
                if parents[k] == node and tokens[k] == tok:
                    nxt = k
                    break
            if nxt < 0:
                nxt = n
                tokens[n], parents[n], depth[n] = tok, node, depth[node] + 1
                n += 1
            node = nxt
    bfs = np.argsort(depth[:n], kind="mergesort")[:max_nodes + 1]  # by (depth, creation)
    new_index = np.full(n, -1, np.int64)
    for new, old in enumerate(bfs):
        new_index[old] = new
    out_parents = np.empty(len(bfs), np.int64)
    for new, old in enumerate(bfs):
        out_parents[new] = -1 if old == 0 else new_index[parents[old]]
    return tokens[bfs], out_parents


@nb.njit(cache=True)
def draft_tree(tab, prev, root, sims, max_keys, c1, c2, path_score, top_sequences, max_nodes, mt, pos, capacity):
    """One ADED step after the boost: (tokens, parents) of the draft tree, root first (root only if no path)."""
    tokens, parents, visits, n_nodes = search(tab, prev, root, sims, max_keys, c1, c2, path_score, mt, pos,
                                              capacity)
    paths, lengths = _paths(tab, prev, tokens, parents, visits, n_nodes, top_sequences, max_keys)
    paths, lengths = _budget_cut(paths, lengths, max_nodes)
    return _trie(root, paths, lengths, max_nodes)
