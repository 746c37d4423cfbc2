"""Token Recycling: a training-free drafter built from the target's own "trash" predictions.

Paper: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models
with Token Recycling", arXiv 2408.08696 (ACL 2025). Released code: Luowaterbi/TokenRecycling
@ 1b4c05c (restated here, not copied; the repository has no licence). Design notes: docs/token_recycling.md.

    python run.py method=recycle            # the released "2.2.2" tree: 80 draft nodes + root
    python run.py method=recycle_cpu        # the CPU-sized nested subset chosen by measurement
    python run.py method=recycle method.tree_nodes=32 method.tree_order=rank_sum   # size sweep

State: an adjacency table ``A`` of ``vocab_size x k`` token ids, zero-initialised. Row ``t`` holds the
top-k tokens the target predicted after the latest tree node holding ``t``. Each step:
  1. fill a static rank template breadth-first from ``A`` (one gather per depth level), from the root;
  2. the shared verifier scores and accepts the tree (greedy, or sample-and-follow under sampling);
  3. ``observe`` overwrites the rows of every tree token with the top-k of the target logits at that
     node (``update: all``) or of the accepted nodes only (``update: accepted``).

Decisions on details the paper and the release leave open ([U] / [design]):
  * Duplicate writes in one update: the **last node in index order wins** (deterministic; on CUDA the
    released code's winner is unspecified).
  * The update on the last step of a generation (``final_update``; the table carries it into the
    next question, so it can change later drafts). ``released`` (default): the released loop breaks
    *before* its update when the accepted path holds the EOS or the step overshoots
    ``max_new_tokens`` by 2+ tokens (it tests ``generated - 1 > max_new_tokens``), and *after* it when
    the EOS is the bonus token; the same here. The released loop also runs past ``max_new_tokens``
    by up to one token, which the harness never does (the truncation rule is the core's). ``skip``
    never updates on the last step (this module's earlier behaviour).
  * ``update: accepted`` writes the rows of the root and the accepted nodes (``step.path``).
  * ``reset: never`` (paper) keeps the table across questions and turns. ``reset("run")`` always
    clears it: the paper's table lives for one process = one run. Whether warm-up trains the table is
    the core's ``warmup_keeps_state`` (the paper: it does; 3 warm-up runs).
  * ``dedup_siblings`` (default false = the released code: always the full template): cold rows are
    eight copies of token 0, so siblings can repeat a token; ``true`` (docs/verifier.md §2) drops the
    repeat and its subtree before verification (the first copy = lowest rank stays). In 2.2.2 and its
    nested subsets every lower-rank sibling's subtree contains the higher-rank sibling's, so no
    acceptance is lost in that step, but the trajectory can change: the dropped nodes also wrote
    table rows, and which node writes a repeated token last (hence with which context) moves. With
    a depth-1 template (``recycle_cpu``: the root's top 4) every duplicate has the same context, so
    the rows written are the same and ``true`` only makes the cold forwards cheaper.
  * ``update_from_prefill: true`` (ablation; paper = false): the core's prefill keeps only the last
    logits, so this runs one extra no-cache forward over the prompt in ``begin`` (counted in prefill
    time), then writes ``A[prompt[i]] = topk(logits_i)`` for i < len(prompt) - 1, last index wins.
  * Template files: a JSON list of rank paths (``[[0], [1], [0, 0], ...]``; prefixes are added), a
    JSON ``{"tree_adj": {node: [children]}}`` (SAM-Decoding's format; a child's rank is its position),
    or text with one path per line (ranks separated by spaces or commas, ``#`` comments).
  * Nested subsets (``tree_nodes``): the first N draft nodes of the 2.2.2 order (``bfs``) or of the
    order (rank sum, depth, path) (``rank_sum``); either prefix is ancestor-closed; the kept nodes are
    re-sorted breadth-first for the level fill.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from specdec.errors import SettingError
from specdec.verify.decode import device_work
from specdec.running.prompts import stop_ids
from specdec.verify.proposer import Context, MethodEnv, Proposer, StepResult, register
from specdec.verify.tree import DETERMINISTIC, DraftTree

RankPath = tuple[int, ...]

# The released "2.2.2" template as a children table: parent rank path -> number of children
# (sibling ranks 0..n-1). Expanded breadth-first it gives 80 draft nodes, depth 6, 40 leaves.
CHILDREN_2_2_2: dict[RankPath, int] = {
    (): 8,
    (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
    (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
    (1, 0): 2, (1, 1): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (5, 0): 1,
    (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1, (0, 1, 0): 1, (0, 2, 0): 1,
    (1, 0, 0): 1, (2, 0, 0): 1, (3, 0, 0): 1,
    (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1, (1, 0, 0, 0): 1,
    (0, 0, 0, 0, 0): 2, (0, 0, 0, 1, 0): 1,
}
TEMPLATES = {"2.2.2": CHILDREN_2_2_2, "tr_2.2.2": CHILDREN_2_2_2}
TREE_ORDERS = ("bfs", "rank_sum")
RESET_POLICIES = ("never", "question", "turn")
UPDATE_POSITIONS = ("all", "accepted")
TABLE_DTYPES = {"int64": torch.int64, "int32": torch.int32}
FINAL_UPDATES = ("released", "skip")


def expand_children(children: dict[RankPath, int]) -> list[RankPath]:
    """Rank paths of every draft node (root excluded) in BFS order = sorted by (depth, path)."""
    nodes, frontier = [], [()]
    while frontier:
        level = [parent + (r,) for parent in frontier for r in range(children.get(parent, 0))]
        nodes += sorted(level)
        frontier = sorted(level)
    return nodes


def read_paths(path: Path) -> list[RankPath]:
    """Rank paths from a template file (formats in the module docstring)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "tree_adj" in data:
            return _paths_from_adjacency({int(n): list(c) for n, c in data["tree_adj"].items()})
        return [tuple(int(r) for r in p) for p in data]
    lines = (line.split("#")[0].replace(",", " ").split() for line in text.splitlines())
    return [tuple(int(r) for r in parts) for parts in lines if parts]


def _paths_from_adjacency(adj: dict[int, list[int]]) -> list[RankPath]:
    """``{node: [children]}`` with node 0 = root -> rank paths (a child's rank = its list position)."""
    paths: dict[int, RankPath] = {0: ()}
    stack = [0]
    while stack:
        node = stack.pop()
        for rank, child in enumerate(adj.get(node, [])):
            paths[child] = paths[node] + (rank,)
            stack.append(child)
    return [p for n, p in paths.items() if n != 0]


@dataclass(frozen=True, eq=False)
class Template:
    """A static rank tree in BFS order; node 0 = root (rank path ``()``). All buffers built once."""

    paths: list[RankPath]      # [T] rank path of every node; paths[0] == ()
    parents: torch.Tensor      # int64 [T]; parents[0] = -1
    ranks: torch.Tensor        # int64 [T]; rank of a node in its parent's row (root: 0, unused)
    depth: torch.Tensor        # int64 [T]
    bounds: list[int]          # level boundaries: nodes of depth d are bounds[d-1]:bounds[d]
    ancestors: torch.Tensor    # bool [T, T]: j is i or an ancestor of i
    earlier_sibling: torch.Tensor  # bool [T, T]: j < i and parents[j] == parents[i]
    parent_list: list[int]
    children: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_rank(self) -> int:
        return max((p[-1] for p in self.paths[1:]), default=-1)

    @staticmethod
    def from_paths(paths: list[RankPath], device: torch.device | str = "cpu") -> "Template":
        """Close the node set under prefixes, sort by (depth, path), build every derived buffer."""
        nodes = set()
        for p in paths:
            if not p or any(r < 0 for r in p):
                raise SettingError(f"template path {list(p)}: rank paths must be non-empty and ranks >= 0")
            nodes.update(tuple(p[:d]) for d in range(1, len(p) + 1))
        order = [()] + sorted(nodes, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(order)}
        parent_list = [-1] + [index[p[:-1]] for p in order[1:]]
        depth = [len(p) for p in order]
        T = len(order)
        anc = torch.eye(T, dtype=torch.bool)
        for i, par in enumerate(parent_list[1:], start=1):
            anc[i] |= anc[par]
        par_t = torch.tensor(parent_list)
        earlier_sibling = (par_t[:, None] == par_t[None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
        children: list[list[int]] = [[] for _ in range(T)]
        for i, par in enumerate(parent_list[1:], start=1):
            children[par].append(i)
        bounds = [sum(1 for d in depth if d <= level) for level in range(max(depth) + 1)]
        return Template(paths=order, parents=par_t.to(device), ranks=torch.tensor([0] + [p[-1] for p in order[1:]], device=device),
                        depth=torch.tensor(depth, device=device), bounds=bounds, ancestors=anc.to(device),
                        earlier_sibling=earlier_sibling.to(device), parent_list=parent_list, children=children)

    def leaf_paths(self, pad: int = -1) -> torch.Tensor:
        """int64 [leaves, max depth + 1]: node indices root -> leaf, padded with ``pad`` (never a token id)."""
        leaves = [i for i in range(self.size) if not self.children[i]]
        rows = []
        for leaf in leaves:
            path = [leaf]
            while path[-1] != 0:
                path.append(self.parent_list[path[-1]])
            rows.append(path[::-1])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def nested_subset(paths: list[RankPath], n_nodes: int, order: str) -> list[RankPath]:
    """The first ``n_nodes`` draft nodes of ``paths`` in ``order``; ancestor-closed for both orders."""
    if order not in TREE_ORDERS:
        raise SettingError(f"tree_order must be one of {TREE_ORDERS}, got {order!r}")
    if not 1 <= n_nodes <= len(paths):
        raise SettingError(f"tree_nodes must be in 1..{len(paths)} (draft nodes of the template), got {n_nodes}")
    if order == "bfs":
        ranked = sorted(paths, key=lambda p: (len(p), p))
    else:  # near-greedy first: 0, 00, 000, ..., then 1, 01, 10, 001, ...
        ranked = sorted(paths, key=lambda p: (sum(p), len(p), p))
    return ranked[:n_nodes]


def load_template(tree: str, tree_nodes: Optional[int], tree_order: str, k: int,
                  device: torch.device | str = "cpu") -> Template:
    """Resolve the ``tree`` knobs to a Template and check that every rank fits in a row of width k."""
    if tree in TEMPLATES:
        paths = expand_children(TEMPLATES[tree])
    else:
        path = _find_file(tree)
        if path is None:
            raise SettingError(f"tree {tree!r} is neither a template name ({sorted(TEMPLATES)}) nor an existing file")
        paths = sorted(set(Template.from_paths(read_paths(path)).paths[1:]))
    if tree_order not in TREE_ORDERS:
        raise SettingError(f"tree_order must be one of {TREE_ORDERS}, got {tree_order!r}")
    if tree_nodes is not None:
        paths = nested_subset(paths, int(tree_nodes), tree_order)
    template = Template.from_paths(paths, device)
    if template.max_rank >= k:
        raise SettingError(f"tree {tree!r} uses child rank {template.max_rank}, but a table row holds only k={k} "
                         f"candidates (ranks 0..{k - 1}); set k >= {template.max_rank + 1}")
    return template


def _find_file(name: str) -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for candidate in (Path(name), here.parent / name, here / "recycle_trees" / name):
        if candidate.is_file():
            return candidate
    return None


def last_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """bool [T]: True where no later index holds the same token (the write that wins)."""
    same = tokens[:, None] == tokens[None, :]  # [T, T]
    return ~same.triu(1).any(1)


@register("recycle")
class TokenRecycling(Proposer):
    """Adjacency table ``A[V, k]`` + static rank template, filled breadth-first from the root."""

    def __init__(self, env: MethodEnv, k: int = 8, tree: str = "2.2.2", tree_nodes: Optional[int] = None,
                 tree_order: str = "bfs", reset: str = "never", update: str = "all", table_dtype: str = "int64",
                 update_from_prefill: bool = False, dedup_siblings: bool = False, final_update: str = "released"):
        super().__init__(env)
        if int(k) < 1:
            raise SettingError(f"k must be >= 1, got {k}")
        if reset not in RESET_POLICIES:
            raise SettingError(f"reset must be one of {RESET_POLICIES}, got {reset!r}")
        if update not in UPDATE_POSITIONS:
            raise SettingError(f"update must be one of {UPDATE_POSITIONS}, got {update!r}")
        if table_dtype not in TABLE_DTYPES:
            raise SettingError(f"table_dtype must be one of {sorted(TABLE_DTYPES)}, got {table_dtype!r}")
        if final_update not in FINAL_UPDATES:
            raise SettingError(f"final_update must be one of {FINAL_UPDATES}, got {final_update!r}")
        self.final_update = final_update
        self.stop_ids = (stop_ids(env.tokenizer, getattr(env.model, "generation_config", None))
                         if env.tokenizer is not None else frozenset())
        self.k, self.reset_policy, self.update = int(k), reset, update
        self.update_from_prefill, self.dedup_siblings = bool(update_from_prefill), bool(dedup_siblings)
        self.template = load_template(tree, tree_nodes, tree_order, self.k, env.device)
        self.table = torch.zeros(env.vocab_size, self.k, dtype=TABLE_DTYPES[table_dtype], device=env.device)
        self.reset_stats()

    # ------------------------------------------------------------------ drafting
    def fill(self, root: int) -> torch.Tensor:
        """int64 [T]: template tokens, level by level: tok[i] = A[tok[parent[i]], rank[i]]."""
        tpl, flat = self.template, self.table.view(-1)
        tokens = torch.empty(tpl.size, dtype=torch.long, device=self.table.device)
        tokens[0] = root
        for lo, hi in zip(tpl.bounds[:-1], tpl.bounds[1:]):  # one gather per depth level
            tokens[lo:hi] = flat[tokens[tpl.parents[lo:hi]] * self.k + tpl.ranks[lo:hi]]
        return tokens

    def propose(self, ctx: Context) -> DraftTree:
        tokens = self.fill(ctx.root)  # [T]
        tpl = self.template
        if self.dedup_siblings:
            repeat = (tpl.earlier_sibling & (tokens[:, None] == tokens[None, :])).any(1)  # [T]
            alive = ~(tpl.ancestors & repeat[None, :]).any(1)                             # [T]
            alive_list = alive.tolist()  # the step's one read: the tree's size is decided on the host
            if not all(alive_list):
                self.pruned_nodes += alive_list.count(False)
                return self._subtree(tokens, alive, alive_list)
        tree = DraftTree(tokens, tpl.parents, kind=DETERMINISTIC)
        # The template is static: hand the verifier its precomputed buffers instead of rebuilding
        # them per step (DraftTree caches these as cached_property values in the instance dict).
        tree.__dict__.update(depth=tpl.depth, ancestors=tpl.ancestors, parent_list=tpl.parent_list,
                             children=tpl.children)
        return tree

    def _subtree(self, tokens: torch.Tensor, alive: torch.Tensor, alive_list: list[bool]) -> DraftTree:
        """The ancestor-closed subtree of kept nodes (``alive`` bool [T], also read as ``alive_list``), with its
        buffers sliced on the device (a stable sort puts the kept indices first, in order: no nonzero, no copy)."""
        tpl = self.template
        kept = [i for i, a in enumerate(alive_list) if a]        # increasing, kept[0] == 0
        keep = torch.sort((~alive).to(torch.uint8), stable=True).indices[:len(kept)]   # [T'] = kept
        new_index = alive.long().cumsum(0) - 1                   # [T] old -> new position
        parents = new_index[tpl.parents[keep].clamp_min(0)]
        parents[0] = -1
        tree = DraftTree(tokens[keep], parents, kind=DETERMINISTIC)
        position = {old: new for new, old in enumerate(kept)}
        tree.__dict__.update(depth=tpl.depth[keep], ancestors=tpl.ancestors[keep][:, keep],
                             parent_list=[-1] + [position[tpl.parent_list[i]] for i in kept[1:]])
        return tree

    # ------------------------------------------------------------------ learning
    def write_rows(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Overwrite ``A[tokens[i]]`` with the top-k of ``logits[i]``; for repeated tokens the last i wins: every
        copy of a token writes the top-k of its last occurrence, so repeated writes agree (deterministic on any
        device) and no data-dependent selection (a device sync) is needed."""
        n = tokens.shape[0]
        same = tokens[:, None] == tokens[None, :]                                          # [n, n]
        last = torch.where(same, torch.arange(n, device=tokens.device), -1).amax(1)        # [n] last i holding it
        top = torch.topk(logits, self.k, dim=-1).indices                                   # [n, k]
        self.table[tokens] = top[last].to(self.table.dtype)

    def updates_on(self, step: StepResult) -> bool:
        """Whether the released loop reaches its table update on this step (``final_update``)."""
        if not step.final:
            return True
        if self.final_update == "skip":
            return False
        uncommitted = len(step.path) - len(step.committed)  # accepted drafts + bonus cut by the truncation
        eos_in_path = uncommitted > 0 and step.committed[-1] in self.stop_ids  # a stop id among the drafts
        return not eos_in_path and uncommitted < 2

    def observe(self, step: StepResult) -> None:
        if not self.updates_on(step):
            return
        start = time.perf_counter()
        nodes = slice(None) if self.update == "all" else step.tree.path_index(step.path)  # on the device, no copy
        with device_work():  # top-k over every node's logits runs on the target's device: its own figure
            self.write_rows(step.tree.tokens[nodes], step.logits[nodes])
        self.steps += 1
        self.observe_time += time.perf_counter() - start

    @torch.inference_mode()
    def begin(self, ctx: Context) -> None:
        if not self.update_from_prefill or len(ctx.tokens) < 2:
            return
        model = self.env.model
        if model is None:
            raise SettingError("update_from_prefill needs the target model in MethodEnv")
        ids = torch.tensor([ctx.tokens[:-1]], device=self.table.device)  # what the prefill encodes
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]  # [P, H]
        head = model.get_output_embeddings()
        for lo in range(0, hidden.shape[0], 256):  # chunks keep the [chunk, V] logits small
            logits = head(hidden[lo:lo + 256]).float()
            self.write_rows(ids[0, lo:lo + 256], logits)

    def reset(self, scope: str) -> None:
        clears = {"run": True, "question": self.reset_policy in ("question", "turn"),
                  "turn": self.reset_policy == "turn"}
        if clears[scope]:
            self.table.zero_()

    def reset_stats(self) -> None:
        self.observe_time = 0.0
        self.steps = 0
        self.pruned_nodes = 0

    def tree_sizes(self) -> tuple[int, ...]:
        return (1, self.template.size)  # the static template every step (root-only when one token is left)

    def stats(self) -> dict:
        return {"table_bytes": self.table.numel() * self.table.element_size(), "vocab_size": self.table.shape[0],
                "k": self.k, "table_dtype": str(self.table.dtype).removeprefix("torch."),
                "tree_tokens": self.template.size, "tree_depth": len(self.template.bounds) - 1,
                "dedup_siblings": self.dedup_siblings, "final_update": self.final_update,
                "updates": self.steps, "observe_time_s": round(self.observe_time, 4),
                "pruned_duplicate_nodes": self.pruned_nodes}
