"""Where the cells of ``crener reproduce`` run: here (``local``) or on a Dask cluster (``dask``).

Dask (``distributed``) rather than Ray: it is pure Python and small (a scheduler and worker
processes, no object store or raylets to feed on a 2-core box), retries a task whose worker died
on another worker (``distributed.scheduler.allowed-failures``), schedules by declared resources
(workers started with ``--resources GPU=1``, cells submitted with ``--gpus-per-cell 1``), has a
live dashboard, and reaches clusters through ``dask-jobqueue`` (Slurm, PBS, SGE) and
``dask-kubernetes`` without changes here: start workers there, point ``--address`` at the
scheduler. Ray would give the same scheduling with a heavier footprint.

Each cell is one task. The guarantees stay where they were, in :func:`crener.runner.run_one`:
the per-key lock (``flock``, released by the OS when a worker is SIGKILLed) and the run-once key
mean a retried or duplicated task finds the cell finished, or reopens its MLflow run and resumes
from ``checkpoints/last.pt``, never logging a second run or an epoch twice. Workers need the
same runs directory and tracking store as the client: paths are made absolute and the tracking
URI is passed with each task; on a cluster use a shared filesystem and a tracking server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crener.identity import run_key

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")
DEFAULT_DASHBOARD = "127.0.0.1:8787"
# Worker deaths a cell may see before the scheduler gives up on it (Dask's default is 3).
ALLOWED_FAILURES = 6


def cell_task(
    cfg: Any, sweep: str, runs_dir: str, data_root: str | None, tracking_uri: str
) -> dict[str, Any]:
    """Run one cell in a Dask worker (waits for a cell another worker holds)."""
    from crener.runner import run_one
    from crener.workspace import TRACKING_URI_ENV

    os.environ[TRACKING_URI_ENV] = tracking_uri
    t0 = time.monotonic()
    out = run_one(cfg, sweep=sweep, runs_dir=runs_dir, data_root=data_root, wait=True)
    return {"skipped": bool(out.get("skipped")), "run_id": out.get("run_id"), "seconds": time.monotonic() - t0,
            "dev_f1": out.get("dev", {}).get("f1"), "test_f1": out.get("test", {}).get("f1"), "pid": os.getpid()}  # fmt: skip


# What to do about a scheduler address that does not answer (the message's last part).
SCHEDULER_HOW = (
    "pass the tcp://HOST:PORT that `dask scheduler` prints, or its --scheduler-file JSON, or leave "
    "--address out for a local cluster"
)


def check_scheduler(address: str) -> None:
    """Refuse within seconds (:class:`~crener.errors.StoreError`, one line) a ``--address`` where
    no Dask scheduler answers: a scheduler file that is missing or names no address, an address
    of another scheme, a closed port, another service. Dask would wait 30 s, then raise a
    traceback; a scheduler file it does not find it waits for."""
    import json

    from crener.errors import StoreError
    from crener.probe import check_server

    if address.endswith(".json"):
        path = Path(address)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise StoreError(
                f"--address {address}: cannot read the scheduler file ({reason}); {SCHEDULER_HOW}"
            ) from None
        if not isinstance(info, dict) or not isinstance(info.get("address"), str):
            raise StoreError(
                f"--address {address}: not a Dask scheduler file (no address in it); {SCHEDULER_HOW}"
            )
        address = info["address"]
    if "://" not in address:
        address = f"tcp://{address}"  # Dask's default protocol
    if address.split("://", 1)[0] not in ("tcp", "tls"):
        raise StoreError(
            f"--address {address}: not a Dask scheduler address (tcp://HOST:PORT); {SCHEDULER_HOW}"
        )
    check_server(address, "the Dask scheduler", SCHEDULER_HOW)


def connect(address: str | None, workers: int, threads: int, dashboard: str = DEFAULT_DASHBOARD):  # noqa: ANN201
    """A client of the cluster at ``address`` (``tcp://host:port`` or a scheduler file), else of
    a local cluster of ``workers`` processes with ``threads`` CPU threads each, bound to loopback."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES})
    if address:
        if address.endswith(".json"):
            return Client(scheduler_file=address)
        return Client(address)
    # A worker process per cell at a time; its torch threads come from the cell (runtime.threads).
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=dashboard, env=env)  # fmt: skip
    return Client(cluster)


@contextmanager
def dask_session(address: str | None, workers: int, threads: int) -> Iterator[Any]:
    """:func:`connect`, closing the client (and the local cluster it started) afterwards."""
    client = connect(address, workers, threads)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not address:
            cluster.close()


def run_cells_dask(
    cells: list[Any],
    client: Any,
    *,
    runs_dir: str | None,
    data_root: str | None,
    gpus_per_cell: int = 0,
    retries: int = 1,
) -> tuple[int, list[tuple[str, str]]]:
    """Submit every cell, log each as it completes; ``(trained count, [(label, error)])``."""
    from distributed import as_completed

    from crener.workspace import resolve_runs_dir, tracking_uri

    root = str(resolve_runs_dir(runs_dir).resolve())
    data = str(Path(data_root).resolve()) if data_root else None
    uri = tracking_uri()
    resources = {"GPU": gpus_per_cell} if gpus_per_cell else None
    futures = {}
    for cell in cells:
        fut = client.submit(cell_task, cell.cfg, cell.sweep, root, data, uri, key=f"cell-{cell.sweep}-{run_key(cell.cfg)}",
                            pure=False, retries=retries, resources=resources)  # fmt: skip
        futures[fut] = cell
    dashboard = getattr(client, "dashboard_link", None)
    log.info("%d cells submitted to %s%s", len(cells), client.scheduler.address,
             f"; dashboard {dashboard}" if dashboard else "")  # fmt: skip
    ran, failed, done = 0, [], 0
    for fut in as_completed(futures):
        cell = futures[fut]
        done += 1
        try:
            out = fut.result()
        except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the sweep
            failed.append((cell.label, f"{type(exc).__name__}: {exc}"))
            log.error("[%d/%d] %s %s: FAILED: %s", done, len(cells), cell.sweep, cell.label, failed[-1][1])
            continue
        ran += not out["skipped"]
        log.info("[%d/%d] %s %s: %s dev F1 %.4f, test F1 %.4f (%.0f s)", done, len(cells), cell.sweep, cell.label,
                 "already finished," if out["skipped"] else "done,", out["dev_f1"] or float("nan"),
                 out["test_f1"] or float("nan"), out["seconds"])  # fmt: skip
    log.info("%d cell(s): %d trained, %d already finished, %d failed", len(cells), ran,
             len(cells) - ran - len(failed), len(failed))  # fmt: skip
    return ran, failed


def tune_task(kwargs: dict[str, Any], tracking_uri: str) -> int:
    """One ``crener tune`` worker in a Dask worker: its trials on the shared study."""
    from crener.workspace import TRACKING_URI_ENV
    from experiments.tune import tune

    os.environ[TRACKING_URI_ENV] = tracking_uri
    study = tune(**kwargs)
    return len(study.trials)


def tune_on_dask(client: Any, workers: int, kwargs: dict[str, Any]) -> None:
    """``workers`` tune workers as Dask tasks on one study (seeds ``seed``, ``seed + 1``, ...);
    the storage must be one every worker reaches (PostgreSQL on a cluster)."""
    from distributed import as_completed

    from crener.workspace import tracking_uri

    uri = tracking_uri()
    futures = [client.submit(tune_task, {**kwargs, "seed": kwargs.get("seed", 0) + i}, uri, pure=False,
                             key=f"tune-{kwargs.get('study_name') or 'study'}-{i}") for i in range(workers)]  # fmt: skip
    log.info(
        "%d tune workers of %d trials each submitted to %s",
        workers,
        kwargs["trials"],
        client.scheduler.address,
    )
    for done, fut in enumerate(as_completed(futures), 1):
        log.info("[%d/%d] tune worker finished: %d trials in the study", done, workers, fut.result())
