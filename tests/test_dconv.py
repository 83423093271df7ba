"""The dilated-conv kernel (crener/dconv.c through crener.dconv): what it computes, where it runs.

tests/test_fused_conv.py already compares ``fused=True`` with the plain path on every shape; in
fp32 and fp64 that is this kernel, chained or not. Here: that it is the kernel that ran, its gradients
in float64 against finite differences, thread counts, its FLOPs and profiler names, the build
cache, and the fallback where no compiler works.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from crener import dconv
from crener.data.features import grid_mask
from crener.layers import DilatedConvBlock


def block(channels: int, dilations: tuple[int, ...], seed: int = 0) -> DilatedConvBlock:
    torch.manual_seed(seed)
    blk = DilatedConvBlock(channels, dilations, fused=True)
    for conv in blk.convs:  # non-zero biases, so a bias leaking into padded cells would show
        torch.nn.init.normal_(conv.bias)
    return blk


def reference(blk: DilatedConvBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """eq. 8 written out with the library's convs."""
    m = mask[:, None].to(x.dtype)
    h = x.permute(0, 3, 1, 2) * m
    return torch.cat([(torch.nn.functional.gelu(conv(h)) * m).permute(0, 2, 3, 1) for conv in blk.convs], -1)


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """A kernel built into an empty cache; the process's own cached kernel is restored after."""
    monkeypatch.setenv("CRENER_KERNEL_CACHE", str(tmp_path / "kernels"))
    dconv.kernel.cache_clear()
    yield tmp_path / "kernels"
    dconv.kernel.cache_clear()


def test_the_kernel_runs_and_matches_the_library():
    blk = block(6, (1, 2, 3))
    x = torch.randn(3, 8, 8, 6, requires_grad=True)
    mask = grid_mask(torch.tensor([8, 5, 1]), 8)
    out = blk(x, mask)
    assert type(out.grad_fn).__name__ == "_DilatedConvsBackward"
    assert out.shape == (3, 8, 8, 18) and out.is_contiguous()
    ref = reference(blk, x, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *blk.parameters()), g)
    want = torch.autograd.grad(ref, (x, *blk.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n", "dilations", "lengths"), [(5, (1, 2, 3), (5, 3)), (4, (2, 5), (4, 2))])
def test_gradcheck_in_float64_through_the_kernel(n, dilations, lengths):
    # A dilation of 5 over a grid of 4: every tap but the centre falls outside.
    blk = block(3, dilations).double()
    mask = grid_mask(torch.tensor(lengths), n)
    names = [name for name, _ in blk.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(blk, dict(zip(names, params)), (x, mask))

    x = torch.randn(len(lengths), n, n, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in blk.parameters()]
    assert type(f(x, *params).grad_fn).__name__ == "_DilatedConvsBackward"
    assert torch.autograd.gradcheck(f, (x, *params))


def test_a_strided_input_and_a_float_mask_give_the_same_result():
    blk = block(4, (1, 2, 3))
    x = torch.randn(2, 4, 6, 6)  # channels first, seen channels-last: not contiguous
    mask = grid_mask(torch.tensor([6, 4]), 6)
    view = x.permute(0, 2, 3, 1)
    assert not view.is_contiguous()
    torch.testing.assert_close(blk(view, mask.float()), blk(view.contiguous(), mask), atol=0, rtol=0)


def test_thread_counts_agree_and_one_count_repeats_bit_for_bit():
    blk = block(8, (1, 2, 3))
    x = torch.randn(2, 11, 11, 8)
    mask = grid_mask(torch.tensor([11, 7]), 11)
    g = torch.randn(2, 11, 11, 24)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            x_ = x.clone().requires_grad_()
            out = blk(x_, mask)
            grads = torch.autograd.grad(out, (x_, *blk.parameters()), g)
            if threads in results:
                assert all(torch.equal(a, b) for a, b in zip(grads, results[threads][1]))
            results[threads] = (out, grads)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        # The output and input gradient are per cell; the weight sums differ in order only.
        assert torch.equal(results[threads][0], results[1][0])
        assert torch.equal(results[threads][1][0], results[1][1][0])
        for a, b in zip(results[threads][1][1:], results[1][1][1:]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flops_are_counted_and_the_profiler_names_the_ops():
    blk = block(4, (1, 2, 3))
    b, n, c, rates = 2, 7, 4, 3
    x = torch.randn(b, n, n, c, requires_grad=True)
    mask = grid_mask(torch.tensor([7, 3]), n)
    forward = 2 * 9 * b * n * n * c * rates
    with FlopCounterMode(display=False) as counter:
        out = blk(x, mask)
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * forward  # the input's and the weights' gradients
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        blk(x, mask).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"crener::dconv_forward", "crener::dconv_backward"} <= names
    assert not any("convolution" in name for name in names)


def test_the_kernel_is_built_once_into_its_cache(fresh_kernel):
    lib = dconv.kernel()
    assert lib is not None
    (built,) = fresh_kernel.glob("dconv-*.so")
    stamp = built.stat().st_mtime_ns
    dconv.kernel.cache_clear()
    assert dconv.kernel() is not None
    # No rebuild, and no temporary file left beside it.
    assert list(fresh_kernel.glob("*")) == [built] and built.stat().st_mtime_ns == stamp


def test_without_a_compiler_the_block_falls_back_with_one_warning(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    blk = block(4, (1, 2, 3))
    x = torch.randn(2, 6, 6, 4)
    mask = grid_mask(torch.tensor([6, 2]), 6)
    with caplog.at_level(logging.WARNING, logger="crener.dconv"):
        out = blk(x, mask)
        blk(x, mask)
    assert type(out.grad_fn).__name__ != "_DilatedConvsBackward"
    torch.testing.assert_close(out, reference(blk, x, mask), atol=1e-6, rtol=0)
    assert [r.getMessage() for r in caplog.records] == [
        "no C compiler (no-such-compiler-here) found: the dilated convs run as the library's (slower)"
    ]
    assert not fresh_kernel.exists()


def test_a_compiler_that_fails_falls_back_and_leaves_nothing(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exists, exits 1
    with caplog.at_level(logging.WARNING, logger="crener.dconv"):
        assert dconv.kernel() is None
    assert "could not build" in caplog.text
    assert list(fresh_kernel.glob("*")) == []


def test_chained_rates_run_the_kernel_once_a_rate():
    """W2NER's chain: each rate's conv reads the previous rate's output, one kernel call a rate."""
    blk = block(5, (1, 2, 3)).double()
    blk.chain = True
    x = torch.randn(2, 9, 9, 5, dtype=torch.float64, requires_grad=True)
    mask = grid_mask(torch.tensor([9, 4]), 9)
    with FlopCounterMode(display=False) as counter:
        out = blk(x, mask)
    assert counter.get_total_flops() == 3 * 2 * 9 * 2 * 81 * 5  # three single-rate kernel calls
    m = mask[:, None].double()
    h, want = x.permute(0, 3, 1, 2), []
    for conv in blk.convs:  # the chain written out with the library's convs
        h = torch.nn.functional.gelu(conv(h * m)) * m
        want.append(h.permute(0, 2, 3, 1))
    ref = torch.cat(want, -1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *blk.parameters()), g)
    exp = torch.autograd.grad(ref, (x, *blk.parameters()), g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    small = block(2, (1, 2)).double()
    small.chain = True
    xs = torch.randn(1, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: small(t, grid_mask(torch.tensor([3]), 4)), (xs,))


@pytest.mark.parametrize("case", ["fp16 autocast", "bfloat16 input", "no bias", "dilation 65"])
def test_where_the_kernel_does_not_apply(case):
    blk = block(4, (1, 65) if case == "dilation 65" else (1, 2))
    x = torch.randn(1, 5, 5, 4)
    if case == "bfloat16 input":  # without autocast
        x = x.bfloat16()
    elif case == "no bias":
        blk.convs[0].bias = None
    if case == "fp16 autocast":
        with torch.autocast("cpu", dtype=torch.float16):
            assert not dconv.fits(blk.convs, x)
    else:
        assert not dconv.fits(blk.convs, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_the_kernel_runs_in_fp32_and_returns_the_librarys_dtype(dtype):
    blk = block(8, (1, 2, 3))
    x = torch.randn(2, 7, 7, 8).to(dtype).requires_grad_()
    mask = grid_mask(torch.tensor([7, 5]), 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dconv.fits(blk.convs, x)
        out = blk(x, mask)
        ref = reference(blk, x, mask)
        with torch.no_grad():  # evaluation keeps the library's bf16 convs
            assert not dconv.fits(blk.convs, x)
            assert blk(x, mask).dtype == dtype
    assert out.dtype == ref.dtype == dtype  # bf16 convs times the grid's own dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == dtype and (grad.float()[~mask] == 0).all()
