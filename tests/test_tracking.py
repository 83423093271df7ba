"""crener.tracking: URI, experiments, tags, once-only params, idempotent metrics, states.

The shared store and fake-fit helpers live in tests/helpers.py and tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crener.config import RunConfig
from crener.errors import CheckpointError
from crener.identity import run_key
from crener.tracking import EPOCH_METRICS, Tracker, experiment_name
from crener.workspace import artifact_root, sqlite_path, tracking_uri, workdir_for
from tests.helpers import smoke_cfg

# --------------------------------------------------------------------------- tests


def test_tracking_uri_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sqlite_path(uri) == tmp_path / "mlflow.db"
    assert artifact_root(uri) == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert artifact_root(tracking_uri()) is None
    assert tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # an explicit store wins


def test_runs_dir_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = smoke_cfg()
    monkeypatch.delenv("CRENER_RUNS", raising=False)
    assert workdir_for(cfg) == Path("runs") / "smoke" / run_key(cfg)
    monkeypatch.setenv("CRENER_RUNS", str(tmp_path))
    assert workdir_for(cfg) == tmp_path / "smoke" / run_key(cfg)
    assert workdir_for(cfg, "elsewhere") == Path("elsewhere") / "smoke" / run_key(cfg)


def test_names() -> None:
    cfg = smoke_cfg(variant="no_mlp", seed=3)
    assert experiment_name("ablation", "smoke") == "crener-ablation-smoke"
    assert cfg.label == "crener:no_mlp/resume/s3"


def test_run_contract_and_idempotent_resume(mlflow_store: str, tmp_path: Path) -> None:
    cfg = smoke_cfg()
    tracker = Tracker()
    logger = tracker.start_run(cfg, sweep="main")
    logger.log_config(cfg)
    logger.on_start({"num_labels": 9, "parameters": 1234, "labels": [], "resumed_from_epoch": 0})
    epoch_metrics = {k: 0.5 for k in EPOCH_METRICS}
    logger.on_epoch_end(1, epoch_metrics)
    logger.fail(RuntimeError("boom"))

    (run,) = tracker.find_runs(run_key(cfg))
    assert run.state == "failed" and run.status == "FAILED"
    assert "boom" in run.tags["crener.error"]
    exp = tracker.client.get_experiment(run.experiment_id)
    assert exp.name == "crener-main-smoke"
    assert exp.artifact_location == f"{(tmp_path / 'mlartifacts').as_uri()}/crener-main-smoke"
    tags = run.tags
    assert tags["mlflow.runName"] == "crener:full/resume/s0"
    for name, value in {
        "crener.key": run_key(cfg),
        "crener.sweep": "main",
        "crener.model": "crener",
        "crener.variant": "full",
        "crener.dataset": "resume",
        "crener.profile": "smoke",
        "crener.seed": "0",
        "crener.encoder": "embedded",
        "crener.msra_protocol": "lineage",
    }.items():
        assert tags[name] == value
    assert tags["crener.git_commit"] and tags["mlflow.source.git.commit"] == tags["crener.git_commit"]
    assert tags["mlflow.source.name"] == "crener"
    assert run.params["model.use_biaffine"] == "True" and run.params["num_labels"] == "9"
    # The split files as MLflow dataset inputs, each with its file digest and split context.
    from crener.data.datasets import get_spec, resolve_data_root
    from crener.data.digest import file_digest

    inputs = tracker.client.get_run(run.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"resume/train", "resume/dev", "resume/test"}
    for split in ("train", "dev", "test"):
        item = by_name[f"resume/{split}"]
        path = get_spec("resume").path(split, resolve_data_root(None))
        assert item.dataset.digest == file_digest(path)[:32] and item.dataset.source == str(path.resolve())
        assert {t.key: t.value for t in item.tags} == {"mlflow.data.context": split}
    assert run_key(
        RunConfig.from_flat({k: v for k, v in run.params.items() if "." in k or k in ("profile", "variant")})
    ) == run_key(cfg)

    # Resume: same run id, the replayed epoch 1 is skipped, params are not re-logged.
    resumed = tracker.start_run(cfg, sweep="main", resume_run_id=run.run_id)
    resumed.log_config(cfg.with_overrides({"runtime.device": "cpu"}))  # excluded from the key: kept, warned
    resumed.on_start({"num_labels": 9, "parameters": 1234})
    resumed.on_epoch_end(1, {k: 0.9 for k in EPOCH_METRICS})
    resumed.on_epoch_end(2, {k: 0.7 for k in EPOCH_METRICS})
    assert tracker.get_run(run.run_id).state == "running"
    workdir = tmp_path / "wd"
    (workdir / "predictions").mkdir(parents=True)
    summary = {
        "dev": {"precision": 0.7, "recall": 0.7, "f1": 0.7},
        "test": {"precision": 0.6, "recall": 0.6, "f1": 0.6},
        "best_epoch": 2,
        "epochs": 2,
        "seconds": 3.0,
        "parameters": 1234,
        "num_labels": 9,
        "key": run_key(cfg),
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    (workdir / "predictions" / "test.jsonl").write_text("{}\n")
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "best.pt").write_bytes(b"not read here")
    resumed.finish(summary, workdir)
    resumed.finish(summary, workdir)  # finishing twice logs nothing twice

    (run,) = tracker.find_runs(run_key(cfg))
    assert run.state == "finished" and run.status == "FINISHED"
    for key in EPOCH_METRICS:
        history = tracker.client.get_metric_history(run.run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.7)]
    assert len(tracker.client.get_metric_history(run.run_id, "best/test_f1")) == 1
    assert run.metrics["best/dev_f1"] == 0.7 and run.metrics["best/epoch"] == 2
    assert run.metrics["parameters"] == 1234
    assert run.params["runtime.device"] == "auto"
    artifacts = {a.path for a in tracker.client.list_artifacts(run.run_id)}
    assert {"summary.json", "predictions"} <= artifacts
    assert tracker.load_summary(run)["test"]["f1"] == 0.6
    # The resumed run logged its inputs once, and points at its best checkpoint.
    assert len(tracker.client.get_run(run.run_id).inputs.dataset_inputs) == 3
    assert tracker.checkpoint_of(run.run_id) == (workdir / "checkpoints" / "best.pt").resolve()
    with pytest.raises(CheckpointError, match="no MLflow run"):
        tracker.checkpoint_of("0" * 32)


def test_find_runs_ignores_tune_and_other_keys(mlflow_store: str) -> None:
    tracker = Tracker()
    a, b = smoke_cfg(seed=0), smoke_cfg(seed=1)
    tracker.start_run(a, sweep="main").finish()
    tracker.start_run(a, sweep="tune", experiment="crener-tune-smoke")
    assert [r.tags["crener.sweep"] for r in tracker.find_runs(run_key(a))] == ["main"]
    assert len(tracker.find_runs(run_key(a), include_tune=True)) == 2
    assert tracker.find_runs(run_key(b)) == []
    with pytest.raises(ValueError, match="sweep"):
        tracker.start_run(a, sweep="nope")


def test_single_parent_run(mlflow_store: str) -> None:
    tracker = Tracker()
    tags = {"crener.study": "s1", "crener.sweep": "tune"}
    first = tracker.start_parent("crener-tune-smoke", name="s1", tags=tags)
    again = tracker.start_parent("crener-tune-smoke", name="s1", tags=tags)
    assert first.run_id == again.run_id
    assert len(tracker.search("crener-tune-smoke", "tags.`crener.study` = 's1'")) == 1


def test_experiments_open_on_the_runs_table(mlflow_store: str) -> None:
    """New experiments carry the training kind; ones made before the tag existed get it too."""
    tracker = Tracker()
    exp_id = tracker.experiment_id("crener-main-smoke")
    kind = "mlflow.experimentKind"
    assert tracker.client.get_experiment(exp_id).tags[kind] == "custom_model_development"
    old = tracker.client.create_experiment("crener-ablation-smoke")  # an old store: no tag
    assert kind not in tracker.client.get_experiment(old).tags
    assert tracker.experiment_id("crener-ablation-smoke") == old
    assert tracker.client.get_experiment(old).tags[kind] == "custom_model_development"


def test_a_dataset_row_inserted_first_by_another_worker_is_retried_not_fatal(
    mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers starting their first runs at once both insert the experiment's dataset rows; the
    loser's insert fails on the store's unique constraint. Its retry links the run to the row (the
    run logs its inputs once) instead of failing the cell; any other store error still raises."""
    from mlflow.exceptions import MlflowException

    import crener.tracking as tracking
    from crener.tracking import dataset_inputs

    monkeypatch.setattr(tracking, "LOCKED_BACKOFF_S", 0.0)
    cfg = smoke_cfg()
    logger = Tracker().start_run(cfg, sweep="main")
    real, calls = logger.client.log_inputs, []

    def raced(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:
            real(run_id, datasets=datasets)  # the other worker's insert, as if it came first
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                "datasets.digest"
            )
        return real(run_id, datasets=datasets)

    monkeypatch.setattr(logger.client, "log_inputs", raced)
    logger.log_config(cfg)
    assert len(calls) == 2
    inputs = logger.client.get_run(logger.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == sorted(d.dataset.name for d in dataset_inputs(cfg))

    other = Tracker().start_run(smoke_cfg(seed=1), sweep="main")
    monkeypatch.setattr(other.client, "log_inputs", lambda run_id, datasets: (_ for _ in ()).throw(
        MlflowException("INVALID_PARAMETER_VALUE: something else")))  # fmt: skip
    with pytest.raises(MlflowException, match="something else"):
        other.log_config(smoke_cfg(seed=1))
