"""Where crener reads and writes, each resolved in one place; no torch, no mlflow.

- runs root: ``--runs-dir``, else ``$CRENER_RUNS``, else ``./runs``; a run's workdir is
  ``<runs>/<profile>/<key>`` (:func:`workdir_for`);
- MLflow store: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``;
  a SQLite store keeps its artifacts beside it in ``mlartifacts/`` (:func:`artifact_root`);
- Optuna storage: ``--storage``, else :data:`OPTUNA_STORAGE` (``optuna.db`` in the working directory);
- the git commit of the checkout this package runs from (:func:`git_commit`).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from crener.config import RunConfig
from crener.errors import CrenerError
from crener.identity import run_key

RUNS_ENV = "CRENER_RUNS"
DEFAULT_RUNS_DIR = "runs"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB_NAME = "mlflow.db"
ARTIFACT_DIR_NAME = "mlartifacts"
SQLITE_PREFIX = "sqlite:///"
OPTUNA_STORAGE = f"{SQLITE_PREFIX}optuna.db"  # crener tune's default study storage, read by reports


def resolve_runs_dir(path: str | Path | None = None) -> Path:
    """``path``, else ``$CRENER_RUNS``, else ``./runs``."""
    return Path(path or os.environ.get(RUNS_ENV) or DEFAULT_RUNS_DIR)


def workdir_for(cfg: RunConfig, root: str | Path | None = None) -> Path:
    """``<runs>/<profile>/<key>``: the folder of the run ``cfg`` (checkpoints, summary, outputs)."""
    return resolve_runs_dir(root) / cfg.profile / run_key(cfg)


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the working directory."""
    if uri:
        return uri
    env = os.environ.get(TRACKING_URI_ENV, "").strip()
    return env or f"{SQLITE_PREFIX}{Path.cwd() / DEFAULT_DB_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths resolve against the cwd); None
    for any other store (a server, PostgreSQL, ...)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return Path(uri[len(SQLITE_PREFIX) :].split("?", 1)[0]).resolve()


def page_address(uri: str) -> str:
    """A store or storage address fit for a committed page: a password masked, a local SQLite path
    made relative to the cwd (an absolute one names the writer's home, not the project's file)."""
    from crener.probe import masked_uri

    db = sqlite_path(uri)
    if db is not None:
        try:
            return "sqlite:///" + db.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return f"sqlite:///…/{db.name}"
    return masked_uri(uri)


def sqlite_tables(db: Path) -> set[str]:
    """The table names of the SQLite database ``db``, read without writing to it (an empty file has
    none); ``sqlite3.DatabaseError`` if it is not one. For refusing, before it is written, a
    database that belongs to another program (MLflow and Optuna add their tables to each other's,
    and to any SQLite file they are given)."""
    import sqlite3

    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def foreign_sqlite(db: Path, marker: str, owner: str) -> str | None:
    """Why the existing SQLite file ``db`` is not ``owner``'s (the tables it has instead), or None
    when it is, or is empty: ``marker`` is a table ``owner`` always makes. Locked or unreadable
    files pass, for the opener's own message."""
    import sqlite3

    try:
        tables = sqlite_tables(db)
    except sqlite3.OperationalError:
        return None
    if not tables or marker in tables:
        return None
    known = (
        "an Optuna storage" if "studies" in tables else "an MLflow store" if "experiments" in tables else None
    )
    shown = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
    return f"{db} is an SQLite database but not {owner}" + (
        f" (it is {known})" if known else f" (tables: {shown})"
    )


def artifact_root(uri: str) -> str | None:
    """``file://.../mlartifacts`` beside a SQLite store; None lets a server or database decide."""
    db = sqlite_path(uri)
    return (db.parent / ARTIFACT_DIR_NAME).as_uri() if db is not None else None


@functools.cache
def git_commit() -> str:
    """HEAD of the checkout this package was imported from (whatever the working directory), or
    ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_store_exists(why: str) -> None:
    """Refuse a SQLite tracking store that does not exist, for a command that only reads runs:
    opening it would create an empty store. ``why`` says what the command cannot do."""
    db = sqlite_path(tracking_uri())
    if db is not None and not db.exists():
        raise CrenerError(
            f"no MLflow store at {db}: {why} (nothing was created); set MLFLOW_TRACKING_URI to the "
            "store, or run the command in the folder of its mlflow.db"
        )
