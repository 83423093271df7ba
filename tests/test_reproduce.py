"""crener.runner and ``crener reproduce``: each cell runs once, killed cells resume in the
same MLflow run, failures do not stop the sweep, workers split cells, a real SIGKILL is survived.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from crener.cli import main as cli_main
from crener.config import RunConfig
from crener.identity import run_key
from crener.runner import CellBusy, lock_path, run_one
from crener.tracking import EPOCH_METRICS, Tracker, file_lock
from crener.workspace import workdir_for
from experiments.sweeps import plan
from tests.helpers import fake_cli, smoke_cfg, tiny_resume

REPO = Path(__file__).resolve().parents[1]


def _runs(key: str) -> list:
    return Tracker().find_runs(key)


def _steps(run_id: str, key: str = "dev/f1") -> list[int]:
    return sorted(m.step for m in Tracker().client.get_metric_history(run_id, key))


def _check_one_finished_run(cfg: RunConfig) -> str:
    runs = _runs(run_key(cfg))
    assert len(runs) == 1, f"{run_key(cfg)}: {len(runs)} runs"
    run = runs[0]
    assert run.state == "finished" and run.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert _steps(run.run_id, key) == list(range(1, cfg.train.epochs + 1)), key
    assert "best/test_f1" in run.metrics and "best/dev_f1" in run.metrics
    return run.run_id


# --------------------------------------------------------------------------- run_one


def test_run_once_then_skip(mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path) -> None:
    cfg = smoke_cfg()
    out = run_one(cfg, sweep="main")
    assert not out["skipped"] and out["workdir"] == str(tmp_path / "runs" / "smoke" / run_key(cfg))
    assert (workdir_for(cfg) / "summary.json").is_file()
    again = run_one(cfg, sweep="ablation")
    assert again["skipped"] and again["run_id"] == out["run_id"] and again["test"] == out["test"]
    assert [run_key(cfg)] == fake_fit.CALLS
    _check_one_finished_run(cfg)
    run = Tracker().get_run(out["run_id"])
    assert run.tags["crener.sweep"] == "main"
    assert run.params["num_labels"] == "9" and run.params["parameters"] == "1234"


def test_failed_cell_resumes_same_run(mlflow_store: str, fake_fit: types.ModuleType) -> None:
    cfg = smoke_cfg().with_overrides({"train.epochs": 4})
    real_fit = fake_fit.fit

    class Crash(Exception):
        pass

    def crashing_fit(cfg, workdir, *, callback=None, **kw):  # noqa: ANN001, ANN202
        class Proxy:
            def on_start(self, info):  # noqa: ANN001, ANN202
                callback.on_start(info)

            def on_epoch_end(self, epoch, metrics):  # noqa: ANN001, ANN202
                callback.on_epoch_end(epoch, metrics)
                if epoch == 2:
                    raise Crash("power cut")

        return real_fit(cfg, workdir, callback=Proxy(), **kw)

    fake_fit.fit = crashing_fit
    with pytest.raises(Crash):
        run_one(cfg)
    (failed,) = _runs(run_key(cfg))
    assert failed.state == "failed" and "power cut" in failed.tags["crener.error"]
    assert _steps(failed.run_id) == [1, 2]

    fake_fit.fit = real_fit
    out = run_one(cfg)
    assert out["run_id"] == failed.run_id and not out["skipped"]
    assert _check_one_finished_run(cfg) == failed.run_id
    assert Tracker().get_run(failed.run_id).tags["crener.resumed_from_epoch"] == "2"


def test_restart_without_resume_keeps_one_run(mlflow_store: str, fake_fit: types.ModuleType) -> None:
    cfg = smoke_cfg(seed=1)
    Tracker().start_run(cfg, sweep="adhoc").fail("killed")
    out = run_one(cfg, resume=False)
    assert _check_one_finished_run(cfg) == out["run_id"]


def test_summary_on_disk_is_logged_without_retraining(mlflow_store: str, fake_fit: types.ModuleType) -> None:
    cfg = smoke_cfg(seed=2)
    fake_fit.fit(cfg, workdir_for(cfg))  # trained, then killed before MLflow heard of it
    fake_fit.CALLS.clear()
    out = run_one(cfg)
    assert fake_fit.CALLS == [] and not out["skipped"]
    _check_one_finished_run(cfg)


def test_table_sweep_claims_adhoc_runs_but_not_the_reverse(
    mlflow_store: str, fake_fit: types.ModuleType
) -> None:
    done, broken = smoke_cfg(seed=3), smoke_cfg(seed=4)
    run_one(done)  # e.g. `crener train`: sweep adhoc
    out = run_one(done, sweep="main")
    assert out["skipped"] and Tracker().get_run(out["run_id"]).tags["crener.sweep"] == "main"
    Tracker().start_run(broken, sweep="ablation").fail("killed")
    out = run_one(broken)  # adhoc resumes it without demoting it
    assert Tracker().get_run(out["run_id"]).tags["crener.sweep"] == "ablation"
    assert [run_key(done), run_key(broken)] == fake_fit.CALLS


def test_a_table_sweep_claims_a_claim_sweep_run_and_crener_train_demotes_none(
    mlflow_store: str, fake_fit: types.ModuleType
) -> None:
    first, second = smoke_cfg(model="w2ner", seed=5), smoke_cfg(model="w2ner", seed=6)
    out = run_one(first, sweep="claim")  # experiments/configs/claim.toml: main-sweep keys
    assert Tracker().get_run(out["run_id"]).tags["crener.sweep"] == "claim"
    again = run_one(first, sweep="main")  # the main sweep reaches the cell: found, not retrained
    assert again["skipped"] and again["run_id"] == out["run_id"]
    assert Tracker().get_run(out["run_id"]).tags["crener.sweep"] == "main"
    adhoc = run_one(second)  # `crener train`, then the claim sweep, then `crener train` again
    assert run_one(second, sweep="claim")["skipped"] and run_one(second)["skipped"]
    assert Tracker().get_run(adhoc["run_id"]).tags["crener.sweep"] == "claim"
    assert [run_key(first), run_key(second)] == fake_fit.CALLS


def test_untracked_run(tmp_path: Path, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRENER_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    cfg = smoke_cfg()
    assert not run_one(cfg, track=False)["skipped"]
    assert run_one(cfg, track=False)["skipped"]
    assert not (tmp_path / "never.db").exists()


def test_busy_cell(mlflow_store: str, fake_fit: types.ModuleType) -> None:
    cfg = smoke_cfg()
    with file_lock(lock_path(cfg)) as held:
        assert held
        with pytest.raises(CellBusy):
            run_one(cfg, wait=False)
    assert fake_fit.CALLS == []


# --------------------------------------------------------------------------- crener reproduce


def _table3_args(*extra: str) -> list[str]:
    return ["reproduce", "--profile", "smoke", "--only", "table3", *extra]


def test_reproduce_survives_missing_model_code(
    mlflow_store: str,
    fake_fit: types.ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    report_calls: list[str] = []
    report = types.ModuleType("reports.make_report")
    report.main = lambda profile: report_calls.append(profile)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reports.make_report", report)
    monkeypatch.setenv("CRENER_FAKE_FAIL_MODELS", "tener,bert_crf")
    cells = plan(profile="smoke", only="table3")
    assert len(cells) == 5
    with caplog.at_level(logging.INFO):
        assert cli_main(_table3_args()) == 1
    assert "failed cell tener:full/resume/s0" in caplog.text
    assert "baselines.tener" in caplog.text
    assert report_calls == ["smoke"]  # the report still runs over what finished
    states = {c.cfg.model.name: [r.state for r in _runs(run_key(c.cfg))] for c in cells}
    assert states == {
        "crener": ["finished"],
        "w2ner": ["finished"],
        "bert_softmax": ["finished"],
        "bert_crf": ["failed"],
        "tener": ["failed"],
    }
    failed_ids = {
        run_key(c.cfg): _runs(run_key(c.cfg))[0].run_id
        for c in cells
        if c.cfg.model.name in ("tener", "bert_crf")
    }

    monkeypatch.delenv("CRENER_FAKE_FAIL_MODELS")
    fake_fit.CALLS.clear()
    assert cli_main(_table3_args("--no-report")) == 0
    assert sorted(fake_fit.CALLS) == sorted(failed_ids)  # only the failed cells trained again
    for c in cells:
        run_id = _check_one_finished_run(c.cfg)
        assert failed_ids.get(run_key(c.cfg), run_id) == run_id
    assert report_calls == ["smoke"]


def test_reproduce_workers_split_cells(mlflow_store: str, fake_fit: types.ModuleType) -> None:
    args = _table3_args("--seeds", "0", "1", "--models", "crener", "w2ner", "--no-report")
    assert cli_main([*args, "--worker", "0/2"]) == 0
    first = list(fake_fit.CALLS)
    assert cli_main([*args, "--worker", "1/2"]) == 0
    cells = plan(profile="smoke", only="table3", seeds=[0, 1], models=["crener", "w2ner"])
    assert first == [run_key(c.cfg) for c in cells[0::2]]
    assert sorted(fake_fit.CALLS) == sorted(run_key(c.cfg) for c in cells)
    for c in cells:
        _check_one_finished_run(c.cfg)


def test_reproduce_dry_run_and_bad_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(_table3_args("--dry-run")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    with pytest.raises(SystemExit):
        cli_main(_table3_args("--worker", "2/2"))


# --------------------------------------------------------------------------- a real SIGKILL


def _start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    out = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    # A session of its own: SIGKILL goes to the whole group (DataLoader workers included).
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready: Path, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"sweep ended (rc {proc.returncode}) before it could be killed:\n{log_path.read_text()}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{ready} did not appear within {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _kill_and_rerun(
    cmd: list[str],
    cells: list,
    env: dict[str, str],
    tmp_path: Path,
    *,
    timeout: float,
    mid: int = 1,
    rerun: Callable[[], tuple[int, str]] | None = None,
) -> None:
    """Kill the sweep once cell ``mid`` has checkpointed an epoch, rerun it (``cmd`` again, or
    ``rerun()`` -> (exit code, log)), and check every cell has one finished run."""
    log1 = tmp_path / "first.log"
    victim = workdir_for(cells[mid].cfg, tmp_path / "runs") / "checkpoints" / "last.pt"
    _kill_when(_start(cmd, env, log1), victim, timeout, log1)
    assert all(r.state == "finished" for c in cells[:mid] for r in _runs(run_key(c.cfg)))
    (killed,) = _runs(run_key(cells[mid].cfg))
    assert killed.state == "running"  # SIGKILL leaves no chance to say goodbye
    assert not (workdir_for(cells[-1].cfg, tmp_path / "runs") / "summary.json").exists()

    if rerun is None:
        log2 = tmp_path / "second.log"
        with open(log2, "w") as out:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout * 2)
        rc, text = proc.returncode, log2.read_text()
    else:
        rc, text = rerun()
    assert rc == 0, text
    for cell in cells:
        _check_one_finished_run(cell.cfg)
    assert _runs(run_key(cells[mid].cfg))[0].run_id == killed.run_id
    assert "already finished" in text


def _subprocess_env(tmp_path: Path, uri: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CRENER_RUNS": str(tmp_path / "runs"), **extra}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def test_sigkill_mid_sweep_fake_fit(
    mlflow_store: str, tmp_path: Path, fake_fit: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """Fast version: the real CLI and MLflow in a subprocess with the fake fit (0.3 s per epoch),
    SIGKILLed mid-sweep; the rerun happens in this process (saves a cold start)."""
    sel = ["--datasets", "resume", "--models", "crener", "--variants", "full", "no_mlp", "no_region"]
    args = ["reproduce", "--profile", "smoke", *sel, "--set", "train.epochs=3", "--no-report"]
    cells = plan(
        profile="smoke",
        datasets=["resume"],
        models=["crener"],
        variants=["full", "no_mlp", "no_region"],
        sets={"train.epochs": "3"},
    )
    assert len(cells) == 3
    env = _subprocess_env(tmp_path, mlflow_store, CRENER_FAKE_EPOCH_SECONDS="1.5")

    def rerun() -> tuple[int, str]:
        with caplog.at_level(logging.INFO):
            return cli_main(args), caplog.text

    _kill_and_rerun([*fake_cli(tmp_path), *args], cells, env, tmp_path, timeout=90, rerun=rerun)
    assert [run_key(c.cfg) for c in cells[1:]] == fake_fit.CALLS  # the finished cell was not retrained


@pytest.mark.slow
def test_sigkill_mid_sweep_real_fit(mlflow_store: str, tmp_path: Path) -> None:
    """``crener reproduce --profile smoke --datasets resume`` with the real fit, killed by SIGKILL
    after the second cell's first checkpoint, then rerun: each run exists once, with its metrics."""
    pytest.importorskip("crener.train")
    data = tiny_resume(tmp_path / "data", 24)
    sel = ["--datasets", "resume", "--models", "crener", "--variants", "full", "no_mlp", "no_dconv"]
    cmd = [sys.executable, "-m", "crener.cli", "reproduce", "--profile", "smoke", *sel]
    cmd += ["--data-root", str(data), "--no-report"]
    cells = plan(
        profile="smoke",
        datasets=["resume"],
        models=["crener"],
        variants=["full", "no_mlp", "no_dconv"],
        sets={"runtime.data_root": str(data)},  # as --data-root does: the keys digest these files
    )
    env = _subprocess_env(tmp_path, mlflow_store, OMP_NUM_THREADS="1")
    _kill_and_rerun(cmd, cells, env, tmp_path, timeout=420)
    summary = json.loads((workdir_for(cells[1].cfg, tmp_path / "runs") / "summary.json").read_text())
    assert summary["key"] == run_key(cells[1].cfg)


def test_without_jobs_drops_both_spellings() -> None:
    from experiments.commands import _without_jobs

    argv = ["reproduce", "--jobs", "2", "--profile", "quick", "--jobs=3", "--seeds", "1"]
    assert _without_jobs(argv) == ["reproduce", "--profile", "quick", "--seeds", "1"]
    with pytest.raises(SystemExit):
        cli_main(_table3_args("--jobs", "0"))


@pytest.mark.slow
def test_reproduce_jobs_share_the_cells_real_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--jobs 2``: two worker processes take the cells as they free up; every cell trains once,
    both workers train some, each with one CPU thread, and the parent writes the report."""
    data = tiny_resume(tmp_path / "data", 24)
    sel = [
        "--datasets",
        "resume",
        "--models",
        "crener",
        "--variants",
        "full",
        "no_mlp",
        "no_dconv",
        "no_region",
    ]
    cmd = [sys.executable, "-m", "crener.cli", "reproduce", "--profile", "smoke", *sel]
    cmd += ["--data-root", str(data), "--no-report", "--jobs", "2"]
    # A store that does not exist yet: the workers must not race to create its schema.
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    env = _subprocess_env(tmp_path, fresh)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = plan(
        profile="smoke", datasets=["resume"], models=["crener"],
        variants=["full", "no_mlp", "no_dconv", "no_region"], sets={"runtime.data_root": str(data)},
    )  # fmt: skip
    for c in cells:
        run_id = _check_one_finished_run(c.cfg)
        assert Tracker().get_run(run_id).params["runtime.threads"] == "1"
    trained = [line for line in proc.stderr.splitlines() if ": done," in line]
    assert len(trained) == len(cells)
    assert any("[job 0]" in line for line in trained) and any("[job 1]" in line for line in trained)
    assert "2 worker processes, 1 CPU thread(s) each" in proc.stderr


def test_tracked_train_then_evaluate_by_run_id(
    mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tracked ``crener train`` (the real fit, MLflow on) logs the contract, and ``crener
    evaluate --run-id`` finds its best checkpoint and scores it as training did."""
    data = tiny_resume(tmp_path / "data", 16)
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(data),
            "--set", "train.epochs=2", "--set", "runtime.progress=false"]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = _runs(summary["key"])
    assert run.state == "finished" and run.tags["crener.sweep"] == "adhoc"
    assert _steps(run.run_id, "train/loss") == [1, 2] and _steps(run.run_id, "dev/f1") == [1, 2]
    assert run.metrics["best/test_f1"] == pytest.approx(summary["test"]["f1"])
    assert run.params["train.epochs"] == "2" and run.params["profile"] == "smoke"
    artifacts = {a.path for a in Tracker().client.list_artifacts(run.run_id)}
    assert {"summary.json", "config.json", "history.json", "per_type.json", "predictions"} <= artifacts
    assert (
        run.tags["mlflow.source.git.commit"]
        and len(Tracker().client.get_run(run.run_id).inputs.dataset_inputs) == 3
    )
    assert cli_main(["evaluate", "--run-id", run.run_id, "--data-root", str(data)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["f1"] == pytest.approx(summary["test"]["f1"]) and scored["split"] == "test"
    assert cli_main(["evaluate", "--run-id", "f" * 32]) == 2  # a clear error, no traceback


def test_system_metrics_follow_mlflows_switch(
    mlflow_store: str, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str, bool]] = []

    class Monitor:  # stands in for MLflow's, which needs psutil
        def __init__(self, run_id, *, resume_logging, tracking_uri):  # noqa: ANN001
            self.run_id = run_id
            events.append(("init", run_id, resume_logging))

        def start(self) -> None:
            events.append(("start", self.run_id, False))

        def finish(self) -> None:
            events.append(("finish", self.run_id, False))

    module = types.ModuleType("mlflow.system_metrics.system_metrics_monitor")
    module.SystemMetricsMonitor = Monitor
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", module)
    run_one(smoke_cfg(seed=1))
    assert events == []  # off by default
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    out = run_one(smoke_cfg(seed=2))
    assert [e[0] for e in events] == ["init", "start", "finish"] and {e[1] for e in events} == {out["run_id"]}
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)  # no psutil
    from crener.errors import CrenerError

    with pytest.raises(CrenerError, match="psutil"):
        run_one(smoke_cfg(seed=3))
    assert _runs(run_key(smoke_cfg(seed=3))) == []  # refused before any run was created
