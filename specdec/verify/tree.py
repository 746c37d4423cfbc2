"""Draft trees: what a proposer hands the verifier (docs/verifier.md §2).

Decoding-state invariant, written once here for the whole package:
    the committed sequence is ``prompt + generated``; the target's KV cache holds every committed
    token except the last one, the *root*. Every draft tree starts at that root (node 0), which
    is query row 0 of the verify forward.

Vocabulary used throughout: *accepted* draft nodes are tree nodes whose tokens are committed;
the *bonus* token is the one extra token each step commits from the target's own distribution
(argmax under greedy, a sample or a recovered/correction token under sampling).

A tree is stored flat, in topological order (every parent before its children); sibling order is
draw order. A root-only tree means "no draft" and takes the plain one-token path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
import torch

# How the draft tokens were produced; selects the sampling acceptance rule (docs/verifier.md §6).
DETERMINISTIC = "deterministic"  # argmax / retrieved drafts: sample-and-follow
CHAIN_SAMPLED = "chain_sampled"  # one sampled child per node: Leviathan single-draft rule
IID = "iid"                      # k i.i.d. sampled children per node: SpecInfer multi-step rule
IID_KSEQ = "iid_kseq"            # the same i.i.d. trie, verified by SpecTr's K-SEQ with rho*
WITHOUT_REPLACEMENT = "without_replacement"  # distinct children drawn without replacement: RSD's recursive rule
MULTI_DRAFT_IS = "multi_draft_is"  # the i.i.d. trie, Khisti et al.'s two-step scheme: select one draft, then SD against its exact law
KINDS = (DETERMINISTIC, CHAIN_SAMPLED, IID, IID_KSEQ, WITHOUT_REPLACEMENT, MULTI_DRAFT_IS)


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A draft tree in topological order; node 0 is the root (the last committed token)."""

    tokens: torch.Tensor   # int64 [T]; tokens[0] = root
    parents: torch.Tensor  # int64 [T]; parents[0] = -1, 0 <= parents[i] < i
    kind: str = DETERMINISTIC
    # Draft distribution that produced node i's children, over the full vocabulary (for
    # WITHOUT_REPLACEMENT: before any child was drawn). float32 [T, V]; required for every kind but
    # DETERMINISTIC under sampling, else None.
    draft_probs: Optional[torch.Tensor] = None
    # IID / IID_KSEQ / MULTI_DRAFT_IS: how many of the i.i.d. draws produced node i (repeated draws share one node).
    multiplicity: Optional[torch.Tensor] = None  # int64 [T]
    # Method-specific payload handed back in ``StepResult`` (e.g. template ranks); never read by the core.
    meta: object = field(default=None, repr=False)
    # Partial-depth verification (Kangaroo; docs/verifier.md §10): a ``specdec.verify.target.ShallowStates`` holding the
    # nodes' states entering layer ℓ, computed while drafting; ``Target.score`` then runs layers [ℓ, L) only.
    shallow: object = field(default=None, repr=False)
    # Extra query rows scored in the same forward, never accepted, never kept in the cache (``SideRows``;
    # docs/verifier.md §10.1); their wanted logits go back to the proposer as ``StepResult.side_logits``.
    side: Optional["SideRows"] = field(default=None, repr=False)

    def __post_init__(self):
        if self.tokens.dim() != 1 or self.tokens.shape != self.parents.shape:
            raise ValueError("tokens and parents must be 1-D tensors of equal length")
        if self.kind not in KINDS:
            raise ValueError(f"unknown tree kind {self.kind!r}; expected one of {KINDS}")
        if self.side is not None and self.side.sees.shape[1] != self.size + self.side.size:
            raise ValueError(f"side rows see {self.side.sees.shape[1]} columns, but the tree has {self.size} rows "
                             f"and {self.side.size} side rows")

    # ------------------------------------------------------------------ constructors
    # Every constructor builds the tree on ``device`` with at most one host-to-device copy (the token ids from
    # Python) and leaves the Python-side buffers it already knows (parents, depth, token ids) in the instance's
    # cache, so the verifier reads no value back from the device to use them (docs/verifier.md §2).
    @staticmethod
    def root_only(root: int, device: torch.device | str = "cpu") -> "DraftTree":
        """The empty draft: AR decoding is a loop of root-only trees. Built by fills, no copy from the host."""
        tree = DraftTree(torch.full((1,), int(root), dtype=torch.long, device=device),
                         torch.full((1,), -1, dtype=torch.long, device=device))
        tree.__dict__.update(parent_list=[-1], depth_list=[0], token_list=[int(root)], children=[[]],
                             depth=torch.zeros(1, dtype=torch.long, device=device))
        return tree

    @staticmethod
    def from_lists(tokens: Sequence[int], parents: Sequence[int], device: torch.device | str = "cpu",
                   **fields) -> "DraftTree":
        """A tree from Python lists (``parents[0] = -1``, topological order), in one copy to ``device``:
        token ids, parents and depths travel as one ``[3, T]`` tensor. ``fields``: the other dataclass fields."""
        tokens, parents = [int(t) for t in tokens], [int(p) for p in parents]
        depth = _depths(parents)
        packed = torch.tensor([tokens, parents, depth], dtype=torch.long, device=device)
        return DraftTree._from_packed(packed, fields, parent_list=parents, depth_list=depth, token_list=tokens)

    @classmethod
    def _from_packed(cls, packed: torch.Tensor, fields: dict, **host_buffers) -> "DraftTree":
        """The tree whose tokens, parents and depth are the rows of ``packed`` [3, T] (moved as one tensor)."""
        tree = cls(packed[0], packed[1], **fields)
        tree.__dict__.update(host_buffers, depth=packed[2], _packed=packed)
        return tree

    @staticmethod
    def from_paths(root: int, paths: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                   max_nodes: Optional[int] = None, **fields) -> "DraftTree":
        """Merge token paths (each continuing the root) into a trie, in breadth-first order.

        Shared prefixes become one node; ``max_nodes`` (draft nodes, root excluded) keeps the
        first nodes in BFS order, which is ancestor-closed. ``fields``: the other dataclass fields.
        """
        return DraftTree.from_lists(*DraftTree.trie_lists(root, paths, max_nodes), device, **fields)

    @staticmethod
    def trie_lists(root: int, paths: Sequence[Sequence[int]],
                   max_nodes: Optional[int] = None) -> tuple[list[int], list[int]]:
        """``from_paths``'s trie as Python lists (tokens, parents), without building tensors: for a proposer
        that needs the tree's size first (e.g. to shape its side rows)."""
        child_maps: list[dict[int, int]] = [{}]
        parents, tokens, depth = [-1], [root], [0]
        for path in paths:
            node = 0
            for tok in path:
                nxt = child_maps[node].get(int(tok))
                if nxt is None:
                    nxt = len(tokens)
                    child_maps[node][int(tok)] = nxt
                    child_maps.append({})
                    parents.append(node); tokens.append(int(tok)); depth.append(depth[node] + 1)
                node = nxt
        order = sorted(range(len(tokens)), key=lambda i: (depth[i], i))
        if max_nodes is not None:
            order = order[: max_nodes + 1]
        new_index = {old: new for new, old in enumerate(order)}
        return [tokens[i] for i in order], [-1 if i == 0 else new_index[parents[i]] for i in order]

    @staticmethod
    def chain(root: int, draft: Sequence[int], device: torch.device | str = "cpu") -> "DraftTree":
        """A single branch root -> draft[0] -> draft[1] -> ...: one copy (``from_lists``); the ancestor matrix
        is a lower triangle made on ``device``. An empty draft is the root-only tree (no copy)."""
        n = len(draft)
        if n == 0:
            return DraftTree.root_only(root, device)
        tree = DraftTree.from_lists([root, *draft], range(-1, n), device)
        tree.__dict__["ancestors"] = torch.ones(n + 1, n + 1, dtype=torch.bool, device=device).tril()
        return tree

    # ------------------------------------------------------------------ device
    def to(self, device: torch.device | str) -> "DraftTree":
        """This tree with tokens and parents on ``device`` (one copy for a ``from_lists`` tree, whose depth rides
        along; ``depth`` / ``ancestors`` are otherwise rebuilt there, without a copy); ``self`` when they are there
        already. ``draft_probs`` / ``multiplicity`` stay where they are: the sampling rules read them on the
        host. Side rows move with the tree (one copy). The Python-side buffers carry over."""
        host_buffers = {k: v for k, v in self.__dict__.items() if k in _HOST_BUFFERS}
        side = self.side.to(device) if self.side is not None else None
        packed = self.__dict__.get("_packed")
        if packed is not None:
            moved = packed.to(device)
            if moved is packed and side is self.side:
                return self
            fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if f.name not in ("tokens", "parents")}
            return type(self)._from_packed(moved, {**fields, "side": side}, **host_buffers)
        tokens, parents = self.tokens.to(device), self.parents.to(device)
        if tokens is self.tokens and parents is self.parents and side is self.side:
            return self
        tree = dataclasses.replace(self, tokens=tokens, parents=parents, side=side)
        tree.__dict__.update(host_buffers)
        return tree

    # ------------------------------------------------------------------ derived buffers
    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def forward_rows(self) -> int:
        """Query rows of this tree's verify forward: the T tree rows plus any side rows."""
        return self.size + (self.side.size if self.side is not None else 0)

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def token_list(self) -> list[int]:
        """The token ids as Python ints (one read of the device; constructors and the greedy rule fill it)."""
        return self.tokens.tolist()

    @cached_property
    def depth_list(self) -> list[int]:
        """Depth of every node as Python ints (validates the topological order)."""
        return _depths(self.parent_list)

    @cached_property
    def depth(self) -> torch.Tensor:
        """int64 [T]: depth[0] = 0, depth[i] = depth[parents[i]] + 1 (the ancestor count minus one, on the device)."""
        return self.ancestors.sum(1) - 1

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """bool [T, T]: ancestors[i, j] is True iff j is i or an ancestor of i. Built on the tree's device by
        walking every node up one parent per round (as many rounds as the deepest node): no host copy."""
        T, device = self.size, self.tokens.device
        anc = torch.eye(T, dtype=torch.bool, device=device)
        up = self.parents.clamp_min(0)                 # the root is its own parent: walks stop there
        node = torch.arange(T, device=device)
        for _ in range(max(self.depth_list)):
            node = up[node]
            anc.scatter_(1, node[:, None], True)
        return anc

    @cached_property
    def children(self) -> list[list[int]]:
        """Children of every node, in index (draw) order."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parent_list[1:], start=1):
            kids[p].append(i)
        return kids

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node``, root first."""
        path = [node]
        while path[-1] != 0:
            path.append(self.parent_list[path[-1]])
        return path[::-1]

    def path_index(self, path: list[int]) -> torch.Tensor:
        """int64 [len(path)] on the tree's device: the node indices of ``path``. A root-to-node path (what every
        acceptance rule returns) is read off the ancestor matrix on the device (a stable sort puts a node's
        ancestors first, in index order = root first): no host copy. Any other list is copied. The last answer is
        kept (the commit and the hidden-state rows ask for the same path)."""
        last = self.__dict__.get("_path_index")
        if last is not None and last[0] == path:
            return last[1]
        if path == list(range(len(path))):
            index = torch.arange(len(path), device=self.tokens.device)
        elif "parent_list" in self.__dict__ and path == self.path_to(path[-1]):
            index = torch.sort((~self.ancestors[path[-1]]).to(torch.uint8), stable=True).indices[:len(path)]
        else:
            index = torch.tensor(path, dtype=torch.long, device=self.tokens.device)
        self.__dict__["_path_index"] = (list(path), index)
        return index


@dataclass(frozen=True, eq=False)
class SideRows:
    """Extra query rows a proposer attaches to one verify step (docs/verifier.md §10.1).

    The target scores them in the same forward as the tree, after the T tree rows; they are never accepted
    (the acceptance rules see the tree alone), and ``Target.commit`` drops their K/V with the rejected tree
    rows. Each side row sees the whole cached prefix, the tree rows and side rows its ``sees`` row names,
    and nothing else; tree rows never see side rows, so the tree's logits are those of a forward without
    them. Built for Jacobi-style lookahead branches (LADE, arXiv 2402.02057) but nothing here is specific
    to one method.
    """

    tokens: torch.Tensor   # int64 [S] token ids
    offsets: torch.Tensor  # int64 [S] positions relative to the root: position_ids = P + offsets (may repeat)
    sees: torch.Tensor     # bool [S, T + S]: side row i attends to tree row j (j < T) / side row j - T
    wanted: torch.Tensor   # int64 [K] side-row indices whose logits go back to the proposer, in this order

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def from_lists(tokens: Sequence[int], offsets: Sequence[int], tree_size: int,
                   sees_tree: Sequence[Sequence[int]], sees_side: Sequence[Sequence[int]],
                   wanted: Sequence[int], device: torch.device | str = "cpu") -> "SideRows":
        """Side rows from Python lists, in one copy to ``device``. ``sees_tree[i]``: the tree rows side row i
        attends to (e.g. ``[0]``, the root, which is not yet cached); ``sees_side[i]``: the other side rows it
        attends to (every side row sees itself). ``wanted``: the side rows whose logits the proposer reads."""
        S, T = len(tokens), int(tree_size)
        if not (len(offsets) == len(sees_tree) == len(sees_side) == S) or not 0 < len(wanted) <= S:
            raise ValueError("side rows need one offset and one visibility list per token, and 1..S wanted rows")
        for name, lists, bound in (("tree", sees_tree, T), ("side", sees_side, S), ("wanted", [wanted], S)):
            if any(not 0 <= int(j) < bound for row in lists for j in row):
                raise ValueError(f"a side row's {name} index lies outside 0..{bound - 1}")
        packed = np.full((S, 3 + T + S), -1, dtype=np.int64)
        packed[:, 0], packed[:, 1], packed[:len(wanted), 2] = tokens, offsets, wanted
        sees = packed[:, 3:]
        sees[:] = 0
        for i in range(S):
            sees[i, list(sees_tree[i])] = 1
            sees[i, [T + j for j in sees_side[i]] + [T + i]] = 1
        return SideRows._from_packed(torch.tensor(packed, device=device), len(wanted))

    @staticmethod
    def _from_packed(packed: torch.Tensor, n_wanted: int) -> "SideRows":
        """Views of ``packed`` [S, 3 + T + S]: tokens, offsets, wanted (first ``n_wanted`` rows), visibility."""
        rows = SideRows(packed[:, 0], packed[:, 1], packed[:, 3:].bool(), packed[:n_wanted, 2])
        rows.__dict__["_packed"] = packed
        return rows

    def to(self, device: torch.device | str) -> "SideRows":
        """These side rows on ``device`` (one copy); ``self`` when they are there already."""
        packed = self.__dict__.get("_packed")
        if packed is not None:
            moved = packed.to(device)
            return self if moved is packed else SideRows._from_packed(moved, int(self.wanted.shape[0]))
        moved = [t.to(device) for t in (self.tokens, self.offsets, self.sees, self.wanted)]
        if all(m is t for m, t in zip(moved, (self.tokens, self.offsets, self.sees, self.wanted))):
            return self
        return SideRows(*moved)


# Python-side buffers a moved tree keeps (``DraftTree.to``).
_HOST_BUFFERS = ("parent_list", "token_list", "depth_list", "children")


def _depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node of a parents list; refuses a list not in topological order."""
    depth = [0] * len(parents)
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}: the tree is not in topological order")
        depth[i] = depth[p] + 1
    return depth
