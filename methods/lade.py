"""LADE: Lookahead Decoding (Fu, Bailis, Stoica, Zhang, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding", ICML 2024, arXiv 2402.02057). Released code: hao-ai-lab/LookaheadDecoding @ eed010d
(``lade/decoding.py::jacobi_greedy_search_multilevel``, ``update_token_map``, ``fill_pool_with_prompt``,
``filter_window``; ``lade/models/modeling_llama.py::j_make_causal_mask_multilevel``) and Spec-Bench's fork
hemingkx/Spec-Bench @ fd2c1cd (``model/lade/decoding.py``, ``model/lade/models/llama.py``), restated here, not
copied. Design page: docs/lade.md. (Not Alipay's trie-based Lookahead: that is ``methods/lookahead.py``.)

    python run.py method=lade          # Spec-Bench's row: N = 5, W = 7, G = 7
    python run.py method=lade_cpu      # a CPU re-size: N = 4, W = 5, G = 5

Each verify forward carries two branches (docs/lade.md §2):
  * the **lookahead branch**: a 2-D Jacobi window of guessed tokens, N - 1 levels x W columns, attached as side
    rows (docs/verifier.md §10.1). Cell (l, j) sits at position P + l + j (the root at P is cell (0, 0)) and sees
    the cache, the root, level-0 cells 1..j and its own column at levels 1..l. After the forward the argmax at
    each top-level cell closes one N-gram per column (key = the level-0 token of that column); the N-grams go
    into the **pool**, and the window shifts up one level (the new top level = those argmaxes).
  * the **verification branch**: the pool's N-grams keyed by the root, verified as a deterministic tree.
Before the window is full, N - 2 **fill** steps grow it one level per step (no candidates are sent).

Decisions on what the paper and the release leave open (docs/lade.md §5 gives the evidence for each):
  * ``candidate_len: released`` (default): a candidate's first N - 2 tokens are drafts. The release compares a
    candidate's tokens with the target's argmaxes but its loop stops one short, so at most N - 2 drafts are
    credited and a step commits at most N - 1 tokens; the harness gets the same acceptance from a tree of the
    first N - 2 tokens plus its bonus. ``full``: all N - 1 tokens are drafts (at most N tokens per step; not
    the release).
  * ``layout: trie`` (default): the candidates merged into a trie (shared prefixes verified once: fewer rows,
    same greedy output, same sampling law). ``chains``: one chain per candidate, as the release lays them out
    (repeated prefixes kept; the verifier takes the deepest match, the first on ties); with ``released``
    each candidate's dropped last token rides along as an unread side row, so a step has the release's row
    count, W(N - 1) + G'(N - 1) (timing fidelity).
  * Window init: each level-0 cell is a token drawn uniformly from the prompt (the release's ``copy_from``),
    with a ``random.Random`` seeded per turn by ``Context.seed`` (``init_seed: null``) or by a fixed number
    (``init_seed: 10`` reproduces Spec-Bench's ``random.seed(10)`` per call draw for draw). Upstream leaves it
    unseeded.
  * The pool lives for one turn (``pool_lifetime: turn``: the release builds it per ``generate`` call), or
    for a question or the whole run. Each key holds at most G N-grams, least recently inserted first; a
    repeated N-gram moves to the end; all of a key's N-grams are verified, oldest first.
  * ``pool_from_prompt: false`` (Spec-Bench has no such option; upstream defaults to 0). ``true`` inserts
    every N-gram of the prompt before the first step and the N-gram ending at every committed token after
    each step: correctly, i.e. not upstream's version, which logs the last accepted token m + 1 times after
    an m-draft acceptance.
  * The window always slides by one column (the release asserts ``ALWAYS_FWD_ONE``), also after a multi-token
    acceptance, which leaves it behind the text; it is not realigned (as released).
  * The side rows' logits returned are the top level's only (the LM head runs on those W rows, not on all).
  * Sampling (``temperature > 0``): the tree is ``deterministic``, so the shared sample-and-follow rule
    verifies it (exact, docs/verifier.md §6); the release's own sampling loop is recursive rejection with
    q = 1, the same law. The window keeps using argmaxes, and, as the release's sampling loop does, a stop id
    in the new top level is replaced by a random prompt token (``filter_window``). Greedy never does this.
  * Drafts are cut to the tokens the turn can still commit (``ctx.remaining - 1``); output and MAT unchanged.
  * The harness prefills ``prompt[:-1]`` on its own, so LADE's first forward (prompt + level 0) is step 1
    here (root = the last prompt token): one token-less forward more per turn, the same verify steps.
"""

from __future__ import annotations

import random
from typing import Optional

from specdec.errors import SettingError
from specdec.running.prompts import stop_ids
from specdec.verify.decode import device_work
from specdec.verify.proposer import Context, MethodEnv, Proposer, StepResult, register, sizes_up_to
from specdec.verify.tree import DraftTree, SideRows

CANDIDATE_LENS = ("released", "full")
LAYOUTS = ("trie", "chains")
LIFETIMES = ("turn", "question", "run")


class NgramPool:
    """LADE's n-gram pool: key token -> at most ``cap`` continuations (tuples of N - 1 tokens), least recently
    inserted first (the release's ``token_map`` with ``GUESS_SET_SIZE`` = cap)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.map: dict[int, list[tuple[int, ...]]] = {}

    def insert(self, key: int, ngram: tuple[int, ...]) -> None:
        """Append ``ngram`` under ``key``; a present one moves to the end; past ``cap`` the oldest goes."""
        entries = self.map.setdefault(key, [])
        if ngram in entries:
            entries.remove(ngram)
        elif len(entries) >= self.cap:
            del entries[0]
        entries.append(ngram)

    def get(self, key: int) -> list[tuple[int, ...]]:
        return self.map.get(key, [])

    def clear(self) -> None:
        self.map.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self.map.values())


class Window:
    """The 2-D Jacobi window: ``levels[0]`` holds level 0 without the root (cells (0, 1), (0, 2), ...),
    ``levels[l]`` (l >= 1) cells (l, 0), (l, 1), ...; ``None`` for a level not yet filled."""

    def __init__(self, level: int, width: int, first: list[int]):
        self.n_levels = level - 1                     # N - 1 levels in steady state
        self.levels: list[Optional[list[int]]] = [list(first)] + [None] * (self.n_levels - 1)
        self.width = width

    @property
    def filled(self) -> int:
        """Levels present (1 .. N - 1)."""
        return sum(lvl is not None for lvl in self.levels)

    @property
    def steady(self) -> bool:
        return self.filled == self.n_levels

    def cells(self) -> list[tuple[int, int, int]]:
        """Every present cell except the root as (level, column, token), level by level."""
        out = [(0, j + 1, t) for j, t in enumerate(self.levels[0])]
        for lvl in range(1, self.filled):
            out += [(lvl, j, t) for j, t in enumerate(self.levels[lvl])]
        return out

    def fill(self, top: list[int]) -> None:
        """A fill step: the committed token replaces level 0's first guess, every level drops its first column,
        and the argmaxes at the top level's cells (its first one dropped past level 0) become a new level."""
        top_level = self.filled - 1
        for lvl in range(self.filled):
            self.levels[lvl] = self.levels[lvl][1:]
        self.levels[top_level + 1] = list(top) if top_level == 0 else list(top[1:])

    def harvest(self, root: int, top: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        """The N-grams a steady step closes, one per column: (key, continuation); column 0's key is the root."""
        keys = [root] + self.levels[0]
        return [(keys[j], tuple(self.levels[lvl][j] for lvl in range(1, self.n_levels)) + (top[j],))
                for j in range(self.width)]

    def shift(self, top: list[int]) -> None:
        """Slide by one column: level 0 <- level 1 without its first cell, level l <- level l + 1, top <- new."""
        self.levels[0] = self.levels[1][1:]
        for lvl in range(1, self.n_levels - 1):
            self.levels[lvl] = self.levels[lvl + 1]
        self.levels[-1] = list(top)


def window_rows(window: Window) -> tuple[list[int], list[int], list[list[int]], list[int]]:
    """The window as side-row lists: tokens, offsets (l + j), the side rows each cell sees besides the root and
    itself (level-0 cells 1..j, then its column at levels 1..l-1), and the top level's rows (the wanted ones)."""
    cells = window.cells()
    index = {(lvl, j): i for i, (lvl, j, _) in enumerate(cells)}
    sees = [[index[(0, k)] for k in range(1, j + 1) if (0, k) in index and (lvl, j) != (0, k)]
            + [index[(m, j)] for m in range(1, lvl)] for lvl, j, _ in cells]
    top = window.filled - 1
    wanted = [i for i, (lvl, _, _) in enumerate(cells) if lvl == top]
    return [t for _, _, t in cells], [lvl + j for lvl, j, _ in cells], sees, wanted


@register("lade")
class Lade(Proposer):
    """Lookahead Decoding: a Jacobi window in side rows feeds an n-gram pool; the pool's n-grams for the root are
    verified as a deterministic tree (module docstring)."""

    def __init__(self, env: MethodEnv, level: int = 5, window: int = 7, guess: int = 7,
                 candidate_len: str = "released", layout: str = "trie", init_seed: Optional[int] = None,
                 pool_from_prompt: bool = False, pool_lifetime: str = "turn"):
        super().__init__(env)
        if level < 3 or window < 1 or guess < 1:
            raise SettingError(f"need level >= 3, window >= 1, guess >= 1 (got {level}, {window}, {guess})")
        for name, value, allowed in (("candidate_len", candidate_len, CANDIDATE_LENS), ("layout", layout, LAYOUTS),
                                     ("pool_lifetime", pool_lifetime, LIFETIMES)):
            if value not in allowed:
                raise SettingError(f"{name} must be one of {allowed}, not {value!r}")
        self.level, self.width, self.guess = int(level), int(window), int(guess)
        self.candidate_len, self.layout, self.init_seed = candidate_len, layout, init_seed
        self.pool_from_prompt, self.pool_lifetime = bool(pool_from_prompt), pool_lifetime
        self.pool = NgramPool(self.guess)
        self.sampling = env.temperature > 0
        model_cfg = getattr(env.model, "generation_config", None)
        self.stop_ids = stop_ids(env.tokenizer, model_cfg) if env.tokenizer is not None else frozenset()
        self.window: Optional[Window] = None
        self.prompt: list[int] = []
        self.recent: list[int] = []
        self.rng = random.Random(0)
        self.reset_stats()

    # ------------------------------------------------------------------ lifetime
    def reset(self, scope: str) -> None:
        if LIFETIMES.index(scope) >= LIFETIMES.index(self.pool_lifetime):
            self.pool.clear()

    def begin(self, ctx: Context) -> None:
        """A new turn: a fresh window copied from the prompt; the pool per ``pool_lifetime``."""
        self.prompt = list(ctx.tokens)
        self.rng = random.Random(ctx.seed if self.init_seed is None else self.init_seed)
        first = [self.rng.choice(self.prompt) for _ in range(self.width + self.level - 3)]
        self.window = Window(self.level, self.width, first)
        self.recent = self.prompt[-(self.level - 1):]
        if self.pool_from_prompt:
            for i in range(len(self.prompt) - self.level + 1):
                self.pool.insert(self.prompt[i], tuple(self.prompt[i + 1:i + self.level]))

    # ------------------------------------------------------------------ drafting
    def candidates(self, root: int) -> list[tuple[int, ...]]:
        """The pool's n-grams for ``root``, oldest first; none until the window is full (as released)."""
        if not self.window.steady:
            return []
        return self.pool.get(root)

    def propose(self, ctx: Context) -> DraftTree:
        room = max(ctx.remaining - 1, 0)
        n_drafts = self.level - (2 if self.candidate_len == "released" else 1)
        ngrams = self.candidates(ctx.root)
        drafts = [list(g[:min(n_drafts, room)]) for g in ngrams if room > 0]
        tokens, offsets, sees, wanted = window_rows(self.window)
        if self.layout == "trie":
            tree_tokens, parents = DraftTree.trie_lists(ctx.root, drafts)
            tails = []
        else:
            tree_tokens, parents, tails = self._chains(ctx.root, ngrams, drafts)
        side = SideRows.from_lists(tokens + [t for t, _, _ in tails], offsets + [o for _, o, _ in tails],
                                   len(tree_tokens), [[0]] * len(tokens) + [chain for _, _, chain in tails],
                                   sees + [[] for _ in tails], wanted, self.env.device)
        self.steps += 1
        self.candidate_count += len(drafts)
        self.side_row_count += side.size
        return DraftTree.from_lists(tree_tokens, parents, self.env.device, side=side)

    def _chains(self, root: int, ngrams: list[tuple[int, ...]], drafts: list[list[int]]):
        """One chain per candidate (repeats kept) and, in ``released`` mode, each candidate's dropped last token
        as an unread side row seeing the root and its chain: (tokens, parents, [(token, offset, tree rows seen)])."""
        tokens, parents, tails = [root], [-1], []
        for ngram, draft in zip(ngrams, drafts):
            chain = [0]
            for tok in draft:
                parents.append(chain[-1])
                chain.append(len(tokens))
                tokens.append(tok)
            if self.candidate_len == "released" and len(draft) == len(ngram) - 1:
                tails.append((ngram[-1], len(draft) + 1, chain))
        return tokens, parents, tails

    # ------------------------------------------------------------------ learning
    def observe(self, step: StepResult) -> None:
        with device_work():  # the argmax over the top level's logits runs on the target's device
            top = step.side_logits.argmax(-1).tolist()
        window = self.window
        if not window.steady:
            window.fill(top)
            self.fill_steps += 1
        else:
            for key, ngram in window.harvest(step.tree.token_list[0], top):
                self.pool.insert(key, ngram)
            window.shift(top)
            if self.sampling and self.stop_ids:  # the release's filter_window (its sampling loop only)
                window.levels[-1] = [self.rng.choice(self.prompt) if t in self.stop_ids else t
                                     for t in window.levels[-1]]
        if self.pool_from_prompt:
            for tok in step.committed:
                self.recent.append(tok)
                if len(self.recent) >= self.level:
                    self.pool.insert(self.recent[-self.level], tuple(self.recent[-self.level + 1:]))
            self.recent = self.recent[-(self.level - 1):]

    # ------------------------------------------------------------------ reporting
    def tree_sizes(self) -> tuple[int, ...]:
        steady_window = self.width * (self.level - 1) - 1
        return sizes_up_to(1 + steady_window + self.guess * (self.level - 1))

    def reset_stats(self) -> None:
        self.steps = self.fill_steps = self.candidate_count = self.side_row_count = 0

    def stats(self) -> dict:
        steps = max(self.steps, 1)
        return {"level": self.level, "window": self.width, "guess": self.guess,
                "candidate_len": self.candidate_len, "layout": self.layout, "pool_lifetime": self.pool_lifetime,
                "pool_from_prompt": self.pool_from_prompt, "fill_steps": self.fill_steps,
                "candidates_per_step": round(self.candidate_count / steps, 3),
                "side_rows_per_step": round(self.side_row_count / steps, 3), "pool_ngrams": len(self.pool)}
