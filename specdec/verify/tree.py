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

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

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

    def __post_init__(self):
        if self.tokens.dim() != 1 or self.tokens.shape != self.parents.shape:
            raise ValueError("tokens and parents must be 1-D tensors of equal length")
        if self.kind not in KINDS:
            raise ValueError(f"unknown tree kind {self.kind!r}; expected one of {KINDS}")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def root_only(root: int, device: torch.device | str = "cpu") -> "DraftTree":
        """The empty draft: AR decoding is a loop of root-only trees."""
        return DraftTree(torch.tensor([root], device=device), torch.tensor([-1], device=device))

    @staticmethod
    def from_paths(root: int, paths: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                   max_nodes: Optional[int] = None) -> "DraftTree":
        """Merge token paths (each continuing the root) into a trie, in breadth-first order.

        Shared prefixes become one node; ``max_nodes`` (draft nodes, root excluded) keeps the
        first nodes in BFS order, which is ancestor-closed.
        """
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
        return DraftTree(
            torch.tensor([tokens[i] for i in order], dtype=torch.long, device=device),
            torch.tensor([-1 if i == 0 else new_index[parents[i]] for i in order],
                         dtype=torch.long, device=device))

    @staticmethod
    def chain(root: int, draft: Sequence[int], device: torch.device | str = "cpu") -> "DraftTree":
        """A single branch root -> draft[0] -> draft[1] -> ..."""
        n = len(draft)
        return DraftTree(torch.tensor([root, *map(int, draft)], dtype=torch.long, device=device),
                         torch.arange(-1, n, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ derived buffers
    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def depth(self) -> torch.Tensor:
        """int64 [T]: depth[0] = 0, depth[i] = depth[parents[i]] + 1."""
        depth = [0] * self.size
        for i, p in enumerate(self.parent_list[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: the tree is not in topological order")
            depth[i] = depth[p] + 1
        return torch.tensor(depth, dtype=torch.long, device=self.tokens.device)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """bool [T, T]: ancestors[i, j] is True iff j is i or an ancestor of i."""
        T = self.size
        anc = torch.eye(T, dtype=torch.bool)
        for i, p in enumerate(self.parent_list[1:], start=1):
            anc[i] |= anc[p]
        return anc.to(self.tokens.device)

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
