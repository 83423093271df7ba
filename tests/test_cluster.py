"""Past one machine: the Dask executor survives killed workers, and PostgreSQL carries MLflow and
Optuna for many workers (issue 16). Loopback only, bounded in time.

The PostgreSQL tests need a server: ``$CRENER_TEST_POSTGRES`` (a SQLAlchemy URL such as
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), which ``.ci/run`` starts and sets.
Without it they skip with that reason, which CI (``CRENER_STRICT_SKIPS=1``) turns into a failure.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from crener.tracking import Tracker
from experiments.sweeps import plan
from tests.helpers import FAKE_TRAIN_SOURCE, tiny_resume
from tests.test_reproduce import _check_one_finished_run

pytest.importorskip("distributed", reason="the cluster extra: pip install -e '.[cluster]'")

SITE = """
import os, sys
if os.environ.get("CRENER_FAKE_TRAIN_DIR"):
    sys.path.insert(0, os.environ["CRENER_FAKE_TRAIN_DIR"])
    import fake_train
    sys.modules["crener.train"] = fake_train
"""


def _fake_fit_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch_seconds: float) -> None:
    """The fake fit in every process started from here (Dask workers too), via sitecustomize."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    (site / "fake_train.py").write_text(FAKE_TRAIN_SOURCE)
    monkeypatch.setenv("CRENER_FAKE_TRAIN_DIR", str(site))
    monkeypatch.setenv("CRENER_FAKE_EPOCH_SECONDS", str(epoch_seconds))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def _kill_workers(client, kills: int, seed: int, stop: threading.Event) -> list[str]:  # noqa: ANN001
    """SIGKILL a worker that is running a cell, ``kills`` times at random moments; wait for its
    nanny to bring it back before the next. Returns the keys of the cells that were interrupted."""
    rng = random.Random(seed)
    interrupted: list[str] = []
    while len(interrupted) < kills and not stop.is_set():
        time.sleep(rng.uniform(0.5, 2.0))
        busy = {addr: keys for addr, keys in client.processing().items() if keys}
        if not busy:
            continue
        addr = rng.choice(sorted(busy))
        pids = client.run(os.getpid)
        if addr not in pids:
            continue
        os.kill(pids[addr], signal.SIGKILL)
        interrupted.append(sorted(busy[addr])[0])
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    return interrupted


def _sweep_with_kills(tmp_path: Path, cells, data_root: str | None, kills: int):  # noqa: ANN001, ANN202
    from experiments.executor import connect, run_cells_dask

    client = connect(None, workers=2, threads=1, dashboard=":0")
    stop = threading.Event()
    result: dict = {}
    try:
        killer = threading.Thread(target=lambda: result.update(killed=_kill_workers(client, kills, 0, stop)))
        killer.start()
        ran, failed = run_cells_dask(cells, client, runs_dir=str(tmp_path / "runs"), data_root=data_root)
        stop.set()
        killer.join(timeout=120)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    return ran, failed, result.get("killed", [])


def test_dask_sweep_survives_three_sigkilled_workers(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six cells of 4 one-second epochs on two local workers, a busy worker SIGKILLed three times:
    every cell finishes, once in MLflow, each epoch's metrics logged once."""
    _fake_fit_everywhere(tmp_path, monkeypatch, epoch_seconds=1.0)
    variants = ["full", "no_mlp", "no_region", "no_dconv", "no_distance", "no_biaffine"]
    cells = plan(profile="smoke", datasets=["resume"], models=["crener"], variants=variants,
                 sets={"train.epochs": "4"})  # fmt: skip
    Tracker()
    ran, failed, killed = _sweep_with_kills(tmp_path, cells, None, kills=3)
    assert failed == [] and len(killed) == 3
    assert ran == len(cells)
    for cell in cells:
        _check_one_finished_run(cell.cfg)


@pytest.mark.slow
def test_dask_sweep_survives_sigkilled_workers_real_fit(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the real fit on a 24-sentence Resume: killed cells resume from last.pt."""
    data = tiny_resume(tmp_path / "data", 24)
    variants = ["full", "no_mlp", "no_region", "no_dconv"]
    cells = plan(profile="smoke", datasets=["resume"], models=["crener"], variants=variants,
                 sets={"data.data_root": str(data), "train.epochs": "4", "train.threads": "1"})  # fmt: skip
    Tracker()
    ran, failed, killed = _sweep_with_kills(tmp_path, cells, str(data), kills=3)
    assert failed == [] and len(killed) == 3 and ran == len(cells)
    for cell in cells:
        _check_one_finished_run(cell.cfg)


@pytest.mark.slow
def test_reproduce_cli_runs_on_a_local_dask_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``crener reproduce --executor dask --jobs 2`` end to end (fake fit): all cells, then rerun
    finds them finished."""
    import subprocess

    _fake_fit_everywhere(tmp_path, monkeypatch, epoch_seconds=0.2)
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "CRENER_RUNS": str(tmp_path / "runs"),
        "HF_HUB_OFFLINE": "1",
    }
    args = ["reproduce", "--profile", "smoke", "--datasets", "resume", "--models", "crener", "--variants", "full",
            "no_mlp", "no_region", "--set", "train.epochs=2", "--no-report", "--executor", "dask", "--jobs", "2"]  # fmt: skip
    cmd = [sys.executable, "-m", "crener.cli", *args]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "3 cell(s): 3 trained, 0 already finished, 0 failed" in first.stderr
    assert "cells submitted to tcp://127.0.0.1:" in first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0 and "3 cell(s): 0 trained, 3 already finished, 0 failed" in again.stderr
