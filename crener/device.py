"""Device code in one place: which device a run uses, bf16 autocast and whether it pays, host
synchronisation, and peak memory (accelerator allocation, process resident set size).

Everything here is what training, inference and the measuring tools (bench, roofline, gpucheck) share
about the machine they run on; nothing here knows about models or data.
"""

from __future__ import annotations

import functools
import logging
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from crener.errors import CrenerError

log = logging.getLogger(__name__)

# Matmul shapes of a grid step (cells x in x out): the 1x1 reduction, the predictor MLP, the
# biaffine, and two large ones (a step's biggest matmuls run faster than the small grid shapes,
# so a peak from those alone would understate it); the peak is the best of them.
MATMUL_PEAK_SHAPES = ((16384, 512, 96), (16384, 288, 288), (4096, 512, 512), (2048, 1024, 1024),
                      (8192, 1024, 1024), (2048, 2048, 2048))  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrenerError(f"runtime.device={name} but CUDA is not available; use runtime.device=cpu")
    return device


# Where bf16 matmuls run at least this many times faster than fp32 ones, `train.bf16=auto` picks
# bf16: on CPUs with AMX the whole step then runs well above its fp32 speed, while where bf16
# matmuls are emulated (slower than fp32) every bf16 step is slower.
BF16_MIN_MATMUL_RATIO = 2.0
# The first look (one warm call) must reach this fraction of that bar for the full measurement to
# run: emulated bf16 measures at a few percent of fp32, real bf16 units at several times it.
BF16_FIRST_LOOK_MARGIN = 4.0


@functools.cache
def bf16_pays(device_name: str = "auto") -> bool:
    """Whether bf16 autocast should be used on ``runtime.device`` (what ``train.bf16=auto`` means).

    CUDA: if the device supports bf16. CPU: if bf16 matmuls at the grid's shapes measure at least
    :data:`BF16_MIN_MATMUL_RATIO` times the fp32 rate, in this process (about a second, once).
    """
    device = resolve_device(device_name)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    shapes = ((16384, 512, 96), (4096, 512, 512))
    fp32 = matmul_gflops(torch.float32, shapes, reps=3)
    # Where bf16 is emulated it runs tens of times under fp32, and the full measurement takes
    # seconds a process: one warm call of the first shape, far under the bar, settles it first.
    bf16 = matmul_gflops(torch.bfloat16, shapes[:1], reps=1, warmup=1)
    if bf16 >= BF16_MIN_MATMUL_RATIO * fp32 / BF16_FIRST_LOOK_MARGIN:
        bf16 = matmul_gflops(torch.bfloat16, shapes, reps=3)
    pays = bf16 >= BF16_MIN_MATMUL_RATIO * fp32
    log.info(
        "train.bf16=auto: bf16 matmuls at %.1fx fp32 on this CPU: %s", bf16 / fp32, "bf16" if pays else "fp32"
    )
    return pays


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# timing and peaks


def timings(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_seconds(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    return min(timings(fn, reps, warmup))


def matmul_gflops(dtype: torch.dtype, shapes=MATMUL_PEAK_SHAPES, reps: int = 5, warmup: int = 2) -> float:
    """The best matmul rate over ``shapes`` in ``dtype`` (fp32 accumulation is the library's), each
    shape timed ``reps`` times after ``warmup`` untimed calls."""
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(k, n, generator=gen).to(dtype)
        best = max(best, 2 * m * k * n / best_seconds(lambda: a @ b, reps, warmup) / 1e9)  # noqa: B023
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


@functools.cache
def _glibc_malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); False where the C
    library has none.

    A loop whose tensors change shape every step (length-bucketed batches) fragments glibc's heap:
    once a freed tensor raises the library's dynamic mmap threshold, later tensors of up to 32 MB come
    from the heap, whose free pages are kept. Pretraining's resident memory then grew by gigabytes an
    hour without any object leaking; trimming every few steps keeps it at the working set."""
    fn = _glibc_malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    """Start the process's peak-RSS mark afresh at its current RSS (Linux ``clear_refs`` 5), so a
    step's own peak shows even when loading the model once reached a higher one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_bytes("VmHWM") is not None


class CpuPeak:
    """Peak resident memory of a stretch of code above the RSS at its start: the kernel's
    resettable high-water mark where it exists, else the lifetime peak (which hides a stretch
    that stays below what came before, so it is only a fallback)."""

    def __init__(self) -> None:
        self.lifetime = rss_peak()  # before any reset, for process_peak_bytes
        self.base, self.resettable = 0, False

    def start(self) -> None:
        if _reset_rss_peak():
            self.base = status_bytes("VmRSS") or 0
            self.resettable = True
        else:
            self.base, self.resettable = rss_peak(), False

    def peak(self) -> int:
        now = status_bytes("VmHWM") if self.resettable else rss_peak()
        self.lifetime = max(self.lifetime, now or 0)
        return max((now or 0) - self.base, 0)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label() -> str:
    """``"<CPU>, N cores"`` (and the GPU where one is visible): what a run's figures hold for."""
    import os

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_name()}, {os.cpu_count()} cores{gpu}"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they hold for this machine only."""
    import datetime
    import os

    from crener.workspace import git_commit

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip


def machine_stamp() -> str:
    """``"<CPU>, N cores[, GPU], torch V, commit `abc1234`, DATE"``: how a generated page says what
    its figures were made on."""
    m = machine_info()
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']}, {m['cores']} cores{gpu}, torch {m['torch']}, commit `{str(m['commit'])[:7]}`, {m['date']}"


def _main(argv: list[str]) -> int:
    """``python -m crener.device bf16-pays DEVICE``: print ``true`` or ``false`` (what
    ``train.bf16=auto`` resolves to), for a process that builds configs without loading torch."""
    import json
    import sys

    if len(argv) != 2 or argv[0] != "bf16-pays":
        print("usage: python -m crener.device bf16-pays DEVICE", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        pays = bf16_pays(argv[1])
    except CrenerError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(pays))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
