"""``crener migrate``: runs logged under an older key are found again, their folders and
checkpoints follow, removed fields are reported, and a second pass changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crener.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from crener.cli import main
from crener.config import RunConfig
from crener.identity import run_key
from crener.migrate import LEGACY_KEY_TAG, migrate_store, rebuild_config
from crener.tracking import Tracker
from tests.helpers import smoke_cfg


def _old_run(tracker: Tracker, cfg: RunConfig, runs: Path, legacy: str, extra: dict[str, str]) -> str:
    """A finished run as the code before this identity logged it: an old key, no digest tag,
    and a folder named by the old key with checkpoints and a summary that carry it."""
    logger = tracker.start_run(cfg, sweep="main")
    logger.log_config(cfg, extra)
    logger.finish({"dev": {"f1": 0.5}, "test": {"f1": 0.4}, "best_epoch": 1})
    tracker.set_tags(logger.run_id, {"crener.key": legacy})
    for tag in ("crener.data_digest", "crener.key_schema"):
        tracker.client.delete_tag(logger.run_id, tag)
    workdir = runs / cfg.profile / legacy
    for name in ("last.pt", "best.pt"):
        save_checkpoint(
            workdir / "checkpoints" / name, {"version": CHECKPOINT_VERSION, "key": legacy, "model": {}}
        )
    (workdir / "summary.json").write_text(json.dumps({"key": legacy, "test": {"f1": 0.4}}))
    return logger.run_id


def test_migrate_rekeys_runs_folders_and_checkpoints(mlflow_store: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    tracker = Tracker()
    cfg = smoke_cfg()
    twin = cfg.with_overrides({"runtime.grid_input": "concat"})  # another key before, the same now
    other = smoke_cfg(model="bert_crf", seed=1)
    run_id = _old_run(tracker, cfg, runs, "0ld0000000000001", {"model.removed_option": "True"})
    twin_id = _old_run(tracker, twin, runs, "0ld0000000000002", {})
    other_id = _old_run(tracker, other, runs, "0ld0000000000003", {})
    assert tracker.find_runs(run_key(cfg)) == [] and tracker.find_runs(run_key(other)) == []

    results = {r.run_id: r for r in migrate_store(tracker, runs)}

    assert {r.action for r in results.values()} == {"retagged"}
    assert results[run_id].dropped == ["model.removed_option"]
    assert [r.run_id for r in tracker.find_runs(run_key(other))] == [other_id]
    assert {r.run_id for r in tracker.find_runs(run_key(cfg))} == {run_id, twin_id}
    assert all(r.finished for r in tracker.find_runs(run_key(cfg)))
    tags = tracker.get_run(run_id).tags
    assert tags[LEGACY_KEY_TAG] == "0ld0000000000001" and tags["crener.data_digest"]
    new = runs / "smoke" / run_key(cfg)
    assert not (runs / "smoke" / "0ld0000000000001").exists()
    assert {load_checkpoint(new / "checkpoints" / n)["key"] for n in ("last.pt", "best.pt")} == {run_key(cfg)}
    assert json.loads((new / "summary.json").read_text())["key"] == run_key(cfg)
    # The twin now shares the key: its folder stays where it was, and says so.
    assert (runs / "smoke" / "0ld0000000000002").is_dir() and "exists" in results[twin_id].folder
    assert load_checkpoint(runs / "smoke" / run_key(other) / "checkpoints" / "last.pt")["key"] == run_key(
        other
    )

    again = migrate_store(tracker, runs)
    assert {r.action for r in again} == {"unchanged"} and all(r.rewritten == 0 for r in again)
    assert tracker.get_run(run_id).tags[LEGACY_KEY_TAG] == "0ld0000000000001"


def test_an_interrupted_migration_is_finished_by_the_next(mlflow_store: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    tracker = Tracker()
    cfg = smoke_cfg(model="w2ner")
    run_id = _old_run(tracker, cfg, runs, "0ld0000000000004", {})
    (runs / "smoke" / "0ld0000000000004").rename(runs / "smoke" / run_key(cfg))  # moved, not yet retagged
    (result,) = migrate_store(tracker, runs)
    assert result.action == "retagged" and result.rewritten == 3  # two checkpoints and the summary
    assert [r.run_id for r in tracker.find_runs(run_key(cfg))] == [run_id]


def test_unreadable_runs_are_reported_not_fatal(
    mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = Tracker()
    cfg = smoke_cfg()
    good = _old_run(tracker, cfg, tmp_path / "runs", "0ld0000000000005", {})
    bad = tracker.start_run(cfg, sweep="main")  # params of a value this code refuses
    bad.log_params({"model.context": "gru", "model.hidden": "32"})
    code = main(["migrate", "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 1 and "1 retagged" in out and "1 skipped" in out and "dry run" in out
    assert "gru" in out
    assert tracker.get_run(good).tags["crener.key"] == "0ld0000000000005"  # dry run: nothing written
    assert (tmp_path / "runs" / "smoke" / "0ld0000000000005").is_dir()


def test_rebuild_config_reports_removed_fields() -> None:
    cfg = smoke_cfg(model="tener")
    params = {k: str(v) for k, v in cfg.flatten().items()}
    rebuilt, dropped = rebuild_config({**params, "train.gone": "1", "num_labels": "9"})
    assert dropped == ["train.gone"] and run_key(rebuilt) == run_key(cfg)
