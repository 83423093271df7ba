"""A task ties a label scheme to its training targets, loss and decoding.

``fit`` only talks to this interface, so grid models (CRENER, W2NER) and sequence-labelling
baselines share one training loop. Grid tasks live here; sequence tasks in ``baselines/``. Each
model family names its task builder in :mod:`crener.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from crener.config import ModelConfig
from crener.data.batching import Batch
from crener.data.grid import LabelSet, last_of_each_cell, split_cells
from crener.data.schema import Entity
from crener.loss import GridLoss

MAX_ENTITIES_PER_CHAR = 20
MAX_CELLS_PER_CHAR = 40


class Task(Protocol):
    target: str  # collate target kind: "grid" | "classes" | "tags"
    num_labels: int
    names: tuple[str, ...]

    def featurize(self, entities: Sequence[Entity], n: int) -> np.ndarray: ...

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]: ...

    def decode(self, outputs: dict[str, torch.Tensor], batch: Batch) -> list[set[Entity]]: ...


class GridTask:
    """CRENER's four-tag or W2NER's two-tag grid, trained multi-label (ZLPR) or with CE."""

    def __init__(self, cfg: ModelConfig, types: Sequence[str]):
        self.cfg = cfg
        scheme = cfg.tag_scheme
        self.labels = LabelSet.build(scheme, types, ht_typed=cfg.ht_typed)
        self.target = "classes" if cfg.loss == "ce" else "grid"
        self.num_labels = self.labels.num_labels + (1 if self.target == "classes" else 0)
        self.names = (("none",) if self.target == "classes" else ()) + tuple(self.labels.names)
        self.criterion = GridLoss(cfg.loss)
        self.collisions = 0  # cells where single-label CE had to drop a label (reported)
        self._decode_flags = dict(
            ht_mode=cfg.ht_mode,
            link_mode=cfg.link_mode,
            contiguous_only=cfg.contiguous_only,
            max_paths=cfg.max_paths,
        )

    def featurize(self, entities: Sequence[Entity], n: int) -> np.ndarray:
        cells = self.labels.encode(entities, n)
        if self.target == "classes" and len(cells):
            # One class per cell, by LabelSet's documented collision rule; count what is lost.
            self.collisions += self.labels.count_class_collisions(cells)
            cells = cells[last_of_each_cell(cells)]
        return cells

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return self.criterion(outputs["logits"], batch.targets, batch.grid_mask)

    def output_prior(self, targets: Sequence[np.ndarray], lengths: Sequence[int]) -> torch.Tensor:
        """Per output, the score a model should start from given the training grids' label frequencies.

        The loss averages over every valid cell (n^2 a sentence), so frequencies are taken over the
        same cells. ZLPR thresholds each label at 0: its start is the label's log-odds log p / (1 - p).
        Cross-entropy over classes (``none`` first): the log prior log p, whose softmax is p itself.
        A label never seen in training counts as half a cell, so no score starts at minus infinity."""
        cells = float(sum(n * n for n in lengths))
        counts = np.zeros(self.labels.num_labels, dtype=np.float64)
        for t in targets:
            if len(t):
                counts += np.bincount(np.asarray(t)[:, 2], minlength=self.labels.num_labels)
        counts = np.maximum(counts, 0.5)
        if self.target == "classes":
            full = np.concatenate([[max(cells - counts.sum(), 0.5)], counts])
            return torch.from_numpy(np.log(full / full.sum())).float()
        p = counts / cells
        return torch.from_numpy(np.log(p) - np.log1p(-p)).float()

    @staticmethod
    def shifted(outputs: dict[str, torch.Tensor], delta: float, target: str) -> dict[str, torch.Tensor]:
        """Outputs with every decision threshold moved by ``delta`` (positive: more positives).

        Used to tell a model that ranks positive cells above negative ones but is miscalibrated
        from one that has learned nothing: F1 at the best single shift."""
        logits = outputs["logits"]
        if target == "classes":
            logits = logits.clone()
            logits[..., 0] -= delta  # the "none" class
        else:
            logits = logits + delta
        return {**outputs, "logits": logits}

    def positive_cells(self, logits: torch.Tensor, batch: Batch) -> list[np.ndarray]:
        """Per sentence, the (k, 3) cells predicted positive; one device->host copy per batch."""
        mask = batch.grid_mask
        if self.target == "classes":
            cls = logits.argmax(dim=-1)
            hit = (cls > 0) & mask
            idx = hit.nonzero()  # (k, 3): b, i, j
            lab = cls[hit] - 1
            rows = torch.cat([idx, lab[:, None]], dim=1)
        else:
            hit = (logits > 0) & mask[..., None]
            # An untrained model can mark a large share of all n^2 * L cells positive; gold grids
            # have a few cells per character. Keep at most MAX_CELLS_PER_CHAR * n of the highest
            # scores per sentence (documented rule) so decoding stays cheap; a trained model is
            # far below the cap, so its predictions are unchanged.
            counts = hit.flatten(1).sum(dim=1)
            caps = MAX_CELLS_PER_CHAR * batch.lengths.to(counts.device)
            for row in (counts > caps).nonzero().flatten().tolist():
                flat = logits[row].masked_fill(~hit[row], float("-inf")).flatten()
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[flat.topk(int(caps[row])).indices] = True
                hit[row] = keep.view_as(hit[row])
            rows = hit.nonzero()  # (k, 4): b, i, j, label
        return split_cells(rows.cpu().numpy(), len(batch))

    def decode(self, outputs: dict[str, torch.Tensor], batch: Batch) -> list[set[Entity]]:
        lengths = batch.lengths.tolist()
        cells = self.positive_cells(outputs["logits"], batch)
        # A per-sentence cap keeps an untrained model's near-random grid from stalling evaluation;
        # far above any real sentence (gold has at most a few entities per character).
        return [
            self.labels.decode(n, c, max_entities=MAX_ENTITIES_PER_CHAR * n + 100, **self._decode_flags)
            for n, c in zip(lengths, cells)
        ]
