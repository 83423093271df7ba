"""The dilated-conv group as one kernel: every rate's depthwise 3x3 conv over a masked grid.

:func:`dilated_convs` computes what :class:`crener.layers.DilatedConvBlock` computes without
chaining, ``cat([gelu(conv_r(x * m)) * m for r in rates], -1)`` channels-last, with the convs in
``crener/dconv.c``: one pass over the grid for all rates and taps with GELU applied in
registers, the output written straight into its slice of the concatenation; the backward pass
recomputes the pre-activation instead of keeping it, then gives the input, weight and bias
gradients. Only the inputs are saved for backward. Chained rates (W2NER's) are one call a rate,
each over the previous rate's output (the block's own loop).

The C file is compiled on first use by the machine's C compiler (``$CC``, else ``cc``) with
``-O3 -march=native`` into a cache keyed by the source, the compiler and this CPU
(``$CRENER_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/crener/kernels``), and loaded with ctypes; it
includes no torch header, so a build takes about a second. Where no compiler works the block
falls back to the library's convs, with one warning a process (:func:`kernel`).

The two C entry points are registered as torch custom ops (``crener::dconv_forward`` and
``crener::dconv_backward``), so the profiler names them and ``torch.utils.flop_counter`` counts
their FLOPs (a depthwise conv's backward as twice its forward, as crener.tools.roofline does;
the recomputed forward is not counted, as a checkpointed layer's is not).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("dconv.c")
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
MAX_THREADS = 256  # dconv.c's MAX_THREADS
MAX_DILATION = 64  # and the largest dilation its backward pass's row window holds
_DTYPES = {torch.float32: 0, torch.float64: 1}


def cache_dir() -> Path:
    if os.environ.get("CRENER_KERNEL_CACHE"):
        return Path(os.environ["CRENER_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crener" / "kernels"


def _cpu_id() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on a CPU that has them."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: --jobs copies may build at once, and a reader must
    # never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (and one warning) where it cannot be built."""
    compiler = os.environ.get("CC") or "cc"
    path = shutil.which(compiler)
    if path is None:
        log.warning("no C compiler (%s) found: the dilated convs run as the library's (slower)", compiler)
        return None
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), path.encode(), " ".join(CFLAGS).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"dconv-{key}.so"
    try:
        if not target.exists():
            _build(path, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning(
            "could not build %s (%s): the dilated convs run as the library's (slower)", SOURCE, detail.strip()
        )
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dconv_forward.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]  # fmt: skip
    lib.dconv_backward.argtypes = [ctypes.c_int, *[ptr] * 9, i64, i64, i64, i64, ctypes.c_int]
    lib.dconv_forward.restype = lib.dconv_backward.restype = ctypes.c_int
    return lib


def _threads(rows: int) -> int:
    return max(1, min(torch.get_num_threads(), MAX_THREADS, rows))


@torch.library.custom_op("crener::dconv_forward", mutates_args=())
def dconv_forward(x: torch.Tensor, m: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, dilations: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """gelu(z) (B, N, N, R*C): z rate r's conv of the masked grid in channels r*C..(r+1)*C; zero at masked cells.

    x (B, N, N, C), m (B, N, N) bool, w (R, 9, C), bias (R, C), dilations (R,) int64; all contiguous.
    """
    b, n, _, c = x.shape
    r = w.size(0)
    out = torch.empty(b, n, n, r * c, dtype=x.dtype)
    kernel().dconv_forward(_DTYPES[x.dtype], x.data_ptr(), m.data_ptr(), w.data_ptr(), bias.data_ptr(),
                           dilations.data_ptr(), out.data_ptr(), r, b, n, c, _threads(b * n))  # fmt: skip
    return out


@torch.library.custom_op("crener::dconv_backward", mutates_args=())
def dconv_backward(g: torch.Tensor, x: torch.Tensor, m: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, dilations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad x, grad w, grad bias) from g, the gradient at :func:`dconv_forward`'s output (contiguous)."""
    b, n, _, c = x.shape
    r = w.size(0)
    threads = _threads(b * n)
    gx = torch.empty_like(x)
    # One partial sum a thread, added here in thread order: the result does not depend on timing.
    gw = torch.zeros(threads, r, 9, c, dtype=x.dtype)
    gb = torch.zeros(threads, r, c, dtype=x.dtype)
    rc = kernel().dconv_backward(_DTYPES[x.dtype], x.data_ptr(), m.data_ptr(), w.data_ptr(), bias.data_ptr(),
                                 dilations.data_ptr(), g.data_ptr(), gx.data_ptr(), gw.data_ptr(), gb.data_ptr(),
                                 r, b, n, c, threads)  # fmt: skip
    if rc:
        raise MemoryError(f"crener/dconv.c: no memory for the backward pass's rows ({n} cells a row)")
    return gx, gw.sum(0), gb.sum(0)


def _dense_flops(x_shape, w_shape) -> int:  # noqa: ANN001 - torch.Size
    b, n, _, c = x_shape
    return 2 * 9 * b * n * n * c * w_shape[0]


@register_flop_formula(torch.ops.crener.dconv_forward)
def _forward_flops(x_shape, m_shape, w_shape, *args, **kwargs) -> int:  # noqa: ANN001, ARG001
    return _dense_flops(x_shape, w_shape)


@register_flop_formula(torch.ops.crener.dconv_backward)
def _backward_flops(g_shape, x_shape, m_shape, w_shape, *args, **kwargs) -> int:  # noqa: ANN001, ARG001
    return 2 * _dense_flops(x_shape, w_shape)  # input and weight gradients


class _DilatedConvs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m, w, bias, dilations):  # noqa: ANN001, ANN205
        # Only the inputs are kept: the backward pass recomputes z (crener/dconv.c says why).
        ctx.save_for_backward(x, m, w, bias, dilations)
        return dconv_forward(x, m, w, bias, dilations)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, m, w, bias, dilations = ctx.saved_tensors
        gx, gw, gb = dconv_backward(grad.contiguous(), x, m, w, bias, dilations)
        return gx, None, gw, gb, None


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def fits(convs, x: torch.Tensor) -> bool:  # noqa: ANN001 - the block's nn.ModuleList
    """Whether :func:`dilated_convs` computes these convs of x: 3x3 depthwise convs with biases on
    CPU, a kernel that built, and x in fp32 or fp64, or in fp32 or bf16 when training under bf16
    autocast."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        # Evaluation under bf16 autocast keeps the library's bf16 convs: without a backward pass
        # they were the faster (the budget probe's dev scoring, 2026-12-07).
        training = _bf16_autocast() and torch.is_grad_enabled()
        if not training or x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.dtype not in _DTYPES:
        return False
    if not all(
        c.kernel_size == (3, 3) and c.groups == c.in_channels == c.out_channels and c.bias is not None
        and c.dilation[0] == c.dilation[1] == c.padding[0] == c.padding[1] <= MAX_DILATION and c.stride == (1, 1)
        for c in convs
    ):  # fmt: skip
        return False
    return kernel() is not None


def dilated_convs(convs, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``cat([gelu(conv(x * m)) * m for conv in convs], -1)`` for channels-last x (B, N, N, C) and
    a bool mask (B, N, N): the block's output, (B, N, N, len(convs) * C). Check :func:`fits` first.

    Under bf16 autocast the kernel still computes in fp32 (there is no bf16 arithmetic in it; its
    cost is memory traffic, not multiplies) and the result takes the dtype the library's path
    gives: bf16 convs times x's dtype's mask, so fp32 for an fp32 grid and bf16 for a bf16 one.
    """
    out_dtype = x.dtype
    if _bf16_autocast():
        out_dtype = torch.promote_types(torch.bfloat16, x.dtype)
        x = x.float()
    c = x.size(-1)
    w = torch.stack([conv.weight.reshape(c, 9) for conv in convs]).transpose(1, 2).contiguous().to(x.dtype)
    bias = torch.stack([conv.bias for conv in convs]).to(x.dtype)
    dilations = torch.tensor([conv.dilation[0] for conv in convs], dtype=torch.int64)
    out = _DilatedConvs.apply(x.contiguous(), mask.to(torch.bool).contiguous(), w, bias, dilations)
    return out.to(out_dtype)
