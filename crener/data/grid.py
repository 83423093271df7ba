"""The grid labelling scheme: entities -> positive grid cells -> entities (method.md §1).

Everything here is pure numpy and works on *sparse* cells: an ``int32`` array of shape (k, 3)
whose rows are ``(i, j, label)`` = "label is present at grid cell (row i, column j)". The model
side turns scores into cells with ``nonzero(scores > 0)`` (:func:`split_cells` cuts a batched
``(k, 4)`` array per sentence), so decoding costs grow with the number of positive cells, not n².

Label layouts (index = position in ``LabelSet.names``; M = number of entity types, in the order
given to :meth:`LabelSet.build`):

``crener`` / ``ht_typed="both"`` (2 + 2M labels, the default)::

    0 NNC | 1 PNC | 2 .. 2+M-1 THC-τ | 2+M .. 2+2M-1 HTC-τ

``crener`` / ``ht_typed="thc_only"`` (3 + M labels; HTC untyped)::

    0 NNC | 1 PNC | 2 HTC | 3 .. 3+M-1 THC-τ

``w2ner`` (1 + M labels)::

    0 NNW | 1 .. M THW-τ

    Single-label CE training uses class id = label index + 1 and class 0 = none
    (:meth:`LabelSet.to_classes`), i.e. W2NER's 0 = none/pad, 1 = NNW, 2.. = types.

``ht_only`` (secondary ablation, no linking tags; 2M labels, or 1 + M with ``thc_only``)::

    0 .. M-1 THC-τ | M .. 2M-1 HTC-τ        (thc_only: 0 HTC | 1 .. M THC-τ)

    A candidate (h, t, τ) decodes to the contiguous span h..t.

Cells of one entity with ordered indices a_1 < ... < a_k, head h = a_1, tail t = a_k (§1.1):
NNC at (a_m, a_{m+1}); PNC at (a_{m+1}, a_m); THC-τ at (t, h); HTC-τ at (h, t). A one-character
entity puts THC-τ and HTC-τ on the diagonal cell (h, h). Nested or overlapping entities give the
union of their cells. W2NER: NNW where NNC is, THW-τ where THC-τ is.

What round-trips (``decode(n, encode(E)) == E``): every set of *contiguous* entities, nested,
overlapping, adjacent or one-character, in every scheme (contiguous entities only produce edges
m -> m+1, so the path from h to t is unique). Same span with two types is fine in the multi-label
cells, but not in W2NER's single-label classes (:meth:`LabelSet.to_classes` keeps one type).
Non-contiguous entities always decode to a *superset* of the gold set: linking tags are untyped
and shared, so two entities that share head and tail with different paths or types, or whose
paths cross at an inner node, combine into spurious paths (e.g. (0, 1, 3) and (1, 2, 3) also
give (0, 1, 2, 3) and (1, 3)); this holds for CRENER and W2NER alike. ``ht_only`` decodes every
entity as its contiguous hull.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from crener.data.schema import Entity

SCHEMES = ("crener", "w2ner", "ht_only")
HT_TYPED = ("both", "thc_only")
HT_MODES = ("union", "intersect", "thc_only")
LINK_MODES = ("and", "nnc_only", "or")

# Tag kinds (one per label, see LabelSet.kind_ids). W2NER's NNW plays NNC's role and THW plays THC's.
NNC, PNC, THC, HTC = 0, 1, 2, 3
UNTYPED = -1  # type id of a label that carries no entity type (NNC, PNC, untyped HTC, NNW)
NONE_CLASS = 0  # single-label class of a cell with no label (W2NER's none/pad)
CLASS_OFFSET = 1  # single-label class id = label index + CLASS_OFFSET
DEFAULT_MAX_PATHS = 1000  # method.md §1.2: cap on paths per head-tail candidate

_CELL_DTYPE = np.int32


@dataclass(frozen=True)
class LabelSet:
    """The labels of one tag scheme over a fixed, ordered list of entity types.

    Build with :meth:`LabelSet.build`; the index helpers (:attr:`nnc`, :meth:`thc`, ...) are the
    only place label ids are computed, so no caller hard-codes the layout of the module docstring.
    """

    scheme: str
    types: tuple[str, ...]
    ht_typed: str = "both"  # ignored by the w2ner scheme (THW is always typed, there is no HTC)

    @classmethod
    def build(cls, scheme: str, types: Sequence[str], ht_typed: str = "both") -> LabelSet:
        types = tuple(types)
        if scheme not in SCHEMES:
            raise ValueError(f"tag scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
        if ht_typed not in HT_TYPED:
            raise ValueError(f"ht_typed {ht_typed!r} is not one of {', '.join(HT_TYPED)}")
        if not types:
            raise ValueError("a label set needs at least one entity type")
        if len(set(types)) != len(types) or not all(isinstance(t, str) and t for t in types):
            raise ValueError(f"entity types must be distinct non-empty strings: {types}")
        return cls(scheme, types, ht_typed)

    # --- layout -------------------------------------------------------------------------------

    @cached_property
    def _layout(self) -> tuple[tuple[str, int, int], ...]:
        """(name, kind, type id) per label, in index order."""
        m = range(len(self.types))
        thc = [(f"THC-{self.types[k]}", THC, k) for k in m]
        htc = [(f"HTC-{self.types[k]}", HTC, k) for k in m]
        untyped_htc = [("HTC", HTC, UNTYPED)]
        if self.scheme == "w2ner":
            return (("NNW", NNC, UNTYPED), *[(f"THW-{self.types[k]}", THC, k) for k in m])
        links = [("NNC", NNC, UNTYPED), ("PNC", PNC, UNTYPED)] if self.scheme == "crener" else []
        if self.ht_typed == "both":
            return (*links, *thc, *htc)
        return (*links, *untyped_htc, *thc)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self._layout)

    @property
    def num_labels(self) -> int:
        return len(self._layout)

    @cached_property
    def kind_ids(self) -> np.ndarray:
        """(L,) tag kind of every label: NNC, PNC, THC or HTC (NNW counts as NNC, THW as THC)."""
        return np.array([kind for _, kind, _ in self._layout], dtype=np.int64)

    @cached_property
    def type_ids(self) -> np.ndarray:
        """(L,) index into :attr:`types` of every label, UNTYPED (-1) for untyped labels."""
        return np.array([tid for _, _, tid in self._layout], dtype=np.int64)

    @cached_property
    def _index(self) -> dict[tuple[int, int], int]:
        return {(kind, tid): idx for idx, (_, kind, tid) in enumerate(self._layout)}

    @cached_property
    def _type_id(self) -> dict[str, int]:
        return {t: k for k, t in enumerate(self.types)}

    def type_id(self, type: str) -> int:
        try:
            return self._type_id[type]
        except KeyError:
            raise ValueError(f"unknown entity type {type!r}; label set has {self.types}") from None

    def _lookup(self, kind: int, tid: int, what: str) -> int:
        try:
            return self._index[(kind, tid)]
        except KeyError:
            raise KeyError(f"scheme {self.scheme!r} (ht_typed={self.ht_typed}) has no {what} label") from None

    @property
    def nnc(self) -> int:
        """NNC index (crener scheme)."""
        if self.scheme != "crener":
            raise KeyError(f"scheme {self.scheme!r} has no NNC label")
        return self._lookup(NNC, UNTYPED, "NNC")

    @property
    def pnc(self) -> int:
        """PNC index (crener scheme)."""
        return self._lookup(PNC, UNTYPED, "PNC")

    @property
    def nnw(self) -> int:
        """NNW index (w2ner scheme)."""
        if self.scheme != "w2ner":
            raise KeyError(f"scheme {self.scheme!r} has no NNW label")
        return self._lookup(NNC, UNTYPED, "NNW")

    def thc(self, type: str) -> int:
        """THC-τ index (crener, ht_only)."""
        if self.scheme == "w2ner":
            raise KeyError("scheme 'w2ner' has THW, not THC: use thw(type)")
        return self._lookup(THC, self.type_id(type), "THC")

    def thw(self, type: str) -> int:
        """THW-τ index (w2ner)."""
        if self.scheme != "w2ner":
            raise KeyError(f"scheme {self.scheme!r} has no THW label")
        return self._lookup(THC, self.type_id(type), "THW")

    def htc(self, type: str | None = None) -> int:
        """HTC-τ index; with ``ht_typed="thc_only"`` the one untyped HTC (``type`` is ignored)."""
        if self.ht_typed == "thc_only" and self.scheme != "w2ner":
            return self._lookup(HTC, UNTYPED, "HTC")
        if type is None:
            raise ValueError("typed HTC needs an entity type")
        return self._lookup(HTC, self.type_id(type), "HTC")

    # --- encoding -----------------------------------------------------------------------------

    def encode(self, entities: Iterable[Entity], n: int | None = None) -> np.ndarray:
        """Positive cells of the gold grid: int32 (k, 3) rows (i, j, label), unique and sorted.

        ``n`` (sentence length), when given, is checked against the entity indices. Cost is
        linear in the number of cells the entities produce (never n²); a Python set per
        sentence is ~7x faster than per-entity numpy calls at these sizes (a few entities of a
        few characters), where numpy's per-call overhead dominates.
        """
        nnc, pnc, thc_by, htc_by = self._encode_ids
        rows: set[tuple[int, int, int]] = set()
        hi = -1
        for e in entities:
            idx = e.indices
            h, t, k = idx[0], idx[-1], self.type_id(e.type)
            if h < 0:
                raise ValueError(f"negative entity index: {e}")
            hi = max(hi, t)
            if nnc is not None:
                for a, b in zip(idx, idx[1:]):
                    rows.add((a, b, nnc))
                    if pnc is not None:
                        rows.add((b, a, pnc))
            rows.add((t, h, thc_by[k]))
            if htc_by is not None:
                rows.add((h, t, htc_by[k]))
        if n is not None and hi >= n:
            raise ValueError(f"entity index {hi} out of range for a sentence of length {n}")
        if not rows:
            return np.empty((0, 3), dtype=_CELL_DTYPE)
        return np.array(sorted(rows), dtype=_CELL_DTYPE)

    @cached_property
    def _encode_ids(self) -> tuple[int | None, int | None, list[int], list[int] | None]:
        """(NNC/NNW, PNC, THC/THW per type id, HTC per type id) label ids; None where absent."""
        m = range(len(self.types))
        nnc = self._index.get((NNC, UNTYPED))
        pnc = self._index.get((PNC, UNTYPED))
        thc = [self._index[(THC, k)] for k in m]
        if self.scheme == "w2ner":
            htc = None
        elif self.ht_typed == "both":
            htc = [self._index[(HTC, k)] for k in m]
        else:
            htc = [self._index[(HTC, UNTYPED)]] * len(self.types)
        return nnc, pnc, thc, htc

    def dense(self, n: int, cells: np.ndarray) -> np.ndarray:
        """Boolean grid (n, n, L) with the given cells set (cells outside n are an error)."""
        cells = _as_cells(cells)
        out = np.zeros((n, n, self.num_labels), dtype=bool)
        out[cells[:, 0], cells[:, 1], cells[:, 2]] = True
        return out

    @staticmethod
    def cells_of(grid: np.ndarray) -> np.ndarray:
        """Same as the module function :func:`cells_of`."""
        return cells_of(grid)

    # --- single-label classes (W2NER's CE training) -------------------------------------------

    def to_classes(self, n: int, cells: np.ndarray) -> np.ndarray:
        """int64 (n, n) class grid: 0 = none, label index + 1 otherwise (w2ner scheme only).

        Collision rule: NNW lies above the diagonal and THW on or below it, so the only cells
        with two labels are one span with several types; the type that comes *later* in
        :attr:`types` wins. :meth:`count_class_collisions` says how many labels were dropped.
        """
        self._require_w2ner("to_classes")
        cells = _as_cells(cells)
        out = np.zeros((n, n), dtype=np.int64)
        # Cells are sorted by (i, j, label), and numpy assigns repeated indices in order, but
        # we do not rely on that: keep the last (highest) label of every (i, j) explicitly.
        last = last_of_each_cell(cells)
        out[cells[last, 0], cells[last, 1]] = cells[last, 2].astype(np.int64) + CLASS_OFFSET
        return out

    def count_class_collisions(self, cells: np.ndarray) -> int:
        """Labels that :meth:`to_classes` drops (cells holding k labels count k - 1)."""
        cells = _as_cells(cells)
        return int(cells.shape[0] - last_of_each_cell(cells).size)

    def from_classes(self, class_grid: np.ndarray, n: int) -> np.ndarray:
        """Cells of a single-label class grid (e.g. an argmax), restricted to the first n rows/cols."""
        self._require_w2ner("from_classes")
        grid = np.asarray(class_grid)[:n, :n]
        if grid.size and (grid.min() < NONE_CLASS or grid.max() >= self.num_labels + CLASS_OFFSET):
            raise ValueError(f"class ids must lie in [0, {self.num_labels + CLASS_OFFSET})")
        i, j = np.nonzero(grid != NONE_CLASS)
        lab = grid[i, j] - CLASS_OFFSET
        return np.stack([i, j, lab], axis=1).astype(_CELL_DTYPE).reshape(-1, 3)

    def _require_w2ner(self, what: str) -> None:
        if self.scheme != "w2ner":
            raise ValueError(f"{what} is for the single-label w2ner scheme, not {self.scheme!r}")

    # --- decoding -----------------------------------------------------------------------------

    def decode(
        self,
        n: int,
        cells: np.ndarray,
        *,
        ht_mode: str = "union",
        link_mode: str = "and",
        contiguous_only: bool = False,
        max_paths: int = DEFAULT_MAX_PATHS,
        max_entities: int | None = None,
    ) -> set[Entity]:
        """Entities of one sentence from its POSITIVE cells (score > 0), method.md §1.2.

        ``max_entities`` bounds the whole sentence (``max_paths`` bounds one head-tail pair):
        near-random scores early in training can make millions of paths in a single sentence,
        so evaluation callers cap it; the decoding stops once that many entities are out.

        Cells with i or j >= n (padding) are ignored, and so are NNC/PNC on or on the wrong side
        of the diagonal and THC (HTC) above (below) it. The w2ner scheme ignores ``link_mode``
        (its edges are NNW alone) and ``ht_mode`` (its candidates are THW alone). ``max_paths``
        caps the paths of one head-tail pair (shared by all its types).
        """
        if ht_mode not in HT_MODES:
            raise ValueError(f"ht_mode {ht_mode!r} is not one of {', '.join(HT_MODES)}")
        if link_mode not in LINK_MODES:
            raise ValueError(f"link_mode {link_mode!r} is not one of {', '.join(LINK_MODES)}")
        if max_paths < 1:
            raise ValueError("max_paths must be >= 1")
        cells = _as_cells(cells)
        if cells.size and cells[:, 2].max() >= self.num_labels:
            raise ValueError(f"label id {int(cells[:, 2].max())} >= num_labels {self.num_labels}")

        # One pass over the positive cells: linear in their number, never in n².
        kinds, tids = self._kinds_types
        nnc: set[tuple[int, int]] = set()  # edges m -> k, m < k
        pnc: set[tuple[int, int]] = set()  # edges m -> k read from PNC at (k, m)
        thc: set[tuple[int, int, int]] = set()  # (h, t, τ)
        htc: set[tuple[int, int, int]] = set()  # (h, t, τ)
        htc_untyped: set[tuple[int, int]] = set()  # (h, t)
        for i, j, lab in cells.tolist():
            if i >= n or j >= n:
                continue
            kind = kinds[lab]
            if kind == NNC:
                if i < j:
                    nnc.add((i, j))
            elif kind == PNC:
                if i > j:
                    pnc.add((j, i))
            elif kind == THC:
                if i >= j:
                    thc.add((j, i, tids[lab]))
            elif i <= j:
                if tids[lab] == UNTYPED:
                    htc_untyped.add((i, j))
                else:
                    htc.add((i, j, tids[lab]))

        if self.scheme == "w2ner" or ht_mode == "thc_only":
            cands = thc
        elif ht_mode == "union":
            cands = thc | htc  # an untyped HTC alone cannot be typed: dropped
        elif self.ht_typed == "both":
            cands = thc & htc
        else:  # intersect with an untyped HTC: THC-τ at (t, h) whose transposed cell has HTC
            cands = {c for c in thc if (c[0], c[1]) in htc_untyped}
        if not cands:
            return set()
        if self.scheme == "ht_only":
            return {Entity(tuple(range(h, t + 1)), self.types[k]) for h, t, k in cands}

        if self.scheme == "w2ner" or link_mode == "nnc_only":
            edges = nnc
        else:
            edges = nnc & pnc if link_mode == "and" else nnc | pnc
        succ = [0] * n  # bit k of succ[m] set iff k is a successor of m
        for m, k in edges:
            if not contiguous_only or k == m + 1:
                succ[m] |= 1 << k
        reach = _reachable(succ)

        pairs: dict[tuple[int, int], list[int]] = {}
        for h, t, k in cands:
            pairs.setdefault((h, t), []).append(k)
        out: set[Entity] = set()
        towards: dict[int, int] = {}  # tail -> bitmask of the nodes that can reach it, plus the tail
        for (h, t), tys in sorted(pairs.items()):
            if max_entities is not None and len(out) >= max_entities:
                break
            if h == t:
                paths: list[tuple[int, ...]] = [(h,)]
            elif not (reach[h] >> t) & 1:
                continue
            else:
                if t not in towards:
                    towards[t] = (1 << t) | sum(1 << k for k in range(t) if (reach[k] >> t) & 1)
                paths = _paths(h, t, succ, towards[t], max_paths)
            out.update(Entity(p, self.types[k]) for p in paths for k in tys)
        return out

    @cached_property
    def _kinds_types(self) -> tuple[list[int], list[int]]:
        return self.kind_ids.tolist(), self.type_ids.tolist()

    def decode_batch(
        self, lengths: Sequence[int], cells_per_sentence: Sequence[np.ndarray], **flags
    ) -> list[set[Entity]]:
        """:meth:`decode` per sentence; ``flags`` are decode's keyword arguments."""
        if len(lengths) != len(cells_per_sentence):
            raise ValueError(f"{len(lengths)} lengths but {len(cells_per_sentence)} cell arrays")
        return [self.decode(int(n), c, **flags) for n, c in zip(lengths, cells_per_sentence)]


def cells_of(grid: np.ndarray) -> np.ndarray:
    """Cells (k, 3) of a boolean grid (n, n, L), sorted by (i, j, label)."""
    grid = np.asarray(grid)
    if grid.ndim != 3:
        raise ValueError(f"expected an (n, n, L) grid, got shape {grid.shape}")
    return np.argwhere(grid).astype(_CELL_DTYPE).reshape(-1, 3)


def split_cells(batch_cells: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split batched cells (k, 4) rows (b, i, j, label) into ``batch_size`` (k_b, 3) arrays."""
    rows = np.asarray(batch_cells).reshape(-1, 4)
    order = np.argsort(rows[:, 0], kind="stable")
    rows = rows[order]
    bounds = np.searchsorted(rows[:, 0], np.arange(batch_size + 1))
    return [rows[bounds[b] : bounds[b + 1], 1:].astype(_CELL_DTYPE) for b in range(batch_size)]


def _as_cells(cells: np.ndarray) -> np.ndarray:
    cells = np.asarray(cells)
    if cells.size == 0:
        return np.empty((0, 3), dtype=_CELL_DTYPE)
    if cells.ndim != 2 or cells.shape[1] != 3:
        raise ValueError(f"cells must have shape (k, 3), got {cells.shape}")
    if not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"cells must be integers, got {cells.dtype}")
    if cells.min() < 0:
        raise ValueError("cells must be non-negative")
    return cells


def last_of_each_cell(cells: np.ndarray) -> np.ndarray:
    """Row index of the highest label of every distinct (i, j) in ``cells`` (any order)."""
    if cells.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((cells[:, 2], cells[:, 1], cells[:, 0]))
    s = cells[order]
    is_last = np.ones(s.shape[0], dtype=bool)
    is_last[:-1] = (s[1:, 0] != s[:-1, 0]) | (s[1:, 1] != s[:-1, 1])
    return order[is_last]


def _reachable(succ: list[int]) -> list[int]:
    """reach[m] = bitmask of nodes reachable from m in one or more steps.

    Edges go strictly rightwards, so one right-to-left sweep gives the transitive closure: this
    answers "can k reach t?" for every tail at once (the backward reachability pass of §1.2).
    """
    reach = [0] * len(succ)
    for m in range(len(succ) - 1, -1, -1):
        r = x = succ[m]
        while x:
            low = x & -x
            r |= reach[low.bit_length() - 1]
            x ^= low
        reach[m] = r
    return reach


def _paths(h: int, t: int, succ: list[int], towards: int, max_paths: int) -> list[tuple[int, ...]]:
    """Up to ``max_paths`` paths h -> t, depth first (smaller successors first).

    Only nodes in ``towards`` (those that can reach t, plus t) are entered, so every branch ends
    in at least one path and the work is bounded by the cap, not by dead-end prefixes.
    """
    found: list[tuple[int, ...]] = []
    stack: list[tuple[int, tuple[int, ...]]] = [(h, (h,))]
    while stack:
        m, path = stack.pop()
        x = succ[m] & towards
        nxt: list[int] = []
        while x:
            low = x & -x
            nxt.append(low.bit_length() - 1)
            x ^= low
        for k in reversed(nxt):  # pushed high to low, so popped low to high
            if k == t:
                continue
            stack.append((k, path + (k,)))
        if nxt and nxt[-1] == t:
            # t is the largest allowed successor (all others are < t): it sorts last among
            # m's children, but a finished path is emitted as soon as it is seen.
            found.append(path + (t,))
            if len(found) >= max_paths:
                break
    return found
