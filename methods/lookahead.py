"""Lookahead (Alipay): multi-branch drafts retrieved from frequency tries of n-grams.

Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language Model with Lossless
Generation Accuracy", KDD 2024, arXiv 2312.12728; released code alipay/PainlessInferenceAcceleration
(``lookahead/common/lookahead_cache.py``, ``pia/lookahead/common/lookahead_cache.py``). Design notes:
docs/lookahead.md part A. (Not hao-ai-lab's Jacobi "lookahead decoding".)

    python run.py method=lookahead                 # released defaults (decoding_length 64, branch_length 12)
    python run.py method=lookahead_cpu             # CPU-sized tree, chosen by measurement
    python run.py method=lookahead_cpu method.warm_start=sharegpt    # warm start: 500 ShareGPT records

A forest of tries keyed by a token stores what followed that token (``TrieForest``). The prompt is
inserted with *input* frequencies (this request only, zeroed when it ends); committed tokens are
streamed in with *output* frequencies (they persist across questions), and optionally a text corpus
is inserted as output frequencies before timing (warm start). Each step the last
``max_query_length`` committed tokens are matched (longest context first) and a frequency-ranked
subtree of at most ``decoding_length`` tokens (root included) and depth ``branch_length`` becomes the
draft tree, in DFS order (topological; siblings by mixed frequency, descending):
``hier`` = trie-shaped, ``par`` = the same root-to-leaf paths as disjoint chains (duplicate
prefixes, as the paper's parallel baseline), ``one`` = a single greedy branch. Kind: deterministic.

Details the paper and the release leave open or that are [U], and how they are read here:
* Versions of the released code disagree on the ravel depth (``branch_length`` in
  ``pia/``, ``branch_length - 1`` in an older copy); we follow docs/lookahead.md: depth <= ``branch_length``.
* Prompt insertion (``prompt_insertion``): the released ``put`` cuts the prompt at its first EOS
  (any of the generation config's EOS ids) before inserting it, and so does ``released`` (default).
  With chat templates whose end-of-turn token is the EOS (SmolLM2's ``<|im_end|>`` = 2) that keeps
  little more than the system message; ``whole`` [design] inserts the whole prompt
  (``conf/method/lookahead_whole_prompt.yaml``). The generated stream is cut at the first stop id
  in both, as released.
* ``one`` mode ranks children by the same mixed score as ``hier`` (input-dominated). The released
  ``get_one_branch`` swaps the input/output slots (10000 x output + input); we treat that as a bug.
* Released ``put`` marks a *new* input tree as not updated for the pruning batch; here every touched
  tree counts (the batch trigger is a heuristic either way).
* Budget filter (``budget_filter``), when a matched subtree holds more live nodes than
  ``decoding_length``: since its Feb-2024 revision the released ``Tree.get`` stores ``None`` as every
  candidate's index, so the mixed-frequency fill never sets its cut-off and only nodes at or above
  the output-frequency cut-off (the ``min_output_size``-th largest) survive; prompt-only branches
  drop. ``released`` (default) reproduces that; ``indexed`` is the pre-2024 code (indices = DFS
  position), where the top mixed-frequency nodes fill the rest of the budget. Both keep the released
  quirks: when fewer than ``min_output_size`` nodes have output frequency the output cut-off is 0 and
  every node passes (the DFS budget still bounds the tree); zero-frequency nodes (eliminated prompt
  n-grams) can be drafted when the live subtree is under budget (spec pitfall; harmless for
  correctness).
* Depth is also clipped to ``remaining - 1`` (the released code clips to ``max_length``), so no
  node is drafted that could never be committed; the "enough tokens" threshold of the fallback
  keeps the unclipped ``branch_length``.
* Warm start: ``[eop] + answer_ids`` of the released README becomes ``assistant header + answer
  ids``, the header being the tokens the chat template puts at the end of every prompt. The
  warm-started trie is rebuilt on ``reset("run")`` (and ``reset("question")`` with
  ``reset_policy: per_question``) so timing never includes it; what was loaded is in ``stats()``.
  ``warm_start_prune`` [design] runs the pruning pass once right after the corpus insertion (the
  released code prunes at the first request end, so its first question sees the unpruned trie).
  Python-object tries cost ~300 B and ~3 us per node: 500 ShareGPT records = 0.6M tokens -> 4.9M
  nodes with branch_length 12 (2.3M after pruning; ~15 s, ~2.5 GB peak), 2.3M -> 1.3M with
  lookahead_cpu's 6, hence ``warm_start_max_records``. The build
  runs with the cyclic GC off and ends with ``gc.freeze()`` (process-wide: later GC passes skip
  the trie instead of rescanning millions of nodes inside timed steps).
* The warm-start corpus is read by ``specdec.running.corpus`` (shared with ADED): of ShareGPT, only the
  ``gpt`` turns (answers) are inserted, as output frequencies.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Optional, Sequence

from specdec.errors import SettingError
from specdec.running.corpus import corpus_path, corpus_records, record_texts
from specdec.running.prompts import stop_ids as model_stop_ids
from specdec.verify.proposer import Context, MethodEnv, Proposer, StepResult, register, sizes_up_to
from specdec.verify.tree import DraftTree

log = logging.getLogger(__name__)

MODES = ("hier", "par", "one")
RANKS = ("mix", "input", "output")
RESET_POLICIES = ("never", "per_question")
BUDGET_FILTERS = ("released", "indexed")      # see TokenTrie._cutoffs
PROMPT_INSERTIONS = ("released", "whole")     # prompt cut at its first stop id (released put) | whole prompt
INF = 1e9  # "no cut-off" in the released code


# ---------------------------------------------------------------------------------------------- tries
class TrieNode:
    """One token of a trie path: its children and its two frequencies (batch size 1: one input slot)."""

    __slots__ = ("children", "inp", "out")

    def __init__(self, inp: float, out: float):
        self.children: dict[int, TrieNode] = {}
        self.inp = inp  # input frequency: n-gram count in the current request's prompt (zeroed at its end)
        self.out = out  # output frequency: generated text and warm-start corpus (persists)


class TokenTrie:
    """What followed one key token: a frequency trie with the released node caps and pruning."""

    def __init__(self, max_node: int, max_output_node: int):
        self.nodes: dict[int, TrieNode] = {}  # first tokens after the key
        self.max_node = max_node
        self.max_output_node = max_output_node
        self.n_node = 0         # nodes created (released counter; recounted after a squeeze)
        self.n_output_node = 0  # nodes created by output insertions

    def put(self, tokens: Sequence[int], output: bool) -> None:
        """Insert one path: +1 on existing nodes, a new chain of frequency-1 nodes after the first miss."""
        nodes = self.nodes
        for i, tok in enumerate(tokens):
            node = nodes.get(tok)
            if node is None:
                for new_tok in tokens[i:]:
                    node = TrieNode(0.0, 1.0) if output else TrieNode(1.0, 0.0)
                    nodes[new_tok] = node
                    nodes = node.children
                self.n_node += len(tokens) - i
                self.n_output_node += (len(tokens) - i) if output else 0
                return
            if output:
                node.out += 1.0
            else:
                node.inp += 1.0
            nodes = node.children

    def match(self, rest: Sequence[int]) -> dict[int, TrieNode]:
        """Children of the node reached by ``rest`` (every node on the way must be live), else {}."""
        nodes = self.nodes
        for tok in rest:
            node = nodes.get(tok)
            if node is None or not (node.inp > 0 or node.out > 0):
                return {}
            nodes = node.children
        return nodes

    def get(self, rest: Sequence[int], max_size: int, max_length: int, rank: str = "mix",
            min_input_size: int = 0, min_output_size: int = 0,
            output_weight: float = 1e-4, budget_filter: str = "released") -> tuple[list[int], list[int]]:
        """Released ``Tree.get``: budget cut-offs, then DFS ravel. Returns (tokens, parents) of the
        draft nodes (root excluded); parents index the tree, 0 = root, so node i has index i + 1."""
        nodes = self.match(rest)
        if not nodes:
            return [], []
        weight = {"mix": output_weight, "input": 0.0, "output": 1.0}[rank]
        cut_in, cut_out, cut_mix = self._cutoffs(nodes, max_size, rank, min_input_size, min_output_size, weight,
                                                 budget_filter)
        tokens: list[int] = []
        parents: list[int] = []

        def ravel(children: dict[int, TrieNode], parent: int, depth_left: int) -> None:
            if len(tokens) + 1 >= max_size or depth_left <= 0:
                return
            ranked = sorted(children.items(), key=lambda kv: (1.0 - weight) * kv[1].inp + weight * kv[1].out,
                            reverse=True)
            for tok, node in ranked:
                if len(tokens) + 1 >= max_size:
                    return
                fi, fo = node.inp, node.out
                fm = (1.0 - weight) * fi + weight * fo
                if rank == "mix" and fi < cut_in and fo < cut_out and fm < cut_mix:
                    continue
                if (rank == "input" and fi < cut_in) or (rank == "output" and fo < cut_out):
                    continue
                tokens.append(tok)
                parents.append(parent)
                if node.children:
                    ravel(node.children, len(tokens), depth_left - 1)

        ravel(nodes, 0, max_length)
        return tokens, parents

    @staticmethod
    def _cutoffs(nodes, max_size, rank, min_input_size, min_output_size, weight,
                 budget_filter: str = "released") -> tuple[float, float, float]:
        """(input, output, mixed) frequency cut-offs; a node is drafted if it passes any (mix mode).

        Over budget in mix mode, ``released`` (Feb-2024+ code: every candidate's index is ``None``,
        so the mixed fill loop never counts a node) leaves the mixed cut-off at "none passes", and
        only the input/output reservations survive; ``indexed`` (pre-2024 code: candidates indexed by
        DFS position) derives the mixed cut-off from the nodes that fill the rest of the budget."""
        freqs: list[tuple[float, float, float]] = []  # (fi, fo, fm) of live nodes, DFS order

        def collect(children: dict[int, TrieNode]) -> None:
            for node in children.values():
                if node.inp > 0 or node.out > 0:
                    freqs.append((node.inp, node.out, (1.0 - weight) * node.inp + weight * node.out))
                    if node.children:
                        collect(node.children)

        collect(nodes)
        cut_in = cut_out = cut_mix = INF
        if rank == "input":
            over = sum(f[0] > 0 for f in freqs) > max_size
            cut_in = sorted((f[0] for f in freqs), reverse=True)[min_input_size - 1] if over else 0.0
        elif rank == "output":
            over = sum(f[1] > 0 for f in freqs) > max_size
            cut_out = sorted((f[1] for f in freqs), reverse=True)[min_output_size - 1] if over else 0.0
        elif len(freqs) > max_size:
            chosen: set[int] = set()
            if min_input_size > 0:
                by_in = sorted(range(len(freqs)), key=lambda i: freqs[i][0], reverse=True)
                cut_in = freqs[by_in[min_input_size - 1]][0]
                chosen.update(by_in[:min_input_size])
            if min_output_size > 0:
                by_out = sorted(range(len(freqs)), key=lambda i: freqs[i][1], reverse=True)
                cut_out = freqs[by_out[min_output_size - 1]][1]
                chosen.update(by_out[:min_output_size])
            if budget_filter == "indexed" and len(chosen) < max_size:
                by_mix = sorted(range(len(freqs)), key=lambda i: freqs[i][2], reverse=True)
                rest_size = max_size - len(chosen)
                chosen.update(by_mix[:rest_size])
                count = len(chosen)
                for i in range(rest_size, min(rest_size + max_size, len(freqs))):
                    if by_mix[i] in chosen:
                        continue
                    count += 1
                    if count >= max_size:
                        cut_mix = freqs[by_mix[i]][2]
                        break
        else:
            cut_mix = 0.0
        return cut_in, cut_out, cut_mix

    def one_branch(self, rest: Sequence[int], max_length: int, rank: str = "mix",
                   output_weight: float = 1e-4) -> list[int]:
        """Released ``get_one_branch``: follow the best live child at each level (see docstring on the score)."""
        nodes = self.match(rest)
        weight = {"mix": output_weight, "input": 0.0, "output": 1.0}[rank]
        branch: list[int] = []
        while nodes and len(branch) < max_length:
            best_tok, best, best_score = None, None, 0.0
            for tok, node in nodes.items():
                score = (1.0 - weight) * node.inp + weight * node.out
                if score > best_score:
                    best_tok, best, best_score = tok, node, score
            if best is None:
                break
            branch.append(best_tok)
            nodes = best.children
        return branch

    def squeeze(self) -> bool:
        """Over a cap: halve output frequencies > 1, delete every other node with its subtree."""
        if self.n_node <= self.max_node and self.n_output_node <= self.max_output_node:
            return False
        _halve_or_drop(self.nodes)
        self.n_node = self.n_output_node = _count(self.nodes)  # released: both set to the node count
        return True

    def reset_input(self) -> None:
        """Branch elimination: zero the input frequencies (descending only where they were > 0)."""
        _zero_input(self.nodes)

    def size(self) -> int:
        return _count(self.nodes)


def _halve_or_drop(nodes: dict[int, TrieNode]) -> None:
    for tok, node in list(nodes.items()):
        if node.out > 1.0:
            node.out *= 0.5
            _halve_or_drop(node.children)
        else:
            del nodes[tok]


def _count(nodes: dict[int, TrieNode]) -> int:
    return len(nodes) + sum(_count(n.children) for n in nodes.values() if n.children)


def _zero_input(nodes: dict[int, TrieNode]) -> None:
    for node in nodes.values():
        if node.inp > 0:
            node.inp = 0.0
            _zero_input(node.children)


def par_layout(tokens: list[int], parents: list[int], max_nodes: int) -> tuple[list[int], list[int]]:
    """Released ``par_get``: every root-to-leaf path of a DFS-ordered tree as its own chain from the
    root (shared prefixes duplicated), leaves in index order, at most ``max_nodes`` draft nodes."""
    has_child = [False] * (len(tokens) + 1)
    for p in parents:
        has_child[p] = True
    out_tokens: list[int] = []
    out_parents: list[int] = []
    for leaf in range(1, len(tokens) + 1):
        if has_child[leaf]:
            continue
        path = [leaf]
        while parents[path[-1] - 1] != 0:
            path.append(parents[path[-1] - 1])
        prev = 0
        for node in path[::-1][: max_nodes - len(out_tokens)]:
            out_tokens.append(tokens[node - 1])
            out_parents.append(prev)
            prev = len(out_tokens)
        if len(out_tokens) >= max_nodes:
            break
    return out_tokens, out_parents


class TrieForest:
    """Released ``LookaheadCache`` for batch size 1: ``mem`` maps a key token to its ``TokenTrie``."""

    def __init__(self, max_node: int = 65536, max_output_node: int = 512, squeeze_batch: int = 1024,
                 stop_words: Sequence[int] = (), eliminate_prompt_branches: bool = True):
        self.mem: dict[int, TokenTrie] = {}
        self.max_node, self.max_output_node = max_node, max_output_node
        self.squeeze_batch = squeeze_batch
        self.stop_words = frozenset(stop_words)
        self.eliminate = eliminate_prompt_branches
        self.buffer: list[int] = []          # streamed output tokens not yet inserted as keys
        self.updated: set[TokenTrie] = set()        # trees touched since the last pruning batch
        self.updated_input: set[TokenTrie] = set()  # trees holding this request's input frequencies
        self.squeezes = 0                    # pruning batches run

    def _tree(self, key: int) -> TokenTrie:
        tree = self.mem.get(key)
        if tree is None:
            tree = self.mem[key] = TokenTrie(self.max_node, self.max_output_node)
        return tree

    def put(self, tokens: Sequence[int], window: int, output: bool) -> None:
        """Insert ``tokens[i+1 : i+1+window]`` under key ``tokens[i]`` for every i but the last."""
        for i in range(len(tokens) - 1):
            tree = self._tree(tokens[i])
            tree.put(tokens[i + 1:i + 1 + window], output)
            self.updated.add(tree)
            if not output:
                self.updated_input.add(tree)

    def stream_put(self, new_tokens: Sequence[int], window: int, final: bool = False) -> None:
        """Output insertion as tokens are committed: a key is inserted once ``window`` tokens follow
        it (or, when ``final``, whatever follows it); keys in ``stop_words`` are skipped."""
        self.buffer.extend(new_tokens)
        buf = self.buffer
        ready = len(buf) - (1 if final else window)
        for i in range(max(ready, 0)):
            if buf[i] in self.stop_words:
                continue
            tree = self._tree(buf[i])
            tree.put(buf[i + 1:i + 1 + window], output=True)
            self.updated.add(tree)
        if final:
            self.buffer = []
        elif ready > 0:
            self.buffer = buf[-window:]

    def end_request(self, window: int) -> None:
        """Flush the stream, eliminate the prompt's input frequencies, prune if the batch is due."""
        self.stream_put([], window, final=True)
        if self.eliminate:
            for tree in self.updated_input:
                tree.reset_input()
            self.updated_input.clear()
        if len(self.updated) >= self.squeeze_batch:
            for tree in self.updated:
                tree.squeeze()
            self.updated.clear()
            self.squeezes += 1

    def prune_all(self) -> None:
        """Run the pruning batch now on every tree (used once after a warm start)."""
        for tree in self.mem.values():
            tree.squeeze()
        self.updated.clear()
        self.squeezes += 1

    def retrieve(self, query: Sequence[int], decoding_length: int, branch_length: int, mode: str = "hier",
                 rank: str = "mix", min_input_size: int = 0, min_output_size: int = 1,
                 output_weight: float = 1e-4, max_depth: Optional[int] = None,
                 budget_filter: str = "released") -> tuple[list[int], list[int]]:
        """Draft (tokens, parents) for the last committed tokens ``query`` (root = ``query[-1]``).

        Longest context first (key ``query[0]`` with the rest as a trie prefix, then shorter); a stage
        that returns at least ``branch_length`` tokens (root included; ``branch_length // 2`` in ``one``
        mode) stops the search, otherwise the last stage tried wins (no merge). ``max_depth`` clips the
        depth below ``branch_length`` without changing that threshold."""
        enough = branch_length // 2 if mode == "one" else branch_length  # tokens incl. root (released)
        branch_length = branch_length if max_depth is None else min(branch_length, max_depth)
        if decoding_length <= 1 or branch_length <= 0:
            return [], []
        tokens: list[int] = []
        parents: list[int] = []
        for i, key in enumerate(query):
            tree = self.mem.get(key)
            rest = query[i + 1:]
            if tree is None or (key in self.stop_words and not rest):
                continue
            if mode == "one":
                tokens = tree.one_branch(rest, min(branch_length, decoding_length - 1), rank, output_weight)
                parents = list(range(len(tokens)))
            else:
                tokens, parents = tree.get(rest, decoding_length, branch_length, rank, min_input_size,
                                           min_output_size, output_weight, budget_filter)
            if len(tokens) + 1 >= enough:
                break
        if mode == "par":
            tokens, parents = par_layout(tokens, parents, len(tokens))
        return tokens, parents

    def stats(self) -> dict:
        return {"trie_keys": len(self.mem), "trie_nodes": sum(t.n_node for t in self.mem.values()),
                "trie_pruning_batches": self.squeezes}


# ------------------------------------------------------------------------------------ warm-start corpus
def read_answers(corpus: str, max_records: Optional[int] = None) -> tuple[list[str], dict]:
    """The answer texts of a corpus (ShareGPT: its ``gpt`` turns) and a record of what was read."""
    path = corpus_path(corpus)
    records = list(corpus_records(corpus, max_records))
    texts = [text for record in records for text in record_texts(record, roles=("gpt",))]
    return texts, {"warm_start": corpus, "warm_start_file": str(path), "warm_start_records": len(records),
                   "warm_start_texts": len(texts)}


def assistant_header_ids(tokenizer) -> list[int]:
    """Tokens the chat template appends to every prompt (the released ``[eop]``); [] if unknown."""
    try:
        msgs = [{"role": "user", "content": "x"}]
        with_header = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - no chat template: no header
        return []
    if not with_header.startswith(without):
        return []
    return tokenizer(with_header[len(without):], add_special_tokens=False).input_ids


def cut_at_stop(tokens: Sequence[int], stops: frozenset) -> Sequence[int]:
    """``tokens`` up to (excluding) the first stop id, as the released ``put``/``stream_put`` do."""
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:i]
    return tokens


# ---------------------------------------------------------------------------------------------- method
@register("lookahead")
class Lookahead(Proposer):
    """Trie-retrieval drafts (Alipay Lookahead); see the module docstring."""

    def __init__(self, env: MethodEnv, decoding_length: int = 64, branch_length: int = 12,
                 decoding_mode: str = "hier", max_query_length: int = 2, min_output_size: Optional[int] = None,
                 min_input_size: int = 0, output_weight: float = 1e-4, max_node: int = 65536,
                 max_output_node: int = 512, squeeze_batch: int = 1024, stop_words: Sequence[int] = (),
                 eliminate_prompt_branches: bool = True, reset_policy: str = "never",
                 warm_start: Optional[str] = None, warm_start_max_records: Optional[int] = 500,
                 warm_start_prune: bool = True, budget_filter: str = "released",
                 prompt_insertion: str = "released"):
        super().__init__(env)
        mode, _, rank = decoding_mode.partition("_")
        rank = rank or "mix"
        if mode not in MODES or rank not in RANKS:
            raise SettingError(f"decoding_mode {decoding_mode!r}: expected one of {MODES}, "
                             "optionally suffixed _mix/_input/_output")
        if reset_policy not in RESET_POLICIES:
            raise SettingError(f"reset_policy must be one of {RESET_POLICIES}")
        if budget_filter not in BUDGET_FILTERS:
            raise SettingError(f"budget_filter must be one of {BUDGET_FILTERS}, got {budget_filter!r}")
        if prompt_insertion not in PROMPT_INSERTIONS:
            raise SettingError(f"prompt_insertion must be one of {PROMPT_INSERTIONS}, got {prompt_insertion!r}")
        self.budget_filter, self.prompt_insertion = budget_filter, prompt_insertion
        if decoding_length < 1 or branch_length < 0 or max_query_length < 1:
            raise SettingError("decoding_length >= 1, branch_length >= 0 and max_query_length >= 1 are required")
        self.decoding_length, self.branch_length = decoding_length, branch_length
        self.mode, self.rank = mode, rank
        self.max_query_length = max_query_length
        self.min_output_size = max(decoding_length // 2, 1) if min_output_size is None else min_output_size
        self.min_input_size, self.output_weight = min_input_size, output_weight
        self.window = branch_length + 1  # n-gram length inserted after each key (released: branch_length + 1)
        self.forest_args = dict(max_node=max_node, max_output_node=max_output_node, squeeze_batch=squeeze_batch,
                                stop_words=tuple(stop_words), eliminate_prompt_branches=eliminate_prompt_branches)
        self.reset_policy = reset_policy
        self.stop_ids = (model_stop_ids(env.tokenizer, getattr(env.model, "generation_config", None))
                         if env.tokenizer is not None else frozenset())
        self.update_time = 0.0  # seconds in begin/observe/end (trie maintenance; part of the loop's commit time)
        self.warm_start_prune = warm_start_prune
        self.warm_ids, self.warm_info = self._load_warm_start(warm_start, warm_start_max_records)
        self.warm_info["warm_start_prune"] = warm_start_prune if self.warm_ids else None
        self.forest = self._fresh_forest()
        self.dirty = False  # the forest has learned something since it was built

    # ------------------------------------------------------------------ state
    def _load_warm_start(self, source: Optional[str], max_records: Optional[int]) -> tuple[list[list[int]], dict]:
        info = {"warm_start": source, "warm_start_max_records": max_records}
        if source in (None, "none", "null", ""):
            return [], {**info, "warm_start": None}
        if self.env.tokenizer is None:
            raise SettingError("warm_start needs the target's tokenizer")
        start = time.perf_counter()
        texts, corpus_info = read_answers(source, max_records)
        header = assistant_header_ids(self.env.tokenizer)
        ids = [header + answer for answer in self.env.tokenizer(texts, add_special_tokens=False).input_ids]
        info.update(corpus_info, warm_start_tokens=sum(map(len, ids)), warm_start_prefix=len(header),
                    warm_start_read_s=round(time.perf_counter() - start, 2))
        log.info("lookahead warm start: %s", info)
        return ids, info

    def _fresh_forest(self) -> TrieForest:
        """The initial tries: empty, or built from the warm-start corpus (ids kept, so rebuilt on reset).

        The cyclic GC is off while millions of trie nodes are created (it would rescan the growing
        heap, ~5x slower) and the new nodes are then frozen out of later collections, so a full GC
        pass over them never lands inside a timed step (trie nodes form no cycles; refcounting frees
        them when the forest is replaced).
        """
        forest = TrieForest(**self.forest_args)
        if not self.warm_ids:
            return forest
        start = time.perf_counter()
        gc.disable()
        try:
            for ids in self.warm_ids:
                forest.put(ids, self.window, output=True)
            self.warm_info["warm_start_trie_nodes"] = forest.stats()["trie_nodes"]
            if self.warm_start_prune:
                forest.prune_all()
                self.warm_info["warm_start_trie_nodes_pruned"] = forest.stats()["trie_nodes"]
        finally:
            gc.enable()
        gc.freeze()
        self.warm_info["warm_start_insert_s"] = round(time.perf_counter() - start, 2)
        return forest

    def reset(self, scope: str) -> None:
        """``run``: back to the (warm-started) initial tries; ``question``: the same with
        ``reset_policy: per_question``, nothing with ``never`` (the paper: tries persist)."""
        if (scope == "run" or (scope == "question" and self.reset_policy == "per_question")) and self.dirty:
            self.forest = self._fresh_forest()
            self.dirty = False

    def reset_stats(self) -> None:
        self.update_time = 0.0

    # ------------------------------------------------------------------ one generation
    def begin(self, ctx: Context) -> None:
        start = time.perf_counter()
        self.forest.buffer = []
        prompt = ctx.tokens[1:ctx.prompt_len]  # released skips token 0 (BOS)
        if self.prompt_insertion == "released":  # released put: cut at the first EOS
            prompt = cut_at_stop(prompt, self.stop_ids)
        self.forest.put(prompt, self.window, output=False)
        self.dirty = True
        self.update_time += time.perf_counter() - start

    def propose(self, ctx: Context) -> DraftTree:
        tokens, parents = self.forest.retrieve(
            ctx.tokens[-self.max_query_length:], self.decoding_length, self.branch_length, self.mode, self.rank,
            self.min_input_size, self.min_output_size, self.output_weight, max_depth=ctx.remaining - 1,
            budget_filter=self.budget_filter)
        return DraftTree.from_lists([ctx.root, *tokens], [-1, *parents], self.env.device)  # one copy to the device

    def observe(self, step: StepResult) -> None:
        start = time.perf_counter()
        committed = cut_at_stop(step.committed, self.stop_ids)  # released: the stream is cut at the first EOS
        self.forest.stream_put(committed, self.window)
        self.update_time += time.perf_counter() - start

    def end(self, ctx: Context) -> None:
        start = time.perf_counter()
        self.forest.end_request(self.window)
        self.update_time += time.perf_counter() - start

    def tree_sizes(self) -> tuple[int, ...]:
        return sizes_up_to(self.decoding_length)  # retrieved subtrees of at most decoding_length tokens

    def stats(self) -> dict:
        return {**self.warm_info, "decoding_length": self.decoding_length, "branch_length": self.branch_length,
                "decoding_mode": f"{self.mode}_{self.rank}", "reset_policy": self.reset_policy,
                "budget_filter": self.budget_filter, "prompt_insertion": self.prompt_insertion,
                "trie_update_s": round(self.update_time, 3), **self.forest.stats()}
