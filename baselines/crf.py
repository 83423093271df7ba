"""A linear-chain CRF in torch: log partition, gold-path score, NLL and Viterbi, all batched.

Shapes: B sentences, N time steps (characters), T tags. ``mask`` (B, N) bool marks real
positions and must be a left-aligned prefix (``mask[:, :n_b]`` true), with at least one real
position per row, which is what :func:`crener.data.batching.collate` produces. Every recursion
is vectorised over the batch and the tags; only the time axis is a Python loop.

Potentials are passed explicitly (``start`` (T,), ``trans`` (T, T) with ``trans[i, j]`` = score
of tag i followed by tag j, ``end`` (T,)), so the model owns the parameters (:class:`CRF`) and
the task computes the loss and decodes from the model's output dict (style principle 5).

Transition constraints (BIOES) are applied by adding :data:`DISALLOWED` to forbidden entries,
a large finite negative rather than -inf: log-sum-exp and its gradient stay finite even for a
row where every transition is forbidden, and no allowed path can ever lose to a forbidden one
(a forbidden path is at least 1e4 below any allowed one at these score scales).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DISALLOWED = -1e4  # added to forbidden start/transition/end potentials
OUTSIDE = "O"


def _check(emissions: torch.Tensor, mask: torch.Tensor) -> None:
    if emissions.dim() != 3 or mask.shape != emissions.shape[:2]:
        raise ValueError(
            f"expected emissions (B, N, T) and mask (B, N), got {tuple(emissions.shape)} and {tuple(mask.shape)}"
        )


def log_partition(
    emissions: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, trans: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """log Z per sentence by the forward algorithm, (B,); computed in fp32."""
    _check(emissions, mask)
    em = emissions.float()
    start, trans, end = start.float(), trans.float(), end.float()
    alpha = start[None, :] + em[:, 0]  # (B, T)
    for t in range(1, em.size(1)):
        # alpha_t(j) = logsumexp_i alpha_{t-1}(i) + trans(i, j) + em_t(j)
        nxt = torch.logsumexp(alpha[:, :, None] + trans[None], dim=1) + em[:, t]
        alpha = torch.where(mask[:, t, None], nxt, alpha)  # padded steps carry alpha unchanged
    return torch.logsumexp(alpha + end[None, :], dim=-1)


def path_score(
    emissions: torch.Tensor,
    tags: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    trans: torch.Tensor,
    end: torch.Tensor,
) -> torch.Tensor:
    """Unnormalised score of the given tag paths, (B,). Tags on padded positions are ignored."""
    _check(emissions, mask)
    em = emissions.float()
    start, trans, end = start.float(), trans.float(), end.float()
    tags = tags.masked_fill(~mask, 0)  # padding may hold -100
    maskf = mask.to(em.dtype)
    emit = em.gather(-1, tags[..., None]).squeeze(-1)  # (B, N)
    score = start[tags[:, 0]] + (emit * maskf).sum(dim=1)
    if tags.size(1) > 1:
        step = trans[tags[:, :-1], tags[:, 1:]]  # (B, N - 1)
        score = score + (step * maskf[:, 1:]).sum(dim=1)
    last = mask.long().sum(dim=1) - 1  # index of the last real position
    return score + end[tags.gather(1, last[:, None]).squeeze(1)]


def neg_log_likelihood(
    emissions: torch.Tensor,
    tags: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    trans: torch.Tensor,
    end: torch.Tensor,
) -> torch.Tensor:
    """-log p(tags | emissions) per sentence, (B,)."""
    return log_partition(emissions, mask, start, trans, end) - path_score(
        emissions, tags, mask, start, trans, end
    )


def viterbi(
    emissions: torch.Tensor, mask: torch.Tensor, start: torch.Tensor, trans: torch.Tensor, end: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best path per sentence: (paths (B, N) long, -100 on padding; scores (B,) fp32).

    Backpointers of padded steps are the identity, so one backward sweep over all N steps
    lands every sentence on its own last real position without per-sentence loops.
    """
    _check(emissions, mask)
    em = emissions.float()
    start, trans, end = start.float(), trans.float(), end.float()
    b, n, t_num = em.shape
    identity = torch.arange(t_num, device=em.device).expand(b, t_num)
    score = start[None, :] + em[:, 0]  # (B, T)
    pointers = []
    for t in range(1, n):
        best, idx = (score[:, :, None] + trans[None]).max(dim=1)  # over the previous tag
        real = mask[:, t, None]
        score = torch.where(real, best + em[:, t], score)
        pointers.append(torch.where(real, idx, identity))
    score = score + end[None, :]
    best_score, cur = score.max(dim=-1)
    paths = torch.empty((b, n), dtype=torch.long, device=em.device)
    paths[:, n - 1] = cur
    for t in range(n - 1, 0, -1):
        cur = pointers[t - 1].gather(1, cur[:, None]).squeeze(1)
        paths[:, t - 1] = cur
    return paths.masked_fill(~mask, -100), best_score


def bioes_constraints(names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allowed (start (T,), trans (T, T), end (T,)) bool masks for BIOES tag names.

    A sentence starts with O, B-x or S-x and ends with O, E-x or S-x. After O, E-x or S-x comes
    O, B-y or S-y (any y); after B-x or I-x comes I-x or E-x (same x).
    """
    parsed = [(OUTSIDE, "") if name == OUTSIDE else tuple(name.split("-", 1)) for name in names]
    for name, (prefix, _) in zip(names, parsed):
        if prefix not in (OUTSIDE, "B", "I", "E", "S"):
            raise ValueError(f"not a BIOES tag: {name!r}")
    t_num = len(names)
    start = torch.tensor([p in (OUTSIDE, "B", "S") for p, _ in parsed])
    end = torch.tensor([p in (OUTSIDE, "E", "S") for p, _ in parsed])
    trans = torch.zeros((t_num, t_num), dtype=torch.bool)
    for i, (pi, ti) in enumerate(parsed):
        for j, (pj, tj) in enumerate(parsed):
            if pi in (OUTSIDE, "E", "S"):
                trans[i, j] = pj in (OUTSIDE, "B", "S")
            else:  # inside an entity of type ti
                trans[i, j] = pj in ("I", "E") and tj == ti
    return start, trans, end


class CRF(nn.Module):
    """CRF potentials as parameters, with optional constraints (bool masks of allowed moves).

    ``potentials()`` returns the constrained ``{"start", "trans", "end"}`` tensors that the
    functions above take; ``outputs()`` returns the same tensors under the model-output keys
    ``crf_start``, ``crf_trans``, ``crf_end`` that :class:`baselines.sequence.SequenceTask` reads.
    """

    def __init__(
        self, num_tags: int, constraints: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ):
        super().__init__()
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.trans = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        nn.init.uniform_(self.trans, -0.1, 0.1)
        if constraints is None:
            constraints = (
                torch.ones(num_tags, dtype=torch.bool),
                torch.ones(num_tags, num_tags, dtype=torch.bool),
                torch.ones(num_tags, dtype=torch.bool),
            )
        allowed_start, allowed_trans, allowed_end = constraints
        # Buffers, not parameters: they follow .to(device) but are never trained; not saved in
        # checkpoints because they are rebuilt from the tag set.
        self.register_buffer("penalty_start", (~allowed_start).float() * DISALLOWED, persistent=False)
        self.register_buffer("penalty_trans", (~allowed_trans).float() * DISALLOWED, persistent=False)
        self.register_buffer("penalty_end", (~allowed_end).float() * DISALLOWED, persistent=False)

    def potentials(self) -> dict[str, torch.Tensor]:
        return {
            "start": self.start + self.penalty_start,
            "trans": self.trans + self.penalty_trans,
            "end": self.end + self.penalty_end,
        }

    def outputs(self) -> dict[str, torch.Tensor]:
        return {f"crf_{k}": v for k, v in self.potentials().items()}

    def forward(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean NLL over the batch (convenience for stand-alone use)."""
        return neg_log_likelihood(emissions, tags, mask, **self.potentials()).mean()

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return viterbi(emissions, mask, **self.potentials())[0]
