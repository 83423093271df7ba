"""Writes that cannot half-happen: checkpoints, generated tables and pages, exports.

:func:`write_atomic` writes a temporary file in the destination's folder, flushes it to the disk
and renames it over the destination, so a reader sees the old file or the new one, never a part:
not after a kill mid-save, and not on a full disk (the temporary file is removed and the error,
an ``OSError`` naming the destination, reaches the command line's one-line report). Standard
library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function writing to a binary file) to ``path``
    whole or not at all; its folder is created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # In the same folder, so the rename stays on one file system (and is atomic); the pid keeps two
    # writers of one file apart, and the leading dot keeps a kill's leftover out of listings.
    tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:
            # A failed write() names no file; the destination is what the user can act on.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot sync a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)
