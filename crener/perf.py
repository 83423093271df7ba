"""Process-wide performance settings, applied once by the CLI before any work.

glibc serves allocations above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with fresh ``mmap`` calls and returns them on free, and trims the heap top above 128 KiB. Grid
tensors are a few hundred KiB to many MiB and are allocated and freed every step, so each step
pays page faults and zeroing in the kernel for memory it just gave back (issue 7 measured nearly
half of the released W2NER code's CPU time in the kernel). Raising both thresholds keeps freed
blocks in the heap for the next step to reuse. ``CRENER_MALLOC=default`` keeps glibc's settings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit
TRIM_THRESHOLD = 1 * 2**30  # give memory back to the OS only when 1 GiB lies free at the top


def tune_malloc() -> bool:
    """Apply the thresholds above (Linux/glibc only); returns whether they were applied."""
    if os.environ.get("CRENER_MALLOC", "tuned") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds; glibc defaults stay")
    return ok
