"""Leaf layers with plain-size constructors, shared by CRENER and the baselines.

Nothing here reads a config object: W2NER, TENER and CRENER wire these with their own widths.
Grid tensors are channels-last, (B, N, N, C), except inside :class:`DilatedConvBlock`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLN_EPS = 1e-12  # W2NER's epsilon


class _Dropout(torch.autograd.Function):
    """Inverted dropout keeping a 1-byte mask for backward; see :class:`GridDropout`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float):
        keep = torch.rand(x.shape, device=x.device) >= p  # fp32 draws: P(keep) = 1 - p exactly
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class GridDropout(nn.Dropout):
    """``nn.Dropout`` for grid-sized tensors: the same distribution, drawn faster on CPU.

    CPU ``bernoulli_`` (what ``F.dropout`` uses) took 113 ms for a (158, 158, 288) grid, against
    51 ms for uniform draws compared with p; the predictor's two grid dropouts were a quarter of
    W2NER's training step. The mask is also kept as bool rather than float. Different random
    stream from ``nn.Dropout``, same law: each element is kept with probability 1 - p and scaled
    by 1 / (1 - p). ``fast=False`` (the default, see ``model.fast_dropout``) is ``nn.Dropout``.
    """

    def __init__(self, p: float = 0.5, fast: bool = False):
        super().__init__(p)
        self.fast = fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or not self.training or self.p == 0.0:
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return _Dropout.apply(x, self.p)


class MLP(nn.Module):
    """Dropout -> Linear -> GELU (W2NER's MLP)."""

    def __init__(self, n_in: int, n_out: int, dropout: float = 0.0, fast_dropout: bool = False):
        super().__init__()
        self.dropout = GridDropout(dropout, fast_dropout)
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.linear(self.dropout(x)))


class ConditionalLayerNorm(nn.Module):
    """V_ij = gamma(c_i) * (x_j - mu_j) / sigma_j + beta(c_i)   (method.md eqs 5-6).

    ``forward(x, cond)`` normalises ``x`` along the column axis j and conditions on ``cond`` along
    the row axis i, giving (B, N, N, d). The caller picks the orientation: CRENER passes
    (object, subject) = paper orientation; W2NER's code normalises rows and conditions on columns,
    which is ``forward(x, cond).transpose(1, 2)`` with both inputs the same. The conditional maps
    start at zero with bias (1, 0), so the layer starts as a plain LayerNorm (W2NER).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = CLN_EPS):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Linear(cond_dim, dim)
        self.beta = nn.Linear(cond_dim, dim)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def parts(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised x, gamma(cond), beta(cond)), each (B, N, d): the grid is their outer form.

        Callers that immediately project the grid (CRENER's 1x1 conv) use these factors to
        avoid materialising the (B, N, N, d) tensor at all.
        """
        normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed, self.gamma(cond), self.beta(cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: (B, N, d) normalised per column j; cond: (B, N, c) per row i.
        normed, gamma, beta = self.parts(x, cond)
        return torch.addcmul(beta[:, :, None], gamma[:, :, None], normed[:, None])  # (B, N, N, d)


class DilatedConvBlock(nn.Module):
    """Multi-granularity depthwise dilated 3x3 convolutions, each followed by GELU (eq. 8).

    ``chain=False`` applies every rate to the same input (paper, TOE); ``chain=True`` feeds each
    rate the previous rate's output (W2NER's released code). Input and output are channels-last;
    the output concatenates the rates: (B, N, N, len(dilations) * channels). Padded cells are
    zeroed before each convolution so padding never leaks into real cells.
    """

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, ...] = (1, 2, 3),
        chain: bool = False,
        space_to_batch: bool = True,
    ):
        super().__init__()
        self.chain = chain
        self.space_to_batch = space_to_batch  # dilated_depthwise for d > 1 on CPU; False: conv(h)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size=3, groups=channels, dilation=d, padding=d)
            for d in dilations
        )
        self.out_dim = channels * len(dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, N, N, C); mask: (B, N, N) bool
        m = mask[:, None].to(x.dtype)  # (B, 1, N, N)
        h = x.permute(0, 3, 1, 2) * m  # (B, C, N, N)
        outs = []
        for conv in self.convs:
            y = F.gelu(dilated_depthwise(conv, h) if self.space_to_batch else conv(h)) * m
            outs.append(y)
            if self.chain:
                h = y
        return torch.cat(outs, dim=1).permute(0, 2, 3, 1)  # (B, N, N, rates * C)


def dilated_depthwise(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv(h)`` for a 3x3 depthwise conv with dilation d and padding d, computed fast on CPU.

    oneDNN's backward pass for dilated depthwise convolutions is pathologically slow on CPU
    (measured 13x slower at d = 2 and 30x at d = 3 than at d = 1, for the same tensor). A
    dilated conv only mixes cells in the same residue class mod d, so it equals an undilated
    conv over the d * d interleaved sub-grids ("space to batch"); zero padding to a multiple
    of d matches the conv's own zero padding. Exact, not an approximation (tested).
    """
    d = conv.dilation[0]
    # Only the backward pass is pathological: without autograd (evaluation) the library conv
    # is faster than the extra reshapes (W2NER paper widths: 23.9 vs 18.5 eval sentences/s).
    if d == 1 or h.device.type != "cpu" or not torch.is_grad_enabled():
        return conv(h)
    b, c, n, _ = h.shape
    m = -(-n // d) * d
    if m != n:
        h = F.pad(h, (0, m - n, 0, m - n))
    k = m // d
    z = h.reshape(b, c, k, d, k, d).permute(0, 3, 5, 1, 2, 4).reshape(b * d * d, c, k, k)
    y = F.conv2d(z, conv.weight, conv.bias, padding=1, groups=conv.groups)
    y = y.reshape(b, d, d, c, k, k).permute(0, 3, 4, 1, 5, 2).reshape(b, c, m, m)
    return y[:, :, :n, :n]


class Biaffine(nn.Module):
    """y_ijl = [s_i; 1]^T U_l [o_j; 1] (eq. 16); U is xavier-normal initialised (W2NER)."""

    def __init__(self, n_in: int, n_out: int, bias_x: bool = True, bias_y: bool = True):
        super().__init__()
        self.bias_x, self.bias_y = bias_x, bias_y
        self.weight = nn.Parameter(torch.empty(n_out, n_in + bias_x, n_in + bias_y))
        nn.init.xavier_normal_(self.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: (B, N, d) -> (B, N, N, n_out)
        if self.bias_x:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        if self.bias_y:
            y = torch.cat([y, torch.ones_like(y[..., :1])], dim=-1)
        # Contract x with U first: N * L * d^2 + N^2 * L * d instead of materialising N^2 * d^2.
        xu = torch.einsum("bxi,oij->boxj", x, self.weight)  # (B, L, N, d+1)
        return torch.einsum("boxj,byj->bxyo", xu, y)


def relative_sinusoid(n: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(2n - 1, dim) fixed embeddings R_delta for delta = -(n-1) .. n-1 (TENER, method.md §2.1).

    First half sin(delta * w_m), second half cos(delta * w_m), w_m = 10000^(-m / (dim/2 - 1)).
    sin is odd, so the Q.R term distinguishes left from right.
    """
    half = dim // 2
    denom = max(half - 1, 1)
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / denom))
    delta = torch.arange(-(n - 1), n, device=device, dtype=torch.float32)
    angles = delta[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativeMultiHeadAttention(nn.Module):
    """Direction- and distance-aware relative attention of TENER / CRENER (eqs 1-3).

    A_ij = Q_i.K_j + Q_i.R_{j-i} + u.K_j + v.R_{j-i}, unscaled unless ``scale``; padded keys get
    -inf. ``rel_pos`` = "none" drops both R terms, "symmetric" uses |j - i| (direction lost).
    Returns the output (B, N, H * d_k) and the attention probabilities (B, H, N, N).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        key_proj: bool = True,
        out_proj: bool = False,
        scale: bool = False,
        rel_pos: str = "full",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.d_k = heads, dim // heads
        self.rel_pos = rel_pos
        self.scale = 1.0 / math.sqrt(self.d_k) if scale else 1.0
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim) if key_proj else None
        self.v = nn.Linear(dim, dim)
        self.u_bias = nn.Parameter(nn.init.xavier_normal_(torch.empty(heads, self.d_k)))
        self.v_bias = nn.Parameter(nn.init.xavier_normal_(torch.empty(heads, self.d_k)))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim) if out_proj else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        h, d = self.heads, self.d_k
        q = self.q(x).view(b, n, h, d).transpose(1, 2)  # (B, H, N, d)
        k = (self.k(x) if self.k is not None else x).view(b, n, h, d).transpose(1, 2)
        v = self.v(x).view(b, n, h, d).transpose(1, 2)
        # Content terms: (Q + u) . K_j
        scores = torch.matmul(q + self.u_bias[None, :, None, :], k.transpose(-1, -2))  # (B, H, N, N)
        if self.rel_pos != "none":
            rel = relative_sinusoid(n, d, device=x.device).to(x.dtype)  # (2N-1, d), row r: delta = r-(N-1)
            if self.rel_pos == "symmetric":
                rel = rel[(torch.arange(2 * n - 1, device=x.device) - (n - 1)).abs() + (n - 1)]
            # Position terms (Q + v) . R_{j-i}: score against every offset, then gather delta = j - i.
            pos = torch.matmul(q + self.v_bias[None, :, None, :], rel.t())  # (B, H, N, 2N-1)
            idx = torch.arange(n, device=x.device)
            gather = (idx[None, :] - idx[:, None]) + (n - 1)  # (N, N): offset j - i
            scores = scores + pos.gather(-1, gather[None, None].expand(b, h, n, n))
        scores = scores * self.scale
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(self.dropout(probs), v).transpose(1, 2).reshape(b, n, h * d)
        if self.out is not None:
            out = self.out(out)
        return out, probs


class AdaptedTransformerLayer(nn.Module):
    """Post-norm layer: X <- LN(X + Attn(X)); X <- LN(X + FFN(X))  (TENER, method.md §2.1)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, **attn_kwargs):
        super().__init__()
        self.attn = RelativeMultiHeadAttention(dim, heads, dropout=dropout, **attn_kwargs)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim), nn.Dropout(dropout)
        )
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, probs = self.attn(x, mask)
        x = self.norm1(x + a)  # TENER applies no dropout to the attention output
        x = self.norm2(x + self.ffn(x))
        return x, probs


class AdaptedTransformer(nn.Module):
    """A stack of :class:`AdaptedTransformerLayer`; returns H and the last layer's probabilities."""

    def __init__(self, dim: int, layers: int, heads: int, ff: int, dropout: float, **attn_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            AdaptedTransformerLayer(dim, heads, ff, dropout, **attn_kwargs) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = None
        for layer in self.layers:
            x, probs = layer(x, mask)
        x = x * mask[..., None].to(x.dtype)  # padded rows carry no signal downstream
        return x, probs


class BiLSTM(nn.Module):
    """Packed bidirectional LSTM (W2NER's encoder), so padding never reaches the real positions."""

    def __init__(self, n_in: int, hidden_total: int):
        super().__init__()
        if hidden_total % 2:
            raise ValueError("BiLSTM total hidden size must be even")
        self.lstm = nn.LSTM(n_in, hidden_total // 2, batch_first=True, bidirectional=True)
        self.out_dim = hidden_total

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = x.size(1)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN has no bf16 LSTM primitive on CPU ("could not create a primitive descriptor"):
            # the recurrence runs in fp32, the grid work around it stays in bf16.
            with torch.autocast("cpu", enabled=False):
                return self.forward(x.float(), lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=n)
        return out


class _RowColMax(torch.autograd.Function):
    """Forward and backward of :func:`masked_row_col_max`; see there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor):
        filled = x.masked_fill(~mask[..., None], float("-inf"))  # one copy serves both axes
        rows = filled.amax(dim=2)  # (B, N, C): per row i, the max over columns j
        cols = filled.amax(dim=1)  # (B, N, C): per column j, the max over rows i
        row_ok = mask.any(dim=2)[..., None]  # (B, N, 1): rows with at least one real cell
        col_ok = mask.any(dim=1)[..., None]
        # Where each max was attained, as 1-byte grids (a padded cell is -inf, never a real max;
        # rows or columns with no real cell are cut off by row_ok / col_ok in backward).
        ctx.save_for_backward(filled == rows[:, :, None], filled == cols[:, None], row_ok, col_ok)
        return rows.masked_fill(~row_ok, 0.0), cols.masked_fill(~col_ok, 0.0)

    @staticmethod
    def backward(ctx, g_rows: torch.Tensor, g_cols: torch.Tensor):
        at_row_max, at_col_max, row_ok, col_ok = ctx.saved_tensors
        grad = torch.where(at_row_max, (g_rows * row_ok)[:, :, None], 0.0)
        grad += torch.where(at_col_max, (g_cols * col_ok)[:, None], 0.0)
        return grad, None


def masked_row_col_max(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max of a (B, N, N, C) grid over columns (per row) and over rows (per column), ignoring
    cells where ``mask`` (B, N, N) is False: two (B, N, C) tensors. Rows or columns with no
    real cell give 0, not -inf, and receive no gradient.

    Why a custom function: autograd's ``amax`` backward spreads the gradient with dense
    comparisons, divisions and a ``masked_fill`` copy per axis; here one masked copy serves both
    axes and the backward is two selects from 1-byte "is the max" grids. ``max`` with indices and
    a scatter backward was tried too: its indexed reduction is 8x slower than ``amax``. At exact
    ties every tied cell gets the whole gradient instead of a share (a measure-zero difference).
    """
    return _RowColMax.apply(x, mask)
