"""Grid losses (method.md §2.6). Each returns a dict of named terms; "loss" is what is optimised."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def zlpr(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label threshold loss with s_0 = 0 (eq. 19), per row of (M, L) scores; fp32.

    log(1 + sum_{neg} e^{s}) + log(1 + sum_{pos} e^{-s}); the "1" is the threshold logit 0.
    """
    scores = scores.float()
    signed = torch.where(targets, -scores, scores)  # positives enter as -s, negatives as s
    neg_inf = torch.finfo(signed.dtype).min
    zero = torch.zeros_like(signed[:, :1])
    neg = torch.cat([signed.masked_fill(targets, neg_inf), zero], dim=-1)
    pos = torch.cat([signed.masked_fill(~targets, neg_inf), zero], dim=-1)
    return torch.logsumexp(neg, dim=-1) + torch.logsumexp(pos, dim=-1)


class GridLoss(nn.Module):
    """Masked grid loss: ZLPR over multi-label cells, or softmax CE over single-label classes.

    Averaged over every valid cell (both triangles, diagonal included), as TOE and W2NER do;
    padded cells never enter.
    """

    def __init__(self, kind: str = "zlpr"):
        super().__init__()
        if kind not in ("zlpr", "ce"):
            raise ValueError(f"unknown grid loss {kind!r}")
        self.kind = kind

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        valid = logits[mask]  # (M, L)
        if self.kind == "zlpr":
            loss = zlpr(valid, targets[mask]).mean()
        else:
            loss = F.cross_entropy(valid.float(), targets[mask])
        return {"loss": loss}
