"""From sentences to padded batches.

An :class:`Example` keeps only compact per-sentence data (token ids, positive label cells or tag
ids); dense grids are built once per batch with vectorised scatter ops in :func:`collate`.
Batches are formed by a grid-cell budget (B * N^2) over length-sorted order, so short sentences
share big batches and one long sentence does not pad a whole batch to N^2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from crener.data.features import char_mask, grid_mask

if TYPE_CHECKING:
    from crener.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One (possibly split) sentence, ready to batch.

    ``targets`` is what the task trains on: (k, 3) positive cells (i, j, label) for grid tasks,
    (n,) tag ids for sequence tasks.
    """

    index: int  # position in the list of examples (chunk order)
    token_ids: np.ndarray  # (n + 2,) int64: [CLS] chars [SEP]
    targets: np.ndarray
    n: int


@dataclass
class Batch:
    """A padded batch. Shapes: B sentences, N = longest sentence (characters)."""

    input_ids: torch.Tensor  # (B, N + 2) long
    attention_mask: torch.Tensor  # (B, N + 2) long
    lengths: torch.Tensor  # (B,) long, characters per sentence
    targets: torch.Tensor | None  # task-specific, e.g. (B, N, N, L) bool grid
    indices: list[int] = field(default_factory=list)  # Example.index of each row
    char_mask: torch.Tensor = field(init=False)  # (B, N) bool
    grid_mask: torch.Tensor = field(init=False)  # (B, N, N) bool

    def __post_init__(self) -> None:
        self.char_mask = char_mask(self.lengths)
        self.grid_mask = grid_mask(self.lengths)

    @property
    def n(self) -> int:
        return int(self.char_mask.size(1))

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory, so ``to(cuda)`` runs asynchronously (non_blocking
        from pageable memory is a synchronous copy)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, fn) -> Batch:  # noqa: ANN001 - Tensor -> Tensor
        """A copy with ``fn`` applied to every tensor (masks kept, not rebuilt)."""
        out = Batch.__new__(Batch)
        for name in ("input_ids", "attention_mask", "lengths", "char_mask", "grid_mask"):
            setattr(out, name, fn(getattr(self, name)))
        out.targets = None if self.targets is None else fn(self.targets)
        out.indices = self.indices
        return out


def collate(examples: Sequence[Example], target: str, num_labels: int, pad_id: int = 0) -> Batch:
    """Pad a list of examples. ``target``: "grid" (multi-label bool), "classes" (argmax ids,
    0 = none, label + 1 otherwise) or "tags" (per-character ids, -100 on padding).
    """
    b = len(examples)
    lengths = torch.tensor([e.n for e in examples], dtype=torch.long)
    n = int(lengths.max())
    input_ids = torch.full((b, n + 2), pad_id, dtype=torch.long)
    attention = torch.zeros((b, n + 2), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : e.n + 2] = torch.from_numpy(e.token_ids)
        attention[row, : e.n + 2] = 1
    targets: torch.Tensor | None = None
    if target in ("grid", "classes"):
        rows = np.concatenate([np.full(len(e.targets), r, dtype=np.int64) for r, e in enumerate(examples)])
        cells = torch.from_numpy(
            np.concatenate([e.targets for e in examples]).astype(np.int64).reshape(-1, 3)
        )
        bi = torch.from_numpy(rows)
        if target == "grid":
            targets = torch.zeros((b, n, n, num_labels), dtype=torch.bool)
            targets[bi, cells[:, 0], cells[:, 1], cells[:, 2]] = True
        else:
            # Cells were reduced to one label per (i, j) when featurised, so no write collides.
            targets = torch.zeros((b, n, n), dtype=torch.long)
            targets[bi, cells[:, 0], cells[:, 1]] = cells[:, 2] + 1
    elif target == "tags":
        targets = torch.full((b, n), -100, dtype=torch.long)
        for row, e in enumerate(examples):
            targets[row, : e.n] = torch.from_numpy(e.targets.astype(np.int64))
    elif target != "none":
        raise ValueError(f"unknown target kind {target!r}")
    return Batch(input_ids, attention, lengths, targets, [e.index for e in examples])


def make_batches(
    lengths: Sequence[int],
    *,
    max_cells: int = 0,
    batch_size: int = 12,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    sorted_fixed: bool = False,
) -> list[list[int]]:
    """Group example positions into batches.

    ``sorted_fixed``: the paper's recipe, ``batch_size`` sentences a batch from length-sorted
    order (random jitter inside equal lengths when shuffling), batches shuffled; ``max_cells > 0``
    is then only a memory guard: a batch above it is split into the fewest length-sorted pieces
    within it (logged). Otherwise ``max_cells > 0``: fill each batch from length-sorted order while
    B * N_max^2 <= max_cells, then shuffle the batches (buckets, not sentences, are shuffled); a
    sentence whose own grid exceeds the budget gets a batch alone. ``max_cells == 0``: W2NER's
    fixed-size batches, shuffled sentence order when ``shuffle``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    if shuffle and rng is None:
        raise ValueError("shuffle needs an rng")
    if max_cells <= 0 and not sorted_fixed:
        order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
        return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if shuffle:
        order = np.lexsort((rng.random(len(lengths)), lengths)).tolist()
    else:
        order = np.argsort(lengths, kind="stable").tolist()
    if sorted_fixed:
        batches, split = [], 0
        for i in range(0, len(order), batch_size):
            bucket = order[i : i + batch_size]
            if max_cells > 0 and len(bucket) * int(lengths[bucket[-1]]) ** 2 > max_cells:
                pieces = _fill(bucket, lengths, max_cells)
                split += 1
                batches += pieces
            else:
                batches.append(bucket)
        if split:
            log.info("%d of %d batches of %d sentences were split to stay within the %d-cell memory guard "
                     "(train.max_cells)", split, -(-len(order) // batch_size), batch_size, max_cells)  # fmt: skip
    else:
        batches = _fill(order, lengths, max_cells)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def batch_cells(batch: Sequence[int], lengths: Sequence[int]) -> int:
    """B * N_max^2: the grid cells a batch of these example positions pads to."""
    return len(batch) * max(int(lengths[i]) for i in batch) ** 2


def training_batches(lengths: Sequence[int], train: TrainConfig, rng: np.random.Generator) -> list[list[int]]:
    """One epoch's shuffled training batches as ``train`` (``cfg.train``) asks for them."""
    return make_batches(lengths, max_cells=train.max_cells, batch_size=train.batch_size, shuffle=True, rng=rng,
                        sorted_fixed=train.sorted_batches)  # fmt: skip


def _fill(order: list[int], lengths: np.ndarray, max_cells: int) -> list[list[int]]:
    """Consecutive batches of length-sorted ``order``, each while B * N_max^2 <= ``max_cells``."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for pos in order:
        n = int(lengths[pos])
        m = max(longest, n)
        if current and (len(current) + 1) * m * m > max_cells:
            batches.append(current)
            current, m = [], n
        current.append(pos)
        longest = m
    if current:
        batches.append(current)
    return batches
