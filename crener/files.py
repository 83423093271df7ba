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
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from crener.errors import CrenerError

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function writing to a binary file) to ``path``
    whole or not at all; its folder is created. Returns ``path``."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            # A device or a pipe (/dev/stdout, a FIFO): renaming over it would replace the node itself.
            with open(path, "wb") as fh:
                _write(fh, content)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with interrupts_held():
            _replace(path, content)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file; the destination is what to act on
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_folder(path.parent)
    return path


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block is held until it ends, then delivered as usual.

    An interrupt raised inside a library's writer (``torch.save``'s zip archive) is replaced by that
    writer's own error as it unwinds (a RuntimeError about the archive's position), so the command
    failed with a traceback instead of stopping as interrupted. A write takes at most seconds; the
    file is then whole, and the interrupt follows. Main thread only (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if pending:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler: object) -> None:
    """Act on a held signal as ``handler`` (the one in place before the hold) would have."""
    if callable(handler):
        handler(signum, None)  # e.g. Python's KeyboardInterrupt, or the command line's SIGTERM one
    elif handler != signal.SIG_IGN:  # the default action (SIGTERM: the process ends)
        os.kill(os.getpid(), signum)


def _replace(path: Path, content: str | bytes | Callable[[IO[bytes]], object]) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``; on any failure (a full
    disk, an interrupt) the temporary file is removed and ``path`` is as it was."""
    # In the same folder, so the rename stays on one file system (and is atomic); the pid keeps two
    # writers of one file apart, and the leading dot keeps a kill's leftover out of listings.
    tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as fh:
            _write(fh, content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write(fh: IO[bytes], content: str | bytes | Callable[[IO[bytes]], object]) -> None:
    if callable(content):
        content(fh)
    else:
        fh.write(content.encode("utf-8") if isinstance(content, str) else content)


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


def read_text(path: str | os.PathLike, what: str = "a text file") -> str:
    """A user's text file (``--config``, ``predict`` input, ``bench --from-json``) by the rule the
    dataset readers follow: UTF-8, a leading byte-order mark dropped; anything else is a
    :class:`~crener.errors.DataError` naming the file, the line and the byte, and what to do;
    ``what`` (with its article) says what the file should be."""
    from crener.errors import DataError

    path = Path(path)
    if path.is_dir():
        raise DataError(f"is a folder, not {what}; name the file", str(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"no such file ({what} was expected); check the path", str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): a binary file, or "
            "another encoding? Save it as UTF-8",
            str(path),
            line,
        ) from None
    return text.removeprefix("\ufeff")


def check_output_file(path: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output file that cannot be written."""
    if path.is_dir():
        raise CrenerError(
            f"{option} {path} is a folder: name a file in it, e.g. {path / 'predictions.jsonl'}"
        )
    folder = path.parent
    if not folder.is_dir():
        blocker = folder if folder.exists() else _file_above(folder)
        if blocker is not None:
            raise CrenerError(f"{option} {path}: {blocker} is a file, not a folder; name another path")
        raise CrenerError(
            f"{option} {path}: folder {folder} does not exist; create it first (mkdir -p {folder})"
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CrenerError(f"{option} {path}: no permission to write there")


def check_folder(path: str | Path | None, option: str) -> None:
    """Refuse, before any work, a folder to write in (created if missing) that is a file or lies
    under one; ``option`` is how the user named it (``--runs-dir``, ``$CRENER_RUNS``)."""
    if path is None or str(path) == "":
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CrenerError(f"{option} {path} is a file, not a folder; name a folder (it is made if missing)")
    above = _file_above(path)
    if above is not None:
        raise CrenerError(f"{option} {path}: {above} is a file, not a folder; name another path")


def check_page_file(path: str | Path, example: str, option: str = "--page") -> None:
    """Refuse, before any work, a generated page to write that is a folder or lies under a file;
    its folder is made if missing (``write_atomic``). ``example`` is a file name to suggest."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CrenerError(f"{option} {path} is a folder: name a file in it, e.g. {path / example}")
    check_folder(path.parent, f"{option} {path}: folder")


def check_input_file(path: str | Path | None, option: str) -> None:
    """Refuse, before any work, an input file that is missing or a folder."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise CrenerError(f"{option} {path} is a folder, not a file; name the file")
    if not path.exists():
        raise CrenerError(f"{option} {path}: no such file; check the path")


def check_existing_folder(path: str | Path | None, option: str) -> None:
    """Refuse a folder to read from that is missing (a typo) or a file."""
    if path is None:
        return
    path = Path(path).expanduser()
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist; check the path"
        raise CrenerError(f"{option} {path} {what}")


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None
