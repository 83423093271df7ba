"""Leaf layers and grid features checked against naive reference implementations."""

from __future__ import annotations

import math

import torch

from crener.data.features import (
    DIST_DIAGONAL,
    NUM_DIST_IDS,
    REGION_LOWER,
    REGION_UPPER,
    distance_ids,
    grid_mask,
    region_ids,
)
from crener.layers import (
    Biaffine,
    ConditionalLayerNorm,
    DilatedConvBlock,
    RelativeMultiHeadAttention,
    masked_row_col_max,
    relative_sinusoid,
)
from crener.loss import GridLoss, zlpr


def w2ner_distance(i: int, j: int) -> int:
    """W2NER's dis2idx table, written out: the reference for distance_ids."""
    d = i - j
    if d == 0:
        return DIST_DIAGONAL
    table = [0, 1, 2, 2, 3, 3, 3, 3] + [0] * 992
    table[8:16], table[16:32], table[32:64] = [4] * 8, [5] * 16, [6] * 32
    table[64:128], table[128:256], table[256:] = [7] * 64, [8] * 128, [9] * 744
    return table[d] if d > 0 else table[-d] + 9


def test_distance_ids_match_w2ner_table():
    n = 600
    ids = distance_ids(n)
    ref = torch.tensor([[w2ner_distance(i, j) for j in range(n)] for i in range(n)])
    assert torch.equal(ids, ref)
    assert int(ids.max()) == NUM_DIST_IDS - 1 and int(ids.min()) == 1


def test_region_ids_and_masks():
    r = region_ids(4)
    assert r[0, 1] == REGION_UPPER and r[1, 0] == REGION_LOWER and r[2, 2] == REGION_LOWER
    m = grid_mask(torch.tensor([2, 3]))
    assert m.shape == (2, 3, 3) and m[0].sum() == 4 and m[1].sum() == 9 and not m[0, 2, 0]


def test_cln_orientation_and_identity_init():
    torch.manual_seed(0)
    cln = ConditionalLayerNorm(6, 5)
    x, c = torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    out = cln(x, c)
    ln = torch.nn.functional.layer_norm(x, (6,), eps=1e-12)
    # Identity init: every row i equals LayerNorm of column vector x_j.
    torch.testing.assert_close(out, ln[:, None].expand(-1, 4, -1, -1))
    with torch.no_grad():
        cln.gamma.weight.normal_()
        cln.beta.weight.normal_()
    out = cln(x, c)
    i, j = 1, 3
    ref = cln.gamma(c[:, i]) * ln[:, j] + cln.beta(c[:, i])
    torch.testing.assert_close(out[:, i, j], ref)


def test_biaffine_equals_explicit_bilinear():
    torch.manual_seed(0)
    bi = Biaffine(5, 3)
    x, y = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    out = bi(x, y)
    x1 = torch.cat([x, torch.ones(2, 4, 1)], -1)
    y1 = torch.cat([y, torch.ones(2, 4, 1)], -1)
    ref = torch.empty(2, 4, 4, 3)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                for label in range(3):
                    ref[b, i, j, label] = x1[b, i] @ bi.weight[label] @ y1[b, j]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_relative_attention_equals_naive_formula():
    torch.manual_seed(0)
    att = RelativeMultiHeadAttention(8, 2, dropout=0.0)
    x = torch.randn(1, 5, 8)
    mask = torch.tensor([[True, True, True, True, False]])
    _, probs = att(x, mask)
    q = att.q(x).view(1, 5, 2, 4).transpose(1, 2)[0]
    k = att.k(x).view(1, 5, 2, 4).transpose(1, 2)[0]
    rel = relative_sinusoid(5, 4)
    for h in range(2):
        for i in range(4):
            scores = []
            for j in range(5):
                r = rel[j - i + 4]
                s = q[h, i] @ k[h, j] + q[h, i] @ r + att.u_bias[h] @ k[h, j] + att.v_bias[h] @ r
                scores.append(s if mask[0, j] else torch.tensor(-math.inf))
            ref = torch.softmax(torch.stack(scores), 0)  # unscaled (TENER)
            torch.testing.assert_close(probs[0, h, i], ref, atol=1e-5, rtol=1e-5)


def test_relative_sinusoid_is_direction_aware():
    rel = relative_sinusoid(4, 8)  # rows: delta = -3 .. 3
    left, right = rel[3 - 2], rel[3 + 2]
    torch.testing.assert_close(left[:4], -right[:4])  # sin part is odd
    torch.testing.assert_close(left[4:], right[4:])  # cos part is even


def test_symmetric_rel_pos_loses_direction():
    torch.manual_seed(0)
    sym = RelativeMultiHeadAttention(8, 2, rel_pos="symmetric")
    full = RelativeMultiHeadAttention(8, 2, rel_pos="full")
    full.load_state_dict(sym.state_dict())
    x = torch.zeros(1, 3, 8)  # identical tokens: only positions distinguish left from right
    mask = torch.ones(1, 3, dtype=torch.bool)
    p_sym = sym(x, mask)[1][0, :, 1]
    p_full = full(x, mask)[1][0, :, 1]
    torch.testing.assert_close(p_sym[:, 0], p_sym[:, 2])
    assert not torch.allclose(p_full[:, 0], p_full[:, 2])


def test_dilated_conv_chain_vs_parallel_and_masking():
    torch.manual_seed(0)
    par = DilatedConvBlock(3, (1, 2), chain=False)
    chain = DilatedConvBlock(3, (1, 2), chain=True)
    chain.load_state_dict(par.state_dict())
    x = torch.randn(1, 5, 5, 3)
    mask = grid_mask(torch.tensor([4]), 5)
    a, b = par(x, mask), chain(x, mask)
    torch.testing.assert_close(a[..., :3], b[..., :3])  # rate 1 reads the input in both
    assert not torch.allclose(a[..., 3:], b[..., 3:])  # rate 2 reads rate 1's output when chained
    assert (a[0, 4] == 0).all() and (a[0, :, 4] == 0).all()  # padded cells stay zero
    # Padding content never leaks into real cells.
    y = x.clone()
    y[0, 4] = 100.0
    torch.testing.assert_close(par(y, mask), a)


def test_dilated_conv_block_output_is_contiguous_channels_last():
    # The grid matmuls after it (tag projection, predictor MLP) read it without a transposed copy.
    blk = DilatedConvBlock(4, (1, 2, 3))
    out = blk(torch.randn(2, 6, 6, 4), grid_mask(torch.tensor([6, 3]), 6))
    assert out.shape == (2, 6, 6, 12) and out.is_contiguous()


def test_masked_row_col_max_without_autograd_gives_the_same_values():
    torch.manual_seed(0)
    mask = grid_mask(torch.tensor([5, 2]), 5)
    x = torch.randn(2, 5, 5, 3, requires_grad=True)
    with_grad = masked_row_col_max(x, mask)
    with torch.inference_mode():
        without = masked_row_col_max(x.detach(), mask)
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_masked_row_col_max_ignores_padding():
    x = torch.tensor([[[[1.0], [5.0]], [[-2.0], [9.0]]]])  # (1, 2, 2, 1)
    mask = torch.tensor([[[True, False], [True, False]]])
    rows, cols = masked_row_col_max(x, mask)
    torch.testing.assert_close(rows, torch.tensor([[[1.0], [-2.0]]]))
    torch.testing.assert_close(cols, torch.tensor([[[1.0], [0.0]]]))  # column 1 has no real cell


def reference_masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """masked_fill + amax with autograd's own backward: the reference for the custom one."""
    neg = torch.finfo(x.dtype).min
    out = x.masked_fill(~mask[..., None], neg).amax(dim=dim)
    return out.masked_fill(out == neg, 0.0)


def test_masked_row_col_max_values_and_gradients_match_the_reference():
    torch.manual_seed(0)
    lengths = torch.tensor([6, 4, 1])
    mask = grid_mask(lengths, 6)
    x = torch.randn(3, 6, 6, 5, dtype=torch.float64, requires_grad=True)
    g_rows, g_cols = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(3, 6, 5, dtype=torch.float64)
    rows, cols = masked_row_col_max(x, mask)
    (rows * g_rows + cols * g_cols).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    ref_rows, ref_cols = reference_masked_max(x, mask, 2), reference_masked_max(x, mask, 1)
    (ref_rows * g_rows + ref_cols * g_cols).sum().backward()
    torch.testing.assert_close(rows, ref_rows)
    torch.testing.assert_close(cols, ref_cols)
    torch.testing.assert_close(fast, x.grad)
    assert fast[~mask].abs().sum() == 0  # padded cells never receive gradient
    assert rows[1, 4:].abs().sum() == 0 and cols[2, 1:].abs().sum() == 0  # padded rows/columns: 0
    assert torch.autograd.gradcheck(lambda t: masked_row_col_max(t, mask), (x.detach().requires_grad_(),))


def test_zlpr_matches_formula():
    s = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
    y = torch.tensor([[True, False, False], [False, False, False]])
    expected = torch.tensor(
        [
            math.log(1 + math.exp(-1.0) + math.exp(0.5)) + math.log(1 + math.exp(-2.0)),
            math.log(1 + math.exp(-3.0) + math.exp(-2.0) + math.exp(-1.0)) + math.log(1.0),
        ]
    )
    torch.testing.assert_close(zlpr(s, y), expected)


def test_grid_loss_ce_over_valid_cells():
    logits = torch.randn(1, 3, 3, 4)
    targets = torch.randint(0, 4, (1, 3, 3))
    mask = grid_mask(torch.tensor([2]), 3)
    out = GridLoss("ce")(logits, targets, mask)["loss"]
    ref = torch.nn.functional.cross_entropy(logits[0, :2, :2].reshape(-1, 4), targets[0, :2, :2].reshape(-1))
    torch.testing.assert_close(out, ref)


def test_dilated_depthwise_uses_space_to_batch_only_for_cpu_bf16_training(monkeypatch):
    import crener.layers as layers

    calls = []
    real = layers.space_to_batch_conv
    monkeypatch.setattr(layers, "space_to_batch_conv", lambda conv, h: calls.append(1) or real(conv, h))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=2)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    ref = conv(x)
    torch.testing.assert_close(layers.dilated_depthwise(conv, x), ref)  # fp32: the library's conv
    with torch.no_grad():
        layers.dilated_depthwise(conv, x)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layers.dilated_depthwise(conv, x)
    assert calls == [1]
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)  # bf16 rounding only
    layers.dilated_depthwise(conv.bfloat16(), x.detach().bfloat16().requires_grad_())
    assert calls == [1, 1]


def test_space_to_batch_dilated_conv_is_exact():
    from crener.layers import space_to_batch_conv

    torch.manual_seed(0)
    for d in (1, 2, 3):
        conv = torch.nn.Conv2d(4, 4, 3, groups=4, dilation=d, padding=d)
        for n in (5, 7, 9):  # multiples of d and not
            x = torch.randn(2, 4, n, n, requires_grad=True)
            y1 = space_to_batch_conv(conv, x)
            y2 = conv(x)
            torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
            g1 = torch.autograd.grad(y1.square().sum(), (x, conv.weight))
            g2 = torch.autograd.grad(y2.square().sum(), (x, conv.weight))
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bilstm_runs_under_cpu_bf16_autocast():
    # oneDNN has no bf16 LSTM on CPU; the layer runs its recurrence in fp32 instead of failing.
    from crener.layers import BiLSTM

    torch.manual_seed(0)
    lstm = BiLSTM(8, 8)
    x, lengths = torch.randn(2, 5, 8), torch.tensor([5, 3])
    ref = lstm(x, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lstm(x.bfloat16(), lengths)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.02, rtol=0.02)  # only the bf16 rounding of x differs


def test_grid_dropout_has_dropouts_law_and_masks_its_gradient():
    from crener.layers import GridDropout

    torch.manual_seed(0)
    x = torch.rand(200, 300, dtype=torch.float64) + 1.0  # no zeros, so dropped cells are visible
    x.requires_grad_()
    drop = GridDropout(0.3, fast=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.01  # 60k draws: sd of the rate is 0.002
    torch.testing.assert_close(y[kept], (x / 0.7)[kept])  # inverted dropout: kept cells scaled
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / 0.7, 0.0))  # the same mask backward
    assert not torch.equal(kept, drop(x) != 0)  # a fresh mask each call
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    assert torch.equal(GridDropout(0.0, fast=True)(x), x)
    assert GridDropout(1.0, fast=True)(x).abs().sum() == 0
    torch.manual_seed(5)
    slow = GridDropout(0.3)(x)  # the default: nn.Dropout's own path
    torch.manual_seed(5)
    assert torch.equal(slow, torch.nn.functional.dropout(x, 0.3, True))
