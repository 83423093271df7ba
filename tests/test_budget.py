"""``--time-budget`` (crener/budget.py): minutes become epochs x steps by the documented rule, the
steps enter the run key and the minutes do not, and a real probe on tiny data plans a run that
the training loop then follows. ``crener reproduce --time-budget`` (experiments/budget_plan.py)
shares the plan's minutes over the cells still to run and saves each cell's steps, so a rerun finds
the same keys finished; ``crener tune --time-budget`` gives each trial MINUTES / trials."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from crener import budget
from crener.budget import Costs, plan_steps
from crener.cli import main as cli_main
from crener.errors import CrenerError
from crener.identity import run_key
from crener.tracking import Tracker
from experiments import budget_plan
from experiments.sweeps import plan
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


# --------------------------------------------------------------------------- reproduce


def _cells(seeds=(0, 1)) -> list:
    return plan(profile="smoke", only="table3", models=["crener", "w2ner"], seeds=list(seeds))


SLOW_STEPS = Costs(probe=10, step=0.7, dev_eval=5, end_eval=5, batches_per_epoch=1000)


class Probe:
    """A stand-in for crener.budget.measure: fixed costs, and the configs it was asked to time."""

    def __init__(self, costs: Costs = SLOW_STEPS):
        self.costs, self.timed = costs, []

    def __call__(self, cfg):
        self.timed.append(cfg.label)
        return self.costs


@pytest.mark.parametrize(
    ("minutes", "jobs", "to_run", "probing_s", "share"),
    [(10, 1, 4, 0, 2.5), (10, 2, 4, 60, 4.5), (10, 2, 1, 0, 20), (1, 1, 3, 90, 0.0)],
)
def test_each_cell_to_run_gets_an_equal_share_of_the_plan(minutes, jobs, to_run, probing_s, share):
    assert budget_plan.share_minutes(minutes, jobs, to_run, probing_s) == pytest.approx(share)


def test_reproduce_plans_once_and_a_rerun_reuses_the_saved_steps(tmp_path: Path) -> None:
    cells, probe = _cells(), Probe()
    # 4 cells, 2 at a time: 2 min each (less the fake probes' microseconds), so 120 - 10 - 5 - 2 x 5
    # = 95 s of 0.7 s steps: 135 steps, 67 an epoch over the smoke profile's 2.
    out = budget_plan.resolve(cells, 4, jobs=2, runs_dir=tmp_path, finished=lambda cfg: False, measure=probe,
                              machine="m")  # fmt: skip
    assert probe.timed == ["crener:full/resume/s0", "w2ner:full/resume/s0"]  # one probe a class of cost
    assert {(c.cfg.train.epochs, c.cfg.train.max_steps) for c in out} == {(2, 67)}
    assert [c.cfg.runtime.time_budget for c in out] == [pytest.approx(2, abs=1e-3)] * 4
    assert len(list((tmp_path / "smoke" / budget_plan.PLAN_DIR_NAME).glob("*.json"))) == 4
    keys = [run_key(c.cfg) for c in out]
    assert not set(keys) & {run_key(c.cfg) for c in cells}  # the steps are in the keys

    # A rerun (noisy timings, other --jobs) keeps the saved steps: the same keys, nothing timed.
    def no_probe(cfg):
        raise AssertionError("a saved plan was timed again")

    again = budget_plan.resolve(cells, 4, jobs=1, runs_dir=tmp_path, finished=lambda cfg: False, measure=no_probe,
                                machine="m")  # fmt: skip
    assert [run_key(c.cfg) for c in again] == keys
    # Other minutes or another machine plan afresh (another experiment).
    other = budget_plan.resolve(cells, 8, jobs=2, runs_dir=tmp_path, finished=lambda cfg: False,
                                measure=Probe(), machine="m")  # fmt: skip
    assert not set(keys) & {run_key(c.cfg) for c in other}
    # More seeds later: the finished cells cost nothing, so the 2 new ones share the 4 minutes.
    done = set(keys)
    wider = budget_plan.resolve(_cells((0, 1, 2)), 4, jobs=2, runs_dir=tmp_path, measure=Probe(), machine="m",
                                finished=lambda cfg: run_key(cfg) in done)  # fmt: skip
    assert [run_key(c.cfg) for c in wider if c.cfg.train.seed < 2] == keys
    new = [c.cfg for c in wider if c.cfg.train.seed == 2]
    assert [c.runtime.time_budget for c in new] == [pytest.approx(4, abs=1e-3)] * 2
    assert {(c.train.epochs, c.train.max_steps) for c in new} == {plan_steps(4, 2, SLOW_STEPS)}


def test_reproduce_budget_too_short_says_so_and_saves_nothing(tmp_path: Path) -> None:
    with pytest.raises(
        CrenerError, match=r"--time-budget 1 over 4 cell\(s\) to run, 1 at a time.*too short here"
    ):
        budget_plan.resolve(_cells(), 1, runs_dir=tmp_path, finished=lambda cfg: False, measure=Probe(),
                            machine="m")  # fmt: skip
    assert not (tmp_path / "smoke" / budget_plan.PLAN_DIR_NAME).exists()
    # A dry run times nothing: unplanned cells are listed as they are.
    cells = _cells()
    assert budget_plan.resolve(cells, 1, runs_dir=tmp_path, probe=False, finished=lambda cfg: False,
                               measure=Probe(), machine="m") == cells  # fmt: skip


def test_reproduce_time_budget_runs_once_and_logs_the_minutes(
    mlflow_store: str, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = Probe()
    monkeypatch.setattr(budget, "measure", probe)
    args = ["reproduce", "--profile", "smoke", "--only", "table3", "--models", "crener", "w2ner", "--seeds", "0",
            "--time-budget", "4", "--no-report"]  # fmt: skip
    assert cli_main(args) == 0
    assert len(fake_fit.CALLS) == 2 and len(probe.timed) == 2
    for key in fake_fit.CALLS:
        (run,) = Tracker().find_runs(key)
        assert run.finished and float(run.params["runtime.time_budget"]) == pytest.approx(2, abs=1e-2)
        assert (run.params["train.epochs"], run.params["train.max_steps"]) == ("2", "67")
    fake_fit.CALLS.clear()
    assert cli_main(args) == 0  # the rerun finds the saved plan, hence the finished keys
    assert fake_fit.CALLS == [] and len(probe.timed) == 2
    with pytest.raises(SystemExit):  # refused while parsing, before any probe
        cli_main([*args[:-3], "--time-budget", "-1"])


def test_reproduce_jobs_plan_once_in_the_parent_with_each_jobs_threads(
    mlflow_store: str, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from experiments import commands

    probe, threads = Probe(), []
    monkeypatch.setattr(budget, "measure", lambda cfg: threads.append(cfg.runtime.threads) or probe(cfg))
    monkeypatch.setattr(commands, "_cores", lambda: 4)
    spawned = []
    monkeypatch.setattr(commands, "spawn_jobs", lambda argv, jobs, sets, gpus: spawned.append(argv) or 0)
    args = ["reproduce", "--profile", "smoke", "--only", "table3", "--models", "crener", "w2ner", "--seeds", "0",
            "--time-budget", "4", "--no-report"]  # fmt: skip
    assert cli_main([*args, "--jobs", "2"]) == 0
    assert threads == [2, 2] and len(spawned) == 1 and fake_fit.CALLS == []  # planned, nothing trained yet
    saved = [
        json.loads(p.read_text()) for p in (tmp_path / "runs" / "smoke" / budget_plan.PLAN_DIR_NAME).iterdir()
    ]
    assert [e["jobs"] for e in saved] == [2, 2]  # 2 copies on 4 cores run side by side (on 1 core: 1)
    assert cli_main(args) == 0  # what each copy runs: the parent's plan, 2 cells x 2 jobs of 4 minutes
    assert len(probe.timed) == 2 and len(fake_fit.CALLS) == 2
    for key in fake_fit.CALLS:
        (run,) = Tracker().find_runs(key)
        assert float(run.params["runtime.time_budget"]) == pytest.approx(4, abs=1e-2)


# --------------------------------------------------------------------------- tune


def test_each_trial_gets_its_share_and_the_study_logs_it(
    mlflow_store: str, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from experiments.tune import tune

    assert tune_minutes(6, 3, 60) == pytest.approx(1.666666, abs=1e-4)
    probe = Probe()
    monkeypatch.setattr(budget, "measure", probe)
    study = tune(dataset="resume", trials=2, profile="smoke", storage=f"sqlite:///{tmp_path / 'o.db'}",
                 study_name="budget", time_budget=4)  # fmt: skip
    assert len(probe.timed) == 3  # the base config once, then each trial's own config
    share = tune_minutes(4, 2)
    epochs, steps = plan_steps(share, 2, SLOW_STEPS)
    tracker = Tracker()
    (parent,) = tracker.search("crener-tune-smoke", "tags.`crener.role` = 'study'")
    assert parent.tags["crener.time_budget"] == "4" and float(
        parent.tags["crener.trial_minutes"]
    ) == pytest.approx(share, abs=1e-3)
    history = tracker.client.get_metric_history(parent.run_id, "trial/max_steps")
    assert sorted((m.step, m.value) for m in history) == [(t.number, steps) for t in study.trials]
    trials = [
        r
        for r in tracker.search("crener-tune-smoke", "tags.`crener.study` = 'budget'")
        if "crener.trial" in r.tags
    ]
    assert len(trials) == 2
    for run in trials:
        assert float(run.params["runtime.time_budget"]) == pytest.approx(share, abs=1e-3)
        assert (int(run.params["train.epochs"]), int(run.params["train.max_steps"])) == (epochs, steps)
    # Too short for the base config: one error before the study (or its database) exists.
    with pytest.raises(CrenerError, match=r"--time-budget 0.1 over 2 trial\(s\).*too short here"):
        tune(dataset="resume", trials=2, profile="smoke", storage=f"sqlite:///{tmp_path / 'short.db'}",
             time_budget=0.1)  # fmt: skip
    assert not (tmp_path / "short.db").exists()


def tune_minutes(minutes: float, trials: int, probing_s: float = 0.0) -> float:
    from experiments.tune import trial_minutes

    return trial_minutes(minutes, trials, probing_s)
