"""The GPU check's CPU dry run: the whole script at tiny sizes, as the GPU machine will run it
(from the source tree, with no MLflow, Optuna or nox importable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crener.tools import gpucheck

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = """
import sys

class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mlflow", "optuna", "nox"}:
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, _NotOnTheGpuMachine())
"""


def test_dry_run_on_cpu_runs_every_check_without_tracking_libraries(shared_data, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    data = gpucheck.prepare(tmp_path / "carried", str(shared_data))  # what travels with the tree
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    env.pop("CRENER_DATA", None)
    out = tmp_path / "check.json"
    res = subprocess.run(
        [sys.executable, "-m", "crener.tools.gpucheck", "--device", "cpu", "--tiny", "--data-root", str(data),
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["check"] for r in rows] == ["tests", "speed", "speed", "speed", "speed", "epoch", "worst batch"]
    assert all(r["ok"] for r in rows)
    assert rows[0]["result"].startswith("6 passed")  # the gpu tests ran on the CPU, none skipped
    assert {r["setting"] for r in rows[1:5]} == {
        f"{m} full, {p}" for m in ("w2ner", "crener") for p in ("fp32", "bf16")
    }
    assert all(r["train_sent_per_s"] > 0 and r["eval_sent_per_s"] > 0 for r in rows[1:5])
    assert rows[6]["setting"].startswith("MSRA, 2 longest chunks")
    assert "| check" in res.stdout and "GPU check on CPU" in res.stdout


def test_a_failing_step_is_a_row_and_the_exit_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(args):  # noqa: ANN001, ANN202
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpucheck, "check_epoch", broken)
    monkeypatch.setattr(gpucheck, "check_tests", lambda args: {"check": "tests", "setting": "", "ok": True})
    out = tmp_path / "rows.json"
    rc = gpucheck.main(["--device", "cpu", "--tiny", "--skip", "speed", "worst batch", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 1
    assert rows[1] == {
        **rows[1],
        "check": "epoch",
        "ok": False,
        "error": "RuntimeError: CUDA error: out of memory",
    }


def test_prepare_names_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "resume").mkdir()
    with pytest.raises(FileNotFoundError, match="resume/train.char.bmes"):
        gpucheck.prepare(tmp_path / "out", str(tmp_path))
