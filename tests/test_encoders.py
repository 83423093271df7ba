"""`crener encoders`: the encoder ablation plans one cell per arm, dataset and seed in its own
sweep (never a table cell), reuses a finished cell by key, and reports mean ± std per arm."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from crener.cli import main as cli_main
from crener.tracking import Tracker
from experiments import encoders


def test_encoder_ablation_cells_and_report(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = {a: ("crener-char" if a == "pretrained+init" else str(tmp_path / a)) for a in encoders.ARMS}
    monkeypatch.setattr(encoders, "build_encoders", lambda arms, build_dir, data_root: built)
    monkeypatch.chdir(tmp_path)
    args = ["encoders", "--profile", "smoke", "--datasets", "resume", "weibo", "--seeds", "0", "1"]
    assert cli_main(args) == 0
    assert len(fake_fit.CALLS) == 4 * 2 * 2 and len(set(fake_fit.CALLS)) == 16  # one cell each
    runs = Tracker().crener_runs()
    assert {r.tags["crener.sweep"] for r in runs} == {"encoders"}
    assert {r.tags["crener.encoder"] for r in runs} == set(built.values())
    report = (tmp_path / "reports" / "out" / "smoke" / "encoders.md").read_text(encoding="utf-8")
    assert "| random (`random`) |" in report and "(n=2)" in report
    assert report.count("s0 `") == 8 and report.count("s1 `") == 8  # every run id listed
    # Rerun: every cell is found by its key, none trains again.
    assert cli_main(args) == 0
    assert len(fake_fit.CALLS) == 16
    # A named encoder is one more arm, used as it is (nothing built); the others are found again.
    assert cli_main([*args, "--encoders", str(tmp_path / "mine")]) == 0
    assert len(fake_fit.CALLS) == 16 + 4
    report = (tmp_path / "reports" / "out" / "smoke" / "encoders.md").read_text(encoding="utf-8")
    assert f"| {tmp_path / 'mine'} (`mine`) |" in report
    assert "| resume dev | resume test |" in report and " dev " in report


def test_arms_are_the_four_constructions():
    assert encoders.ARMS == {
        "random": (False, 0), "init": (True, 0), "pretrained": (False, None), "pretrained+init": (True, None),
    }  # fmt: skip
