"""``--time-budget`` (crener/budget.py): minutes become epochs x steps by the documented rule, each
of its terms counted (the start-up, the probe, the run's set-up, steps, evaluations, checkpoints,
the end, the store's writes), the steps enter the run key and the minutes do not, and a real probe
on tiny data measures every term and plans a run that the training loop then follows; a rerun
of ``crener train --time-budget`` reuses its saved plan.
``crener reproduce --time-budget`` (experiments/budget_plan.py) shares the plan's minutes over the
cells still to run and saves each cell's steps, so a rerun finds the same keys finished;
``crener tune --time-budget`` gives each trial MINUTES / trials."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest

from crener import budget
from crener.budget import Costs, plan_steps
from crener.cli import main as cli_main
from crener.errors import CrenerError
from crener.identity import run_key
from crener.tracking import Tracker, run_store_writes
from experiments import budget_plan
from experiments.sweeps import plan
from tests.helpers import tiny_cfg, tiny_resume

TEN_MIN = Costs(probe=30, step=0.5, dev_eval=5, end_eval=10, batches_per_epoch=500)


@pytest.mark.parametrize(
    ("minutes", "epochs", "costs", "plan"),
    [
        # (600 - 30 - 10 - 4 * 5) / 0.5 = 1080 steps, 270 an epoch (under the 500 batches)
        (10, 4, TEN_MIN, (4, 270)),
        # 1080 / 4 = 270 > 100 batches an epoch: whole epochs of 100 steps and an evaluation
        # (55 s each), as many as the 560 s hold: 10
        (10, 4, replace(TEN_MIN, batches_per_epoch=100), (10, 100)),
        # Exactly one step an epoch fits.
        (1, 2, Costs(probe=50, step=1.0, dev_eval=2, end_eval=4, batches_per_epoch=9), (2, 1)),
        # Each later term alone, then all together, against the first case's 1080 steps:
        # (600 - 30 - 10 - 10 s before the probe - 4 * 5) / 0.5 = 1060 steps, 265 an epoch
        (10, 4, replace(TEN_MIN, before=10), (4, 265)),
        # (600 - 30 - 10 - 20 s of the run's set-up - 4 * 5) / 0.5 = 1040: 260 an epoch
        (10, 4, replace(TEN_MIN, setup=20), (4, 260)),
        # (600 - 30 - 10 - 4 * (5 + 2.5 s of checkpoints and logging)) / 0.5 = 1060: 265 an epoch
        (10, 4, replace(TEN_MIN, epoch=2.5), (4, 265)),
        # (600 - 8 - 30 - 12 - 10 - 4 * (5 + 2)) / 0.5 = 1024: 256 an epoch
        (10, 4, replace(TEN_MIN, before=8, setup=12, epoch=2), (4, 256)),
        # Whole epochs pay the epoch's other costs too: 100 steps, an evaluation and 5 s of
        # checkpoints (60 s each) in the 560 s: 9, where 10 fit without them (the second case) ...
        (10, 4, replace(TEN_MIN, batches_per_epoch=100, epoch=5), (9, 100)),
        # ... and the fixed costs come off first: (600 - 10 - 30 - 50 - 10) / 55 = 9 whole epochs.
        (10, 4, replace(TEN_MIN, batches_per_epoch=100, before=10, setup=50), (9, 100)),
    ],
)
def test_minutes_become_epochs_and_steps(minutes, epochs, costs, plan):
    assert plan_steps(minutes, epochs, costs) == plan


def test_a_budget_too_short_says_the_minimum():
    costs = Costs(probe=50, step=1.0, dev_eval=3, end_eval=4, batches_per_epoch=9)
    with pytest.raises(CrenerError, match=r"--time-budget 1: too short here.* at least 2 min"):
        plan_steps(1, 2, costs)


def test_a_budget_too_short_names_every_cost():
    # 9 + 20 + 10 + 4 = 43 s once and 3 + 2 s an epoch leave 60 - 43 - 10 = 7 steps: 3 an epoch.
    costs = Costs(
        probe=20, step=1.0, dev_eval=3, end_eval=4, batches_per_epoch=9, before=9, setup=10, epoch=2
    )
    assert plan_steps(1, 2, costs) == (2, 3)
    tight = replace(costs, before=15)  # 49 s once: 60 - 49 - 10 = 1 step for 2 epochs
    message = (
        r"--time-budget 1: too short here: 15 s spent before the probe, the probe took 20 s, the run's "
        r"set-up takes 10.0 s and its end 4.0 s, an epoch's evaluation and checkpoints 5.0 s and a step "
        r"1.00 s, so 2 epochs need at least 2 min"
    )
    with pytest.raises(CrenerError, match=message):
        plan_steps(1, 2, tight)


def test_steps_are_timed_on_batches_spread_over_their_sizes():
    # 12 batches of one sentence each, of lengths 1..12 shuffled: the 3 strata ranked by cells
    # (lengths 1..4, 5..8, 9..12) give their middles, lengths 3, 7 and 11, in epoch order.
    lengths = [7, 1, 12, 3, 9, 5, 11, 2, 8, 4, 10, 6]
    batches = [[i] for i in range(12)]
    assert budget.spread_sample(batches, lengths, 3) == [0, 3, 6]
    assert [lengths[i] for i in budget.spread_sample(batches, lengths, 3)] == [7, 3, 11]
    # Cells, not sentences: one 12-character sentence (144 cells) outweighs two of 5 (50).
    assert budget.spread_sample([[0, 1], [2]], [5, 5, 12], 1) == [1]
    assert budget.spread_sample(batches[:2], lengths, 6) == [0, 1]  # no more than k: all of them


def test_a_fresh_process_counts_its_start_up(monkeypatch):
    code = "import time; from crener.budget import process_started; print(time.time() - process_started())"
    age = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert 0 < age < 60  # the interpreter's start and crener's imports, not the machine's uptime
    started = budget.process_started()
    assert started is not None and started <= time.time()

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    # Without the kernel's record: when the command line was loaded.
    from crener import cli

    monkeypatch.setattr("builtins.open", no_proc)
    assert budget.process_started() == cli.LOADED


def test_steps_are_keyed_and_minutes_are_not(tiny_data, monkeypatch):
    costs = Costs(probe=1, step=0.1, dev_eval=0.5, end_eval=1, batches_per_epoch=1000)
    monkeypatch.setattr(budget, "measure", lambda cfg, **where: costs)
    cfg = tiny_cfg(tiny_data)
    a, b = budget.apply_budget(cfg, 1), budget.apply_budget(cfg, 2)
    assert (a.train.epochs, a.train.max_steps, a.runtime.time_budget) == (3, (60 - 2 - 1.5) // 0.1 // 3, 1.0)
    assert run_key(a) != run_key(b)  # more minutes bought more steps: another experiment
    again = tiny_cfg(tiny_data, **{"train.epochs": a.train.epochs, "train.max_steps": a.train.max_steps})
    assert run_key(again) == run_key(a)  # the same steps without a budget: the same run
    with pytest.raises(CrenerError, match="must be > 0"):
        budget.apply_budget(cfg, 0)


def test_the_probe_measures_every_term_of_this_run(tiny_data, tmp_path, mlflow_store, monkeypatch):
    cfg = tiny_cfg(tiny_data, **{"runtime.eval_every": 2})
    seen = {}

    def spy(name):
        real = getattr(budget, name)
        monkeypatch.setattr(budget, name, lambda *a: seen.setdefault(name, real(*a)))

    for name in ("_store_costs", "_time_curve_row", "_writable_parent"):
        spy(name)
    folder = tmp_path / "runs" / "smoke"  # not there yet: the probe writes in its nearest parent
    # A real probe: the run's own parts built twice, its steps, a curve row, its epoch's dev scoring
    # and checkpoints, its end, and the store it logs to.
    costs = budget.measure(cfg, started=time.time() - 5, experiment="crener-adhoc-smoke", folder=folder)
    (reads, write), row = seen["_store_costs"], seen["_time_curve_row"]
    start_writes, end_writes = run_store_writes(cfg)
    assert 5 <= costs.before < costs.probe + 5 and costs.probe > costs.step > 0 and costs.dev_eval > 0
    assert reads > 0 and write > 0 and start_writes > 0 and end_writes > 0
    assert costs.setup > reads + start_writes * write  # the second build, and the store's start
    assert costs.step > (row + write) / 2 > 0  # a curve row every 2 steps
    assert costs.epoch > write  # the epoch's checkpoints and batching, and its metrics' write
    assert costs.end_eval > end_writes * write  # final_test, and the summary's writes
    assert costs.batches_per_epoch >= 1
    assert seen["_writable_parent"] == tmp_path and not folder.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("crener-probe-")]  # cleaned up
    assert Tracker().client.get_experiment_by_name("crener-adhoc-smoke") is not None  # as the run makes it


class FakeSteps:
    """``crener.train.train_one_epoch`` on a fake clock: batch position i costs 1 + i / 1000 s and a
    pass's own start 0.25 s (the empty pass), so the probe's step is an exact mean; it records the
    batches of every pass."""

    def __init__(self, batches):
        self.position = {tuple(b): i for i, b in enumerate(batches)}
        self.now, self.passes = 0.0, []

    def clock(self):
        return self.now

    def __call__(self, model, task, examples, chosen, *args, **kwargs):
        self.passes.append([self.position[tuple(b)] for b in chosen])
        self.now += 0.25 + sum(1 + self.position[tuple(b)] / 1000 for b in chosen)


@pytest.mark.parametrize(("window", "most", "want"), [(0.0, 40, 6), (11.0, 40, 11), (1e9, 9, 9)])
def test_steps_are_timed_until_they_fill_the_window(tmp_path, monkeypatch, window, most, want):
    """Six steps give the step's size; more, spread over the sizes the same way, fill the window
    (here about 1 s a step: 11 s is 11 steps), at most PROBE_MAX_STEPS; the step is their mean."""
    import numpy as np

    from crener import train
    from crener.data.batching import training_batches

    cfg = tiny_cfg(tiny_resume(tmp_path / "data", 40), **{"train.max_cells": 800})
    parts, opt, device = budget._set_up(cfg, tmp_path / "run")
    lengths = [e.n for e in parts.train_examples]
    batches = training_batches(lengths, cfg.train, np.random.default_rng([cfg.train.seed, 1]))
    assert len(batches) >= 14
    fake = FakeSteps(batches)
    monkeypatch.setattr(train, "train_one_epoch", fake)
    monkeypatch.setattr(budget, "time", types.SimpleNamespace(perf_counter=fake.clock))
    monkeypatch.setattr(budget, "PROBE_WINDOW_S", window)
    monkeypatch.setattr(budget, "PROBE_MAX_STEPS", most)
    step, _, count, _ = budget._time_steps(cfg, parts, opt, device)
    six = budget.spread_sample(batches, lengths, budget.PROBE_STEPS)
    rest = [i for i in range(len(batches)) if i not in six]
    extra = [rest[j] for j in budget.spread_sample([batches[i] for i in rest], lengths, want - 6)]
    timed = [p for p in fake.passes[2:] if p]  # after the warm-up and the empty pass
    assert sorted({i for p in timed for i in p}) == sorted(six + extra) and len(six + extra) == want
    assert step == pytest.approx(np.mean([1 + i / 1000 for i in six + extra]))
    assert count == len(batches)


def test_a_probe_beside_neighbours_times_with_them_training(tiny_data, tmp_path, monkeypatch):
    """``beside``: a second process trains another config's steps (it burns CPU) while the probe
    times its steps, and is gone when the probe returns."""
    import multiprocessing

    cfg = tiny_cfg(tiny_data)
    seen = []
    real = budget._time_steps

    def spy(*args):
        children = multiprocessing.active_children()
        busy = [_cpu_seconds(c.pid) for c in children]
        time.sleep(1.0)
        seen.append((len(children), [_cpu_seconds(c.pid) - b for c, b in zip(children, busy, strict=True)]))
        return real(*args)

    monkeypatch.setattr(budget, "_time_steps", spy)
    costs = budget.measure(cfg, folder=tmp_path, beside=[tiny_cfg(tiny_data, "w2ner")])
    [(count, burnt)] = seen
    assert count == 1 and burnt[0] > 0.5  # most of a core for the second it was watched
    assert costs.step > 0 and not multiprocessing.active_children()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` (Linux's /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_neighbour_that_fails_to_start_stops_the_probe_with_its_cause(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, **{"runtime.data_root": str(tmp_path / "nowhere")})
    failed = r"beside the probe failed \(exit code 1\).*--jobs 1"
    with pytest.raises(CrenerError, match=failed), budget._beside([cfg], tmp_path) as ready:
        ready()


def test_train_plans_with_its_start_and_follows_the_plan(tiny_data, tmp_path, capsys, monkeypatch):
    planned = Costs(
        probe=1, step=0.5, dev_eval=1, end_eval=2, batches_per_epoch=4, before=1, setup=1, epoch=0.5
    )
    where = {}
    monkeypatch.setattr(budget, "measure", lambda cfg, **kw: where.update(kw) or planned)
    epochs, per_epoch = plan_steps(0.25, 2, planned)
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(tiny_data), "--no-track",
            "--workdir", str(tmp_path / "run"), "--time-budget", "0.25", "--set", "data.train_limit=0"]  # fmt: skip
    called = time.time()
    assert cli_main(args) == 0
    # Called in this process, the command's clock starts with the call (run as the script, with the
    # process); untracked, no store; the probe writes where the run will.
    assert called <= where["started"] <= time.time()
    assert where["experiment"] is None and where["folder"] == tmp_path / "run"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["runtime.time_budget"], config["train.epochs"], config["train.max_steps"]) == (
        0.25, epochs, per_epoch,
    )  # fmt: skip
    assert summary["epochs"] == epochs


def test_a_rerun_of_train_reuses_its_saved_plan(tiny_data, tmp_path, capsys, monkeypatch):
    """A rerun of the same ``crener train --time-budget`` (after a kill, say) must land on the same
    key, so it resumes or finds the run finished: it takes the saved plan instead of a new probe,
    whose noisy timings would give other steps. ``--no-resume`` plans afresh."""
    first = Costs(
        probe=1, step=0.5, dev_eval=1, end_eval=2, batches_per_epoch=40, before=1, setup=1, epoch=0.5
    )
    slower = replace(first, step=1.0)
    assert plan_steps(0.25, 2, first) != plan_steps(0.25, 2, slower)
    probes = []
    monkeypatch.setattr(
        budget, "measure", lambda cfg, **kw: probes.append(cfg) or (first, slower)[len(probes) > 1]
    )
    run = tmp_path / "run"
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(tiny_data), "--no-track",
            "--workdir", str(run), "--time-budget", "0.25", "--set", "data.train_limit=0"]  # fmt: skip

    def steps() -> tuple[int, int]:
        config = json.loads((run / "config.json").read_text())
        return config["train.epochs"], config["train.max_steps"]

    assert cli_main(args) == 0
    assert len(probes) == 1 and steps() == plan_steps(0.25, 2, first)
    (saved,) = (run / budget.PLAN_DIR_NAME).glob("*.json")
    entry = json.loads(saved.read_text())
    assert (entry["command"], entry["minutes"], entry["key_before_budget"]) == (
        "train",
        0.25,
        run_key(probes[0]),
    )
    assert (entry["epochs"], entry["max_steps"]) == plan_steps(0.25, 2, first)
    assert cli_main(args) == 0  # the rerun: no probe, the same steps
    assert len(probes) == 1 and steps() == plan_steps(0.25, 2, first)
    assert cli_main([*args, "--no-resume"]) == 0
    assert len(probes) == 2 and steps() == plan_steps(0.25, 2, slower)
    assert json.loads(saved.read_text())["max_steps"] == plan_steps(0.25, 2, slower)[1]
    capsys.readouterr()


# The MlflowClient calls that write to the store.
STORE_WRITES = ("create_experiment", "set_experiment_tag", "create_run", "update_run", "log_batch",
                "log_inputs", "log_artifact", "set_tag", "set_terminated", "delete_run")  # fmt: skip


def test_a_tracked_run_makes_the_store_writes_the_plan_counts(
    tiny_data, mlflow_store: str, fake_fit: types.ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    where = {}
    costs = Costs(probe=1, step=0.1, dev_eval=0.5, end_eval=1, batches_per_epoch=1000)
    monkeypatch.setattr(budget, "measure", lambda cfg, **kw: where.update(kw) or costs)
    Tracker().experiment_id("crener-adhoc-smoke")  # as the probe leaves it
    writes = []

    def counted(name):
        real = getattr(MlflowClient, name)

        def write(self, *args, **kwargs):
            writes.append(name)
            return real(self, *args, **kwargs)

        return write

    for name in STORE_WRITES:
        monkeypatch.setattr(MlflowClient, name, counted(name))
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(tiny_data),
            "--time-budget", "1"]  # fmt: skip
    assert cli_main(args) == 0
    assert where["experiment"] == "crener-adhoc-smoke" and where["folder"] == tmp_path / "runs"
    (key,) = fake_fit.CALLS
    (run,) = Tracker().find_runs(key)
    epochs = int(run.params["train.epochs"])
    start, end = run_store_writes(tiny_cfg(tiny_data))
    assert len(writes) == start + epochs + end, writes  # one write an epoch: its metrics


# --------------------------------------------------------------------------- reproduce


def _cells(seeds=(0, 1)) -> list:
    return plan(profile="smoke", only="table3", models=["crener", "w2ner"], seeds=list(seeds))


SLOW_STEPS = Costs(probe=10, step=0.7, dev_eval=5, end_eval=5, batches_per_epoch=1000, setup=2, epoch=0.5)
# What a cell of reproduce pays: its class's probe is paid once, before the cells.
CELL_STEPS = replace(SLOW_STEPS, probe=0.0)


class Probe:
    """A stand-in for crener.budget.measure: fixed costs, and the configs it was asked to time."""

    def __init__(self, costs: Costs = SLOW_STEPS):
        self.costs, self.timed, self.beside = costs, [], []

    def __call__(self, cfg, **where):
        self.timed.append(cfg.label)
        self.beside.append([c.label for c in where.get("beside", ())])
        return self.costs


@pytest.mark.parametrize(
    ("minutes", "jobs", "to_run", "probing_s", "share"),
    [(10, 1, 4, 0, 2.5), (10, 2, 4, 60, 4.5), (10, 2, 1, 0, 20), (1, 1, 3, 90, 0.0)],
)
def test_each_cell_to_run_gets_an_equal_share_of_the_plan(minutes, jobs, to_run, probing_s, share):
    assert budget_plan.share_minutes(minutes, jobs, to_run, probing_s) == pytest.approx(share)


def test_reproduce_plans_once_and_a_rerun_reuses_the_saved_steps(tmp_path: Path) -> None:
    cells, probe = _cells(), Probe()
    # 4 cells, 2 at a time: 2 min each (less the fake probes' microseconds), so 120 - 2 - 5 - 2 x (5 +
    # 0.5) = 102 s of 0.7 s steps: 145 steps, 72 an epoch over the smoke profile's 2 (the probe's
    # 10 s were paid once, before the cells).
    out = budget_plan.resolve(cells, 4, jobs=2, runs_dir=tmp_path, finished=lambda cfg: False, measure=probe,
                              machine="m")  # fmt: skip
    assert probe.timed == ["crener:full/resume/s0", "w2ner:full/resume/s0"]  # one probe a class of cost
    # Each timed beside the other class, as their cells alternate two at a time.
    assert probe.beside == [["w2ner:full/resume/s0"], ["crener:full/resume/s0"]]
    assert {(c.cfg.train.epochs, c.cfg.train.max_steps) for c in out} == {(2, 72)}
    assert [c.cfg.runtime.time_budget for c in out] == [pytest.approx(2, abs=1e-3)] * 4
    assert len(list((tmp_path / "smoke" / budget.PLAN_DIR_NAME).glob("*.json"))) == 4
    keys = [run_key(c.cfg) for c in out]
    assert not set(keys) & {run_key(c.cfg) for c in cells}  # the steps are in the keys

    # A rerun (noisy timings, other --jobs) keeps the saved steps: the same keys, nothing timed.
    def no_probe(cfg, **where):
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
    assert {(c.train.epochs, c.train.max_steps) for c in new} == {plan_steps(4, 2, CELL_STEPS)}


@pytest.mark.parametrize(
    ("cells", "jobs", "beside"),
    [(1, 2, [[]]), (2, 1, [[], []]), (4, 3, [["w2ner", "crener"], ["crener", "w2ner"]])],
)
def test_a_class_is_timed_beside_the_neighbours_its_cells_will_have(tmp_path, cells, jobs, beside):
    """As many neighbours as cells will run beside it (jobs, or fewer cells to run), each the next
    class of the plan in turn."""
    probe = Probe()
    budget_plan.resolve(_cells((0, 1))[:cells], 30, jobs=jobs, runs_dir=tmp_path, finished=lambda cfg: False,
                        measure=probe, machine="m")  # fmt: skip
    assert [[label.split(":")[0] for label in b] for b in probe.beside] == beside


def test_reproduce_budget_too_short_says_so_and_saves_nothing(tmp_path: Path) -> None:
    with pytest.raises(
        CrenerError, match=r"--time-budget 1 over 4 cell\(s\) to run, 1 at a time.*too short here"
    ):
        budget_plan.resolve(_cells(), 1, runs_dir=tmp_path, finished=lambda cfg: False, measure=Probe(),
                            machine="m")  # fmt: skip
    assert not (tmp_path / "smoke" / budget.PLAN_DIR_NAME).exists()
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
        share = float(run.params["runtime.time_budget"])
        assert run.finished and share == pytest.approx(2, abs=1e-2)  # less this command's start-up
        assert (int(run.params["train.epochs"]), int(run.params["train.max_steps"])) == plan_steps(
            share, 2, CELL_STEPS
        )
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
    monkeypatch.setattr(
        budget, "measure", lambda cfg, **kw: threads.append(cfg.runtime.threads) or probe(cfg)
    )
    monkeypatch.setattr(commands, "_cores", lambda: 4)
    spawned = []
    monkeypatch.setattr(commands, "spawn_jobs", lambda argv, jobs, sets, gpus: spawned.append(argv) or 0)
    args = ["reproduce", "--profile", "smoke", "--only", "table3", "--models", "crener", "w2ner", "--seeds", "0",
            "--time-budget", "4", "--no-report"]  # fmt: skip
    assert cli_main([*args, "--jobs", "2"]) == 0
    assert threads == [2, 2] and len(spawned) == 1 and fake_fit.CALLS == []  # planned, nothing trained yet
    saved = [
        json.loads(p.read_text()) for p in (tmp_path / "runs" / "smoke" / budget.PLAN_DIR_NAME).iterdir()
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


@pytest.mark.parametrize(("sets", "cached"), [
    ({"train.encoder_lr": 0.0}, True), ({"train.encoder_top_layers": 1}, True), ({}, False),
])  # fmt: skip
def test_a_frozen_encoders_steps_and_scorings_are_timed_as_the_run_meets_them(
    tiny_data, tmp_path, monkeypatch, sets, cached
):
    """Frozen features are cached process-wide: the run reads what the probe encoded, so the probe
    times its steps, dev scoring and end a second time, and counts the sentences it did not encode."""
    from crener import train

    cfg = tiny_cfg(tiny_data, **sets)
    assert cfg.train.caches_features is cached
    calls = {"train_one_epoch": 0, "calibrate_on_dev": 0, "final_test": 0}
    for name in calls:
        real = getattr(train, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(train, name, counted)
    costs = budget.measure(cfg, folder=tmp_path)
    # warm-up, the pass's own start, the sample (twice where cached)
    assert calls == {"train_one_epoch": 4 if cached else 3, "calibrate_on_dev": 2 if cached else 1,
                     "final_test": 2 if cached else 1}  # fmt: skip
    assert costs.step > 0 and costs.setup > 0 and costs.dev_eval > 0 and costs.end_eval > 0
