"""SHA-256 digests of a dataset's files: what a run's identity
(:func:`crener.identity.run_key`) records about its data.

A dataset's digest covers the bytes of each of its split files, named by split, so the same
files under another data root give the same digest and an edited file gives another one. How
the splits are cut (budgets, MSRA protocol, coarse Weibo types) is part of the config, not of
the digest. Files are hashed once per process for each (path, mtime, size).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from crener.config import DataConfig
from crener.data.datasets import get_spec, resolve_data_root
from crener.errors import DataError

CHUNK_BYTES = 1 << 20  # read size while hashing


def file_digest(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, cached on its path, modification time and size."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError("file not found", str(path)) from None
    return _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # only part of the cache key: an edited file is hashed again
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def dataset_digest(cfg: DataConfig, data_root: str | Path | None = None) -> str:
    """Hex SHA-256 over ``split:file digest`` lines of ``cfg.dataset``'s split files, found
    under ``data_root`` (``runtime.data_root``; else ``$CRENER_DATA``, else ``shared/data``)."""
    spec = get_spec(cfg.dataset)
    root = resolve_data_root(data_root)
    lines = [f"{split}:{file_digest(spec.path(split, root))}\n" for split in sorted(spec.files)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
