"""Layers with plain-size constructors, shared by CRENER and the baselines.

Nothing here reads a config object: W2NER, TENER and CRENER wire these with their own widths.
Besides the leaves (CLN, dilated convolutions, biaffine, MLP, the adapted Transformer, BiLSTM),
the two grid blocks CRENER and W2NER both build live here, :class:`GridConvModule` (eqs 5-8) and
:class:`CoPredictor` (eqs 16-18), so a baseline never imports CRENER itself.
Grid tensors are channels-last, (B, N, N, C), except inside :class:`DilatedConvBlock`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crener import dconv
from crener.data.features import NUM_DIST_IDS, NUM_REGION_IDS, distance_ids, region_ids

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

    CPU ``bernoulli_`` (what ``F.dropout`` uses) took about twice as long as uniform draws
    compared with p on a predictor-sized grid, and the predictor's two grid dropouts were a
    large share of W2NER's training step (measured in isolation when written; the whole step's
    effect is the levers suite's, reports/performance.md). The mask is also
    kept as bool rather than float. Different random
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

    ``fused`` (``runtime.fused_conv``) computes the same values with fewer passes over the grid.
    On CPU (fp32 or fp64, and in fp32 when training under bf16 autocast) the block is the kernel
    of :mod:`crener.dconv`: without chaining one call for every rate and tap from one read of each
    neighbourhood, GELU included, straight into the output's slices; chained, one call a rate.
    Elsewhere GELU and the mask are one autograd op (:class:`_GeluMask`) and, without chaining,
    every rate is written straight into its slice of the output (:class:`_GeluMaskConcat`), so no
    separate concatenation. Chained rates each need their own tensor as the next conv's input, so
    there the rates are still concatenated at the end.
    """

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, ...] = (1, 2, 3),
        chain: bool = False,
        space_to_batch: bool = True,
        fused: bool = False,
    ):
        super().__init__()
        self.chain = chain
        self.space_to_batch = space_to_batch  # dilated_depthwise for d > 1 on CPU; False: conv(h)
        self.fused = fused
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size=3, groups=channels, dilation=d, padding=d)
            for d in dilations
        )
        self.out_dim = channels * len(dilations)

    def _conv(self, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
        return dilated_depthwise(conv, h) if self.space_to_batch else conv(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, N, N, C); mask: (B, N, N) bool
        if self.fused and dconv.fits(self.convs, x):
            if not self.chain:
                return dconv.dilated_convs(self.convs, x, mask)
            # Chained, each rate is the kernel over the previous rate's output; the rates still
            # need their own tensors, so they are concatenated at the end, as below.
            outs, h = [], x
            for conv in self.convs:
                h = dconv.dilated_convs([conv], h, mask)
                outs.append(h)
            return torch.cat(outs, dim=-1)
        m = mask[:, None].to(x.dtype)  # (B, 1, N, N)
        h = x.permute(0, 3, 1, 2) * m  # (B, C, N, N)
        if self.fused and not self.chain:
            return _GeluMaskConcat.apply(m, *(self._conv(conv, h) for conv in self.convs))
        outs = []
        for conv in self.convs:
            z = self._conv(conv, h)
            y = _GeluMask.apply(z, m) if self.fused else F.gelu(z) * m
            outs.append(y)
            if self.chain:
                h = y
        # Each output is channels-last in memory (the library keeps its input's layout), so the
        # permuted views are contiguous and the concatenation is too: the grid-wide matmuls that
        # read it (tag projection, predictor MLP) then need no transposed copy.
        return torch.cat([y.permute(0, 2, 3, 1) for y in outs], dim=-1)  # (B, N, N, rates * C)


def _gelu_mask_into(z: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = gelu(z) * m`` for a mask of zeros and ones, with no temporary where dtypes agree.

    ``out`` may be a strided view (a slice of a wider output). GELU runs in z's dtype as
    ``F.gelu(z)`` does, so a wider ``out`` (bf16 z, fp32 mask) gets the plain path's rounding.
    """
    if out.dtype == z.dtype:
        torch.ops.aten.gelu.out(z, out=out)
        return out.mul_(m)
    return torch.mul(F.gelu(z), m, out=out)


def _gelu_mask_grad(grad: torch.Tensor, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """d(gelu(z) * m)/dz applied to ``grad``: gelu'(z) * grad * m in the library's fused kernel.

    Multiplying by a 0/1 mask is exact, so masking after ``gelu_backward`` gives autograd's
    ``gelu_backward(grad * m, z)`` (up to the sign of zeros); ``grad`` is rounded to z's dtype
    first, as autograd does for a mixed-dtype product.
    """
    return torch.ops.aten.gelu_backward(grad.to(z.dtype), z).mul_(m)


class _GeluMask(torch.autograd.Function):
    """``gelu(z) * m`` as one op: saves only z and the mask, one fused expression in backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, m: torch.Tensor):
        ctx.save_for_backward(z, m)
        out = torch.empty_like(z, dtype=torch.promote_types(z.dtype, m.dtype))
        return _gelu_mask_into(z, m, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, m = ctx.saved_tensors
        return _gelu_mask_grad(grad, z, m) if ctx.needs_input_grad[0] else None, None


class _GeluMaskConcat(torch.autograd.Function):
    """``cat([(gelu(z) * m).permute(0, 2, 3, 1) for z in zs], -1)`` with each rate written in place.

    Each z is (B, C, N, N) and m (B, 1, N, N); the output is one channels-last (B, N, N, R * C)
    tensor, rate r in channels r * C .. (r + 1) * C. Backward reads each rate's slice of the
    incoming gradient as a view, so neither pass allocates per-rate activations or a concatenation.
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor, *zs: torch.Tensor):
        ctx.save_for_backward(m, *zs)
        b, c, n, n2 = zs[0].shape
        dtype = torch.promote_types(zs[0].dtype, m.dtype)
        out = torch.empty(b, n, n2, len(zs) * c, dtype=dtype, device=zs[0].device)
        for r, z in enumerate(zs):
            _gelu_mask_into(z, m, out[..., r * c : (r + 1) * c].permute(0, 3, 1, 2))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, *zs = ctx.saved_tensors
        c = zs[0].size(1)
        grads = [
            _gelu_mask_grad(grad[..., r * c : (r + 1) * c].permute(0, 3, 1, 2), z, m)
            if ctx.needs_input_grad[1 + r]
            else None
            for r, z in enumerate(zs)
        ]
        return None, *grads


def dilated_depthwise(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv(h)`` for a 3x3 depthwise conv with dilation d and padding d, computed fast on CPU.

    oneDNN's backward pass for dilated depthwise convolutions in bf16 is pathologically slow on
    CPU (several times its d = 1 cost for the same tensor; in fp32 over channels-last input it is
    not, and there the library's conv is the faster: measured when written, see
    reports/performance.md). A dilated conv only mixes cells in the same residue class mod d, so
    it equals an undilated conv over the d * d interleaved sub-grids ("space to batch"); zero
    padding to a multiple of d matches the conv's own zero padding. Exact, not an approximation
    (tested). Used where it pays: CPU training in bf16 (autocast or bf16 tensors).
    """
    # Only the backward pass is pathological: without autograd (evaluation) the library conv
    # is faster than the extra reshapes.
    if conv.dilation[0] == 1 or h.device.type != "cpu" or not torch.is_grad_enabled():
        return conv(h)
    bf16 = h.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return space_to_batch_conv(conv, h) if bf16 else conv(h)


def space_to_batch_conv(conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv(h)`` (3x3 depthwise, dilation d, padding d) as an undilated conv over sub-grids."""
    d = conv.dilation[0]
    if d == 1:
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
        # U in x's dtype: under bf16 autocast x arrives in bf16, and einsum is not on autocast's
        # list (its bmm is, but a dispatch mode such as the flop counter sees the bmm below it).
        xu = torch.einsum("bxi,oij->boxj", x, self.weight.to(x.dtype))  # (B, L, N, d+1)
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
        # rows or columns with no real cell are cut off by row_ok / col_ok in backward). Only
        # when a gradient will be asked for: in evaluation the two comparisons are pure cost.
        if ctx.needs_input_grad[0]:
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
    a scatter backward was tried too: its indexed reduction is several times slower than ``amax``
    (measured in isolation when written). At exact
    ties every tied cell gets the whole gradient instead of a share (a measure-zero difference).
    """
    return _RowColMax.apply(x, mask)


# --------------------------------------------------------------------------- grid blocks


class GridConvModule(nn.Module):
    """One convolution pass (eqs 5-8): CLN, grid embeddings, 1x1 conv, dilated convs.

    Returns Q, (B, N, N, out_dim), zero on padded cells. ``attn_heads`` > 0 adds the attention
    matrix embedding E^a built from the Transformer's last-layer probabilities.
    """

    def __init__(
        self,
        hidden: int,
        channels: int,
        *,
        dist_dim: int = 0,
        region_dim: int = 0,
        attn_heads: int = 0,
        attn_dim: int = 0,
        dropout: float = 0.5,
        dilations: tuple[int, ...] | None = (1, 2, 3),
        chain: bool = False,
        orientation: str = "paper",
        input_form: str = "split",
        space_to_batch: bool = True,
        fused_conv: bool = False,
    ):
        super().__init__()
        self.orientation = orientation
        self.input_form = input_form
        self.dropout = dropout
        self.cln = ConditionalLayerNorm(hidden, hidden)
        self.dist_emb = nn.Embedding(NUM_DIST_IDS, dist_dim) if dist_dim else None
        self.region_emb = nn.Embedding(NUM_REGION_IDS, region_dim) if region_dim else None
        self.attn_proj = nn.Linear(attn_heads, attn_dim) if attn_heads else None
        in_dim = hidden + dist_dim + region_dim + (attn_dim if attn_heads else 0)
        self.reduce = nn.Linear(in_dim, channels)  # the 1x1 convolution, channels-last
        self.dconv = (
            DilatedConvBlock(channels, dilations, chain, space_to_batch, fused_conv) if dilations else None
        )
        self.out_dim = self.dconv.out_dim if self.dconv is not None else channels

    def forward(
        self,
        s: torch.Tensor,
        o: torch.Tensor,
        mask: torch.Tensor,
        attn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        form = {"split": self._split, "concat": self._concat, "factored": self._factored}[self.input_form]
        c = form(s, o, mask, attn)  # (B, N, N, d_c), the same function in each form (tested)
        if self.dconv is not None:
            c = self.dconv(c, mask)  # (B, N, N, rates * d_c)
        return c

    def _concat(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """Eq. 7 as written: concatenate [CLN(s, o); E^d; E^r; E^a] on the grid, then the 1x1 conv."""
        b, n = s.size(0), s.size(1)
        v = self.cln(o, s) if self.orientation == "paper" else self.cln(s, o).transpose(1, 2)
        parts = [v]
        for emb, ids_fn in ((self.dist_emb, distance_ids), (self.region_emb, region_ids)):
            if emb is not None:
                parts.append(emb(ids_fn(n, s.device)).expand(b, -1, -1, -1))
        if self.attn_proj is not None:
            parts.append(self.attn_proj(attn.to(s.dtype).permute(0, 2, 3, 1)))
        x = torch.cat(parts, dim=-1)  # (B, N, N, in_dim)
        keep = self._channel_keep(b, x.size(-1), s)  # the same draws as the factored path
        if keep is not None:
            x = x * keep[:, None, None, :]
        return F.gelu(self.reduce(x)) * mask[..., None].to(x.dtype)

    def _split(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """Eq. 7 with only the CLN grid materialised (the default form).

        The 1x1 conv is linear, so it splits over the concatenated parts: the d_h-wide CLN grid
        goes through one large matmul, while each d_E-wide embedding goes through its small
        table (ids x d_c) before a one-hot matmul puts it on the grid, and the attention matrix
        through a heads -> d_c map. Channel dropout (a per-example mask on input channels) folds
        into gamma, beta and those small maps. This saves the (B, N, N, d_h + 3 d_E) concatenation
        and its dropout product, forward and backward, in every round.
        """
        w = self.reduce.weight  # (d_c, in_dim), column blocks: [CLN | dist | region | attn]
        keep = self._channel_keep(s.size(0), w.size(1), s)  # (B, in_dim) or None
        normed, gamma, beta = self._cln_factors(s, o, keep)  # (B, N, d_h) each
        if self.orientation == "paper":  # row i conditions, column j is normalised
            v = torch.addcmul(beta[:, :, None], gamma[:, :, None], normed[:, None])
        else:  # W2NER's code: the transpose, row i normalised, column j conditions
            v = torch.addcmul(beta[:, None], gamma[:, None], normed[:, :, None])
        c = F.linear(v, w[:, : normed.size(-1)], self.reduce.bias)  # (B, N, N, d_c)
        return F.gelu(self._small_parts(c, keep, attn)) * mask[..., None].to(c.dtype)

    def _cln_factors(
        self, s: torch.Tensor, o: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised, gamma, beta) of the CLN grid, with channel dropout folded into gamma and beta."""
        x, cond = (o, s) if self.orientation == "paper" else (s, o)
        normed, gamma, beta = self.cln.parts(x, cond)  # (B, N, d_h) each
        if keep is not None:
            hidden = normed.size(-1)
            gamma = gamma * keep[:, None, :hidden]
            beta = beta * keep[:, None, :hidden]
        return normed, gamma, beta

    def _small_parts(
        self, c: torch.Tensor, keep: torch.Tensor | None, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """``c`` (B, N, N, d_c) plus the 1x1 conv of the distance, region and attention parts.

        Each embedding goes through its small table (ids x d_c, channel dropout folded in) and a
        one-hot matmul puts it on the grid: a gather's backward (index_put with accumulation into
        a 20-row table) cost more than the whole forward of this part.
        """
        n = c.size(1)
        w = self.reduce.weight
        col = self.cln.gamma.out_features
        onehots, projs = [], []
        for emb, ids_fn in ((self.dist_emb, distance_ids), (self.region_emb, region_ids)):
            if emb is None:
                continue
            dim = emb.embedding_dim
            table = emb.weight[None]  # (1, ids, d_E)
            if keep is not None:
                table = table * keep[:, None, col : col + dim]
            projs.append(table @ w[:, col : col + dim].t())  # (B or 1, ids, d_c)
            onehots.append(F.one_hot(ids_fn(n, c.device), emb.num_embeddings))  # (N, N, ids)
            col += dim
        if projs:
            onehot = torch.cat(onehots, dim=-1).reshape(n * n, -1).to(c.dtype)
            proj = torch.cat(projs, dim=1)  # (B or 1, ids, d_c): all with dropout or none
            c = c + torch.matmul(onehot, proj).reshape(-1, n, n, c.size(-1))  # broadcast over B if 1
        if self.attn_proj is not None:
            c = c + self._attn_part(attn.to(c.dtype), w[:, col:], keep[:, col:] if keep is not None else None)
        return c

    def _attn_part(self, probs: torch.Tensor, w_a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The attention embedding through the 1x1 conv: (B, heads, N, N) -> (B, N, N, d_c)."""
        if keep is not None:
            w_a = w_a[None] * keep[:, None, :]  # (B, d_c, d_E)
        w_eff = w_a @ self.attn_proj.weight  # (B or -, d_c, heads): attn_proj then the 1x1 conv
        b_eff = w_a @ self.attn_proj.bias  # (B or -, d_c)
        if w_eff.dim() == 2:
            return torch.einsum("bhij,ch->bijc", probs, w_eff) + b_eff
        return torch.einsum("bhij,bch->bijc", probs, w_eff) + b_eff[:, None, None, :]

    def _factored(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """C = GELU(Conv1x1(Dropout2d([CLN(s, o); E^d; E^r; E^a]))), the input of the dilated convs.

        Computed without materialising the concatenated (B, N, N, d_h + 3 d_E) input: the 1x1
        conv is linear, so it is applied to each part separately (the CLN grid through its
        factors, each embedding through its small table), and channel dropout, a per-example
        mask on input channels, folds into those factors. Same function as the naive form (a
        test checks it). Not the default: its (B, N, d_c, d_h) factor is no smaller than the grid
        while N < d_c, and on CPU it measured slower, with a higher peak (`crener bench --suite
        levers`; figures: reports/performance.md).
        """
        w = self.reduce.weight  # (d_c, in_dim), column blocks: [CLN | dist | region | attn]
        keep = self._channel_keep(s.size(0), w.size(1), s)  # (B, in_dim) or None
        # CLN part: out[i, j] = W_v (gamma_i * n_j + beta_i), rows condition, columns are normalised.
        normed, gamma, beta = self._cln_factors(s, o, keep)  # (B, N, d_h) each
        w_v = w[:, : normed.size(-1)]
        g = gamma[:, :, None, :] * w_v[None, None]  # (B, N, d_c, d_h): W_v diag(gamma_i)
        c = torch.matmul(g, normed.transpose(1, 2)[:, None])  # (B, N, d_c, N): row i, column j
        c = c.transpose(2, 3) + (beta @ w_v.t())[:, :, None, :]  # (B, N, N, d_c)
        if self.orientation != "paper":
            c = c.transpose(1, 2)  # W2NER code: normalise the row, condition on the column
        return F.gelu(self._small_parts(c + self.reduce.bias, keep, attn)) * mask[..., None].to(c.dtype)

    def _channel_keep(self, b: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """Dropout2d's per-example channel mask, scaled by 1 / (1 - p); None when inactive."""
        if not self.training or self.dropout == 0.0:
            return None
        keep = torch.empty(b, width, device=like.device, dtype=like.dtype).bernoulli_(1 - self.dropout)
        return keep / (1 - self.dropout)


class CoPredictor(nn.Module):
    """Biaffine over character pairs plus an MLP over grid features; scores are summed (eqs 16-18)."""

    def __init__(
        self,
        num_labels: int,
        *,
        char_dim: int,
        grid_dim: int,
        biaffine_dim: int,
        ffn_dim: int,
        dropout: float,
        use_biaffine: bool = True,
        use_mlp: bool = True,
        fast_dropout: bool = False,
    ):
        super().__init__()
        self.dropout = GridDropout(dropout, fast_dropout)
        self.mlp_s = MLP(char_dim, biaffine_dim, dropout, fast_dropout) if use_biaffine else None
        self.mlp_o = MLP(char_dim, biaffine_dim, dropout, fast_dropout) if use_biaffine else None
        self.biaffine = Biaffine(biaffine_dim, num_labels) if use_biaffine else None
        self.mlp_rel = MLP(grid_dim, ffn_dim, dropout, fast_dropout) if use_mlp else None
        self.linear = nn.Linear(ffn_dim, num_labels) if use_mlp else None

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Start each label's score at ``bias`` (its prior log-odds, say) instead of about 0.

        The summed score has two constant terms, the MLP head's bias and the biaffine's [1; 1]
        entry of U (eq. 16); the first that exists takes ``bias`` and the other is zeroed, so every
        logit moves by exactly ``bias`` minus the old constant."""
        bias = bias.to(self.biaffine.weight if self.biaffine is not None else self.linear.weight)
        affine_const = None
        if self.biaffine is not None and self.biaffine.bias_x and self.biaffine.bias_y:
            affine_const = self.biaffine.weight[:, -1, -1]
        if self.linear is not None:
            self.linear.bias.copy_(bias)
            if affine_const is not None:
                affine_const.zero_()
        elif affine_const is not None:
            affine_const.copy_(bias)
        else:
            raise ValueError("the biaffine was built without its constant term: no output bias to set")

    def forward(self, s: torch.Tensor, o: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        logits = None
        if self.biaffine is not None:
            logits = self.biaffine(self.dropout(self.mlp_s(s)), self.dropout(self.mlp_o(o)))
        if self.mlp_rel is not None:
            y = self.linear(self.dropout(self.mlp_rel(grid)))
            logits = y if logits is None else logits + y
        return logits  # (B, N, N, L)
