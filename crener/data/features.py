"""Grid features shared by every grid model: distance buckets, region ids and masks.

Everything is computed per batch from the padded length with vectorised tensor ops, so the
data pipeline never stores dense N x N arrays per sentence. The bucket layout is W2NER's
(method.md §2.3) but written as named constants instead of a magic lookup table.
"""

from __future__ import annotations

import torch

DIST_PAD = 0  # padded cells
DIST_LOG_BUCKETS = 9  # |delta| = 1 -> 1, 2-3 -> 2, ..., 128-255 -> 8, >= 256 -> 9
DIST_UPPER_OFFSET = DIST_LOG_BUCKETS  # upper triangle (delta = i - j < 0) adds this
DIST_DIAGONAL = 2 * DIST_LOG_BUCKETS + 1  # 19
NUM_DIST_IDS = DIST_DIAGONAL + 1  # 20 embedding rows

REGION_PAD = 0
REGION_UPPER = 1  # i < j
REGION_LOWER = 2  # i >= j (diagonal included)
NUM_REGION_IDS = 3


def distance_ids(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, n) long tensor of distance-bucket ids for delta = i - j (no padding applied)."""
    idx = torch.arange(n, device=device)
    delta = idx[:, None] - idx[None, :]
    mag = delta.abs()
    # floor(log2(|delta|)) + 1 via integer bit length; clamp(min=1) keeps log2 defined on the diagonal.
    bucket = (torch.floor(torch.log2(mag.clamp(min=1).float())).long() + 1).clamp(max=DIST_LOG_BUCKETS)
    ids = torch.where(delta < 0, bucket + DIST_UPPER_OFFSET, bucket)
    return torch.where(delta == 0, torch.full_like(ids, DIST_DIAGONAL), ids)


def region_ids(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, n) long tensor: REGION_UPPER above the diagonal, REGION_LOWER on and below it."""
    idx = torch.arange(n, device=device)
    return torch.where(idx[:, None] < idx[None, :], REGION_UPPER, REGION_LOWER)


def char_mask(lengths: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(B, n) bool mask of real characters."""
    n = int(lengths.max()) if n is None else n
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def grid_mask(lengths: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(B, n, n) bool mask of cells whose row and column are both real characters."""
    m = char_mask(lengths, n)
    return m[:, :, None] & m[:, None, :]
