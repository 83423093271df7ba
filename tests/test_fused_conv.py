"""The fused dilated-conv path (``runtime.fused_conv``) computes what the plain one does.

``DilatedConvBlock(fused=True)`` replaces GELU, the mask multiplies and the concatenation with one
autograd op; every test here flips ``blk.fused`` on one block, so both paths share the weights.
"""

from __future__ import annotations

import pytest
import torch

from crener.data.features import grid_mask
from crener.layers import DilatedConvBlock

# (batch, N, channels, dilations, lengths): N a multiple of no rate, of some rates, of every one.
SHAPES = [
    (2, 7, 4, (1, 2, 3), (7, 4)),
    (3, 6, 8, (1, 2, 3), (6, 1, 5)),
    (1, 9, 16, (2, 3), (8,)),
    (2, 5, 3, (1, 4), (5, 2)),
]


def block(channels: int, dilations: tuple[int, ...], chain: bool, seed: int = 0) -> DilatedConvBlock:
    torch.manual_seed(seed)
    blk = DilatedConvBlock(channels, dilations, chain=chain)
    for conv in blk.convs:  # non-zero biases, so a bias leaking into padded cells would show
        torch.nn.init.normal_(conv.bias)
    return blk


def run(blk: DilatedConvBlock, fused: bool, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor):
    """The output and the gradients of (output * weight).sum() w.r.t. x and every conv parameter."""
    blk.fused = fused
    x = x.detach().requires_grad_()
    out = blk(x, mask)
    grads = torch.autograd.grad((out * weight).sum(), (x, *blk.parameters()))
    return out.detach(), grads


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize(("b", "n", "c", "dilations", "lengths"), SHAPES)
def test_fused_equals_plain_values_and_gradients(chain, b, n, c, dilations, lengths):
    blk = block(c, dilations, chain)
    torch.manual_seed(1)
    x = torch.randn(b, n, n, c)
    mask = grid_mask(torch.tensor(lengths), n)
    weight = torch.randn(b, n, n, c * len(dilations))
    out_plain, g_plain = run(blk, False, x, mask, weight)
    out_fused, g_fused = run(blk, True, x, mask, weight)
    assert out_fused.shape == out_plain.shape and out_fused.is_contiguous()
    torch.testing.assert_close(out_fused, out_plain, atol=1e-6, rtol=1e-6)  # fp32 summation order
    assert len(g_fused) == 1 + 2 * len(dilations)
    # Chained, a later rate's weight gradient sums products of the earlier rates' outputs, whose
    # own fp32 rounding already differs by summation order: a little more absolute slack.
    atol = 5e-6 if chain else 1e-6
    for a, p in zip(g_fused, g_plain):
        torch.testing.assert_close(a, p, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("chain", [False, True])
def test_fused_gradients_of_a_plain_sum(chain):
    # .sum()'s gradient arrives as an expanded tensor (zero strides): slicing it must still work.
    blk = block(4, (1, 2, 3), chain)
    x = torch.randn(2, 5, 5, 4)
    mask = grid_mask(torch.tensor([5, 3]), 5)
    grads = []
    for fused in (False, True):
        blk.fused = fused
        x_ = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(blk(x_, mask).sum(), (x_, *blk.parameters())))
    for a, p in zip(*grads):
        torch.testing.assert_close(a, p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chain", [False, True])
def test_fused_gradcheck_in_float64(chain):
    blk = block(2, (1, 2), chain).double()
    blk.fused = True
    names = [name for name, _ in blk.named_parameters()]
    mask = grid_mask(torch.tensor([4, 3]), 4)

    def f(x, *params):
        return torch.func.functional_call(blk, dict(zip(names, params)), (x, mask))

    torch.manual_seed(2)
    x = torch.randn(2, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in blk.parameters()]
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("chain", [False, True])
def test_fused_padded_cells_are_zero_and_padding_never_leaks(chain):
    blk = block(4, (1, 2, 3), chain)
    blk.fused = True
    mask = grid_mask(torch.tensor([6, 3]), 6)
    x = torch.randn(2, 6, 6, 4)
    garbage = x.clone()
    garbage[~mask] = 1e4  # padded cells hold anything
    a = blk(x, mask)
    g = garbage.requires_grad_()
    out = blk(g, mask)
    assert (out[~mask] == 0).all()
    assert torch.equal(out, a)  # the padded cells' content changes nothing, bit for bit
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), g)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_under_bf16_autocast_matches_plain(chain, dtype):
    # fp32 input: the convs give bf16 while the mask is fp32 (a wider output); bf16 input: one dtype.
    # space_to_batch is on (the default), so the rates d > 1 arrive as strided sub-grid results.
    blk = block(8, (1, 2, 3), chain)
    x = torch.randn(2, 7, 7, 8).to(dtype)
    mask = grid_mask(torch.tensor([7, 5]), 7)
    weight = torch.randn(2, 7, 7, 24)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(blk, fused, x, mask, weight))
    (out_plain, g_plain), (out_fused, g_fused) = results
    assert out_fused.dtype == out_plain.dtype
    assert (out_fused[~mask] == 0).all()
    for a, p in zip(g_fused, g_plain):
        assert a.dtype == p.dtype
    if chain:
        # The library path rounds every rate's conv to bf16 and feeds it to the next, so along
        # the chain it drifts from the kernel, which convolves in fp32: the kernel is held to the
        # fp32 result instead, within the rounding of the bf16 grid where the input is bf16.
        out_plain, g_plain = run(blk, False, x.float(), mask, weight)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
    else:
        tol = 1e-2
    torch.testing.assert_close(out_fused.float(), out_plain.float(), atol=tol, rtol=tol)
    for a, p in zip(g_fused, g_plain):
        torch.testing.assert_close(a.float(), p.float(), atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("chain", [False, True])
def test_fused_in_eval_without_autograd(chain):
    blk = block(4, (1, 2, 3), chain).eval()
    x = torch.randn(2, 5, 5, 4)
    mask = grid_mask(torch.tensor([5, 2]), 5)
    with torch.no_grad():
        plain = blk(x, mask)
        blk.fused = True
        fused = blk(x, mask)
    assert fused.grad_fn is None
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(blk(x, mask), plain, atol=1e-6, rtol=0)


def test_wider_output_keeps_gelu_in_the_inputs_dtype():
    # bf16 pre-activations with an fp32 mask (fp32 grid under autocast): the plain path rounds
    # GELU to bf16 before the fp32 mask multiply, and so must the fused one.
    from crener.layers import _gelu_mask_into

    z = torch.randn(2, 3, 5, 5).bfloat16()
    m = grid_mask(torch.tensor([5, 3]), 5)[:, None].float()
    out = _gelu_mask_into(z, m, torch.empty(2, 3, 5, 5))
    assert torch.equal(out, torch.nn.functional.gelu(z) * m)
