"""``--time-budget`` (crener/budget.py): minutes become epochs x steps by the documented rule, the
steps enter the run key and the minutes do not, and a real probe on tiny data plans a run that
the training loop then follows."""

from __future__ import annotations

import json

import pytest

from crener import budget
from crener.budget import Costs, plan_steps
from crener.cli import main as cli_main
from crener.errors import CrenerError
from crener.identity import run_key
from tests.helpers import tiny_cfg


@pytest.mark.parametrize(
    ("minutes", "epochs", "costs", "plan"),
    [
        # (600 - 30 - 10 - 4 * 5) / 0.5 = 1080 steps, 270 an epoch (under the 500 batches)
        (10, 4, Costs(probe=30, step=0.5, dev_eval=5, end_eval=10, batches_per_epoch=500), (4, 270)),
        # 1080 / 4 = 270 > 100 batches an epoch: whole epochs of 100 steps and an evaluation
        # (55 s each), as many as the 560 s hold: 10
        (10, 4, Costs(probe=30, step=0.5, dev_eval=5, end_eval=10, batches_per_epoch=100), (10, 100)),
        # Exactly one step an epoch fits.
        (1, 2, Costs(probe=50, step=1.0, dev_eval=2, end_eval=4, batches_per_epoch=9), (2, 1)),
    ],
)
def test_minutes_become_epochs_and_steps(minutes, epochs, costs, plan):
    assert plan_steps(minutes, epochs, costs) == plan


def test_a_budget_too_short_says_the_minimum():
    costs = Costs(probe=50, step=1.0, dev_eval=3, end_eval=4, batches_per_epoch=9)
    with pytest.raises(CrenerError, match=r"--time-budget 1: too short here.* at least 2 min"):
        plan_steps(1, 2, costs)


def test_steps_are_keyed_and_minutes_are_not(tiny_data, monkeypatch):
    costs = Costs(probe=1, step=0.1, dev_eval=0.5, end_eval=1, batches_per_epoch=1000)
    monkeypatch.setattr(budget, "measure", lambda cfg: costs)
    cfg = tiny_cfg(tiny_data)
    a, b = budget.apply_budget(cfg, 1), budget.apply_budget(cfg, 2)
    assert (a.train.epochs, a.train.max_steps, a.runtime.time_budget) == (3, (60 - 2 - 1.5) // 0.1 // 3, 1.0)
    assert run_key(a) != run_key(b)  # more minutes bought more steps: another experiment
    again = tiny_cfg(tiny_data, **{"train.epochs": a.train.epochs, "train.max_steps": a.train.max_steps})
    assert run_key(again) == run_key(a)  # the same steps without a budget: the same run
    with pytest.raises(CrenerError, match="must be > 0"):
        budget.apply_budget(cfg, 0)


def test_the_probe_measures_this_run_and_train_follows_the_plan(tiny_data, tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg(tiny_data)
    costs = budget.measure(cfg)  # a real probe: the run's own parts, steps and dev evaluation
    assert costs.probe > costs.step > 0 and costs.dev_eval > 0 and costs.end_eval > costs.dev_eval
    assert costs.batches_per_epoch >= 1
    # The command plans with the measured costs (fixed here, so the plan is known) and trains it.
    planned = Costs(probe=1, step=0.5, dev_eval=1, end_eval=2, batches_per_epoch=costs.batches_per_epoch)
    monkeypatch.setattr(budget, "measure", lambda cfg: planned)
    epochs, per_epoch = plan_steps(0.25, 2, planned)
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(tiny_data), "--no-track",
            "--workdir", str(tmp_path / "run"), "--time-budget", "0.25", "--set", "data.train_limit=0"]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["runtime.time_budget"], config["train.epochs"], config["train.max_steps"]) == (
        0.25, epochs, per_epoch,
    )  # fmt: skip
    assert summary["epochs"] == epochs
