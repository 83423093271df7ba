"""One config run at most once: workdir, per-key lock, MLflow run reuse, resume.

``run_one(cfg)`` trains ``cfg`` in ``runs/{profile}/{key}`` (:func:`crener.workspace.workdir_for`)
through ``crener.train.fit`` and tracks it in MLflow. ``crener train`` runs one config this way, and
every cell of a sweep (``experiments/``) too. Its guarantees, for a key:

- a ``finished`` MLflow run means done: it is skipped and its summary returned;
- a ``running`` (killed), ``failed`` or interrupted run is reopened under the same run id and
  ``fit`` continues from ``checkpoints/last.pt``; its already-logged epochs are not re-logged;
- there is never more than one MLflow run: a lock file per key (``flock``, dropped by the OS
  even when its holder is SIGKILLed) serialises workers, and lookup + creation happen under it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from crener.config import RunConfig
from crener.errors import CrenerError, StoreError
from crener.identity import run_key
from crener.workspace import resolve_runs_dir, workdir_for

log = logging.getLogger(__name__)

LOCK_DIR_NAME = ".locks"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "history.json"
ADHOC_SWEEP = "adhoc"
# Sweeps whose runs a table sweep (main, ablation) claims when it reaches the same key: single
# `crener train` runs, the encoder ablation's shipped-encoder arm and the claim sweep's cells
# (experiments/configs/claim.toml), which share the main sweep's keys.
SIDE_SWEEPS = (ADHOC_SWEEP, "encoders", "claim")


class CellBusy(CrenerError):
    """Another process holds this cell's lock (and ``wait`` was off)."""


def lock_path(cfg: RunConfig, root: str | Path | None = None) -> Path:
    return resolve_runs_dir(root) / cfg.profile / LOCK_DIR_NAME / f"{run_key(cfg)}.lock"


def read_summary(workdir: Path) -> dict[str, Any] | None:
    """``summary.json`` of a finished workdir (fit writes it last), else None."""
    path = Path(workdir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # a torn write: the run is not finished


def history_epochs(workdir: Path) -> list[tuple[int, dict[str, float]]]:
    """``[(epoch, metrics), ...]`` from the ``history.json`` fit writes: a list of per-epoch
    records ``{"epoch": 1, "train/loss": ..., "dev/f1": ..., ...}``."""
    try:
        records = json.loads((Path(workdir) / HISTORY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [(int(r["epoch"]), {k: float(v) for k, v in r.items() if k != "epoch"}) for r in records]


def _fit(
    cfg: RunConfig, workdir: Path, *, callback: Any, resume: bool, data_root: str | None
) -> dict[str, Any]:
    # Imported here: the training stack (torch) is only loaded when a cell actually trains.
    from crener.train import fit

    return fit(cfg, workdir, callback=callback, resume=resume, data_root=data_root)


def run_one(
    cfg: RunConfig,
    *,
    sweep: str = "adhoc",
    runs_dir: str | Path | None = None,
    resume: bool = True,
    track: bool = True,
    data_root: str | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` unless it already finished; returns fit's summary plus ``run_id``,
    ``workdir`` and ``skipped``.

    ``resume=False`` restarts an unfinished cell from scratch (its old MLflow run is deleted,
    so there is still one run per key); a finished cell is skipped either way. ``wait=False``
    raises :class:`CellBusy` instead of waiting for a worker that holds the cell.
    """
    root = resolve_runs_dir(runs_dir)
    workdir = workdir_for(cfg, root)
    from crener.tracking import file_lock  # (loads mlflow; cheap next to training)

    with file_lock(lock_path(cfg, root), wait=wait) as held:
        if not held:
            raise CellBusy(f"{run_key(cfg)} is being run by another worker")
        if track:
            return _run_tracked(cfg, workdir, sweep=sweep, resume=resume, data_root=data_root)
        return _run_untracked(cfg, workdir, resume=resume, data_root=data_root)


def _run_untracked(cfg: RunConfig, workdir: Path, *, resume: bool, data_root: str | None) -> dict[str, Any]:
    done = read_summary(workdir)
    if done is not None:
        return {**done, "run_id": None, "workdir": str(workdir), "skipped": True}
    if not resume:
        _clear(workdir)
    summary = _fit(cfg, workdir, callback=None, resume=resume, data_root=data_root)
    return {**summary, "run_id": None, "workdir": str(workdir), "skipped": False}


def _run_tracked(
    cfg: RunConfig, workdir: Path, *, sweep: str, resume: bool, data_root: str | None
) -> dict[str, Any]:
    from crener.tracking import Tracker

    tracker = Tracker()
    runs = tracker.find_runs(run_key(cfg))
    if len(runs) > 1:
        log.warning("%d MLflow runs share key %s; using %s", len(runs), run_key(cfg), runs[0].run_id)
    finished = next((r for r in runs if r.finished), None)
    if finished is not None:
        owner = _owner_sweep(finished.tags.get("crener.sweep"), sweep)
        if owner != finished.tags.get("crener.sweep"):
            tracker.set_tags(finished.run_id, {"crener.sweep": owner})
        summary = read_summary(workdir) or tracker.load_summary(finished)
        log.info("%s already finished (run %s): skipped", run_key(cfg), finished.run_id)
        return {**summary, "run_id": finished.run_id, "workdir": str(workdir), "skipped": True}

    previous = runs[0] if runs else None
    if previous is not None and not resume:
        log.info("restarting %s from scratch: deleting unfinished run %s", run_key(cfg), previous.run_id)
        tracker.delete_run(previous.run_id)
        previous = None
        _clear(workdir)
    if previous is not None:
        sweep = _owner_sweep(previous.tags.get("crener.sweep"), sweep)
    monitor_cls = system_metrics_monitor()  # before the run exists: a missing psutil fails cleanly
    logger = tracker.start_run(cfg, sweep=sweep, resume_run_id=previous.run_id if previous else None)
    monitor = None
    if monitor_cls is not None:
        monitor = monitor_cls(logger.run_id, resume_logging=previous is not None, tracking_uri=tracker.uri)
        monitor.start()
    try:
        logger.log_config(cfg)
        summary = read_summary(workdir)
        if summary is not None:
            # Killed between fit's last write and our bookkeeping: log it from disk, do not retrain.
            for epoch, metrics in history_epochs(workdir):
                logger.on_epoch_end(epoch, metrics)
        else:
            summary = _fit(cfg, workdir, callback=logger, resume=resume, data_root=data_root)
        logger.finish(summary, workdir)
    except KeyboardInterrupt:
        logger.fail("interrupted", killed=True)
        raise
    except BaseException as exc:
        logger.fail(exc)
        if _lost_store(exc):
            from crener.tracking import masked_uri

            raise StoreError(
                f"lost the MLflow store {masked_uri(tracker.uri)} during the run ({type(exc).__name__}); the cell's "
                "checkpoints are kept: rerun once the store is back and it resumes"
            ) from exc
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    return {**summary, "run_id": logger.run_id, "workdir": str(workdir), "skipped": False}


def _lost_store(exc: BaseException) -> bool:
    """An MLflow client error caused by the store being unreachable (connection refused or reset)."""
    from mlflow.exceptions import MlflowException

    text = str(exc)
    return isinstance(exc, MlflowException) and any(
        s in text
        for s in ("Connection refused", "ConnectionError", "Max retries exceeded", "connection broken")
    )


def system_metrics_monitor() -> Any:
    """MLflow's system metrics monitor class (CPU, memory, disk, network, GPU per run) when the
    user turned them on with MLflow's own switch, ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true``
    (needs ``psutil``: ``pip install -e '.[system-metrics]'``); else None."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        raise CrenerError(
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is on but psutil is missing: pip install -e '.[system-metrics]'"
        ) from exc
    return SystemMetricsMonitor


def _owner_sweep(tagged: str | None, requested: str) -> str:
    """The sweep a reused run keeps: the one it was made by, except that a table sweep claims a
    side sweep's run (e.g. from ``crener train``) and any sweep claims an ``adhoc`` one, so the
    reports, which select runs by their ``crener.sweep`` tag, do not miss a cell that was trained
    before the sweep reached it, and a later ``crener train`` of the cell never demotes it."""
    if tagged is None or tagged == ADHOC_SWEEP:
        return requested
    return requested if tagged in SIDE_SWEEPS and requested not in SIDE_SWEEPS else tagged


def _clear(workdir: Path) -> None:
    """Forget a previous attempt: checkpoints, history and outputs."""
    if workdir.exists():
        shutil.rmtree(workdir)
