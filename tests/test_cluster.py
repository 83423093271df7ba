"""Past one machine: the Dask executor survives killed workers, and PostgreSQL carries MLflow and
Optuna for many workers. Loopback only, bounded in time.

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
                 sets={"runtime.data_root": str(data), "train.epochs": "4", "runtime.threads": "1"})  # fmt: skip
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


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_db():  # noqa: ANN201
    """A fresh database on the test server (``$CRENER_TEST_POSTGRES``), dropped afterwards."""
    url = os.environ.get("CRENER_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: export CRENER_TEST_POSTGRES=$(.ci/postgres)")
    import uuid

    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://")
    name = f"crener_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow_server(backend: str, artifacts: Path, port: int):  # noqa: ANN202
    import subprocess
    import urllib.request

    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("mlflow server did not come up in 90 s")


def test_four_tune_workers_share_one_postgresql_study(postgres_db: str, tmp_path: Path) -> None:
    """Four ``crener tune`` processes, 10 trials each, one study on PostgreSQL (fake fit, MLflow
    on SQLite): 40 finished trials, numbered 0-39 once each, and the best one exported."""
    import subprocess

    import optuna

    from tests.helpers import fake_cli

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "CRENER_RUNS": str(tmp_path / "runs"), "CRENER_FAKE_EPOCH_SECONDS": "0"}  # fmt: skip
    Tracker(env["MLFLOW_TRACKING_URI"])  # the MLflow schema once, before four workers race for it
    args = ["tune", "--dataset", "resume", "--profile", "smoke", "--trials", "10", "--storage", postgres_db,
            "--study-name", "pg", "--set", "train.epochs=2"]  # fmt: skip
    procs = [
        subprocess.Popen([*fake_cli(tmp_path), *args, "--seed", str(i), *(["--export", str(tmp_path / "best.toml")] if i == 0 else [])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(4)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    study = optuna.load_study(study_name="pg", storage=postgres_db)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 40
    assert sorted(t.number for t in trials) == list(range(40))  # none lost, none twice
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert sum(t.user_attrs.get("crener.default", False) for t in trials) == 1  # the default ran once
    # Worker 0's export is its view of the best when it finished: a finished trial of this study.
    exported = (tmp_path / "best.toml").read_text()
    assert "train.lr" in exported


@pytest.mark.slow
def test_sweep_on_an_mlflow_server_over_postgresql_survives_a_server_outage(
    postgres_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep logs to an MLflow server whose backend is PostgreSQL; the server is stopped for a
    few seconds mid-sweep and started again. The sweep either finishes or fails with a clear
    error, and a rerun finishes every cell, each once, with no epoch logged twice."""
    import subprocess

    from tests.helpers import fake_cli

    port = _free_port()
    server = _start_mlflow_server(postgres_db, tmp_path / "artifacts", port)
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "CRENER_RUNS": str(tmp_path / "runs"),
           "CRENER_FAKE_EPOCH_SECONDS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    variants = ["full", "no_mlp", "no_region"]
    args = ["reproduce", "--profile", "smoke", "--datasets", "resume", "--models", "crener", "--variants",
            *variants, "--set", "train.epochs=3", "--no-report"]  # fmt: skip
    sweep = subprocess.Popen([*fake_cli(tmp_path), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # stop the server once the first cell has logged an epoch
        while not list((tmp_path / "runs").rglob("history.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sweep.poll() is None, "the sweep ended before the outage"
        server.terminate()
        server.wait(timeout=30)
        time.sleep(4)
        server = _start_mlflow_server(postgres_db, tmp_path / "artifacts", port)
        first = sweep.communicate(timeout=300)[0]
        (tmp_path / "first-sweep.log").write_text(f"exit status {sweep.returncode}\n{first}")
        if sweep.returncode != 0:  # a clear error per cell, not a traceback
            assert "cannot reach the MLflow store" in first and "Traceback" not in first, first[-3000:]
        rerun = subprocess.run(
            [*fake_cli(tmp_path), *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        cells = plan(profile="smoke", datasets=["resume"], models=["crener"], variants=variants,
                     sets={"train.epochs": "3"})  # fmt: skip
        for cell in cells:
            _check_one_finished_run(cell.cfg)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_tune_runs_its_workers_as_dask_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``crener tune --executor dask --jobs 2 --trials 3`` (fake fit): 6 trials on one study,
    numbered once each, and the best exported."""
    import subprocess

    import optuna

    _fake_fit_everywhere(tmp_path, monkeypatch, epoch_seconds=0.1)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "CRENER_RUNS": str(tmp_path / "runs")}  # fmt: skip
    cmd = [sys.executable, "-m", "crener.cli", "tune", "--dataset", "resume", "--profile", "smoke", "--trials", "3",
           "--storage", storage, "--study-name", "d", "--set", "train.epochs=2", "--executor", "dask", "--jobs", "2",
           "--export", str(tmp_path / "best.toml")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="d", storage=storage).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(6))
    assert "2 tune workers of 3 trials each submitted" in proc.stderr
    assert "train.lr" in (tmp_path / "best.toml").read_text()


def test_workers_opening_a_fresh_postgresql_study_together_all_succeed(postgres_db: str) -> None:
    """Eight workers open the same fresh database at once: one creates Optuna's schema, the
    others lose the race (a duplicate-key error in PostgreSQL's catalogue) and must retry."""
    from concurrent.futures import ThreadPoolExecutor

    from experiments.tune import open_storage

    barrier = threading.Barrier(8)

    def worker(_: int) -> str:
        barrier.wait()
        return type(open_storage(postgres_db)).__name__

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(worker, range(8))) == ["RDBStorage"] * 8
