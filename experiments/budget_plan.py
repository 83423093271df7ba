"""``crener reproduce --time-budget MINUTES``: the plan's minutes become each cell's steps, once.

MINUTES is the wall time of the whole plan on this machine. The rule:

- a cell already planned for these minutes on this machine keeps its saved steps (below), and
  costs nothing if the tracking store holds it finished;
- every other cell gets an equal share: ``share = (MINUTES - spent) x jobs / cells to run``,
  where *cells to run* are the plan's cells less the finished ones, *jobs* the cells that run
  side by side at the probed speed (one a GPU with ``--gpus``; else ``--jobs``, or the local Dask
  cluster's workers, up to the CPU cores: copies past them share cores and each runs slower) and
  *spent* the wall time the command spent before the cells run: its start (from its process's,
  as ``crener train --time-budget`` counts it) and the timing of the cells here;
- its steps are :func:`crener.budget.plan_steps` of that share with the costs the probe of
  :func:`crener.budget.measure` found for its config, less the probe's own time (paid once, in
  *spent*). Cells that differ only in their seed cost the same, so one probe serves them all; a
  probe runs with the thread count the cell will have, times the cell's store and files where the
  cell logs and writes, and beside as many neighbours as the cell will have (``min(jobs, cells to
  run) - 1`` processes, ``beside`` of :func:`crener.budget.measure`), each training the next class
  of the plan in turn (the class itself in a plan of one), as the cells to run take turns.

A cell's share covers its whole run: its set-up (which the probe times), steps, evaluations,
checkpoints and logging, by ``crener train --time-budget``'s rule. The share is recorded with the run as
``runtime.time_budget`` (the minutes *that run* was planned for, comparable to ``crener train
--time-budget``), and the steps enter its key.

Run-once needs the same steps on every rerun, and probe timings are noisy: so each cell's plan is
measured once and saved as a small JSON file, ``<runs-dir>/<profile>/.budgets/<digest>.json``
(:func:`crener.budget.plan_path`; ``crener train --time-budget`` saves its plans the same way),
the digest naming the cell's key before the budget (its config without the resolved steps), the
minutes and the machine (:func:`crener.device.machine_label`). A file rather than an MLflow tag: it
is needed before any run exists (the key depends on it), it is written whole before any cell
trains (a budget too short for one cell writes none), and every process sharing the runs
directory reads it (the ``--jobs`` copies, ``--worker I/N`` shards, a rerun after a kill), which
then find the finished cells under the same keys and resume the killed one with the same steps.
Another machine (or other minutes) plans afresh: its steps are another experiment. Delete the
folder to plan again.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from crener import budget
from crener.budget import Costs, plan_path, plan_steps, read_plan, with_plan
from crener.config import RunConfig
from crener.files import write_atomic
from crener.identity import run_key
from crener.workspace import resolve_runs_dir

log = logging.getLogger(__name__)


def share_minutes(minutes: float, jobs: int, to_run: int, spent_s: float = 0.0) -> float:
    """The minutes each cell still to run gets: the plan's minutes less the seconds spent before
    the cells (start-up and probing), ``jobs`` cells at a time, split evenly over ``to_run`` cells."""
    return max(minutes * 60 - spent_s, 0.0) * jobs / max(to_run, 1) / 60


def cost_class(cfg: RunConfig) -> str:
    """Cells of one class cost the same to train: those that differ only in their seed."""
    return run_key(cfg.with_overrides({"train.seed": 0}))


def finished_in_store(cfg: RunConfig) -> bool:
    """Whether the tracking store holds ``cfg``'s key finished (as crener.runner would skip it)."""
    from crener.tracking import Tracker

    return any(r.finished for r in Tracker().find_runs(run_key(cfg)))


def _machine() -> str:
    from crener.device import machine_label  # (loads torch: only where a budget is planned)

    return machine_label()


def resolve(
    cells: Sequence[Any],
    minutes: float,
    *,
    jobs: int = 1,
    runs_dir: str | Path | None = None,
    probe: bool = True,
    finished: Callable[[RunConfig], bool] = finished_in_store,
    measure: Callable[..., Costs] | None = None,
    machine: str | None = None,
    started: float | None = None,
) -> list[Any]:
    """``cells`` (:class:`experiments.sweeps.Cell`) with their steps fixed by the module's rule.

    Saved plans are reused; the other cells are probed and planned, and their plans saved, unless
    ``probe`` is off (``--dry-run``: they are returned as they were). A budget too short for one
    step an epoch of any cell raises :class:`crener.errors.CrenerError` before anything is saved.
    ``started``: when the command's clock started (:func:`time.time`; None: with the probes).
    """
    machine = machine or _machine()
    paths = [plan_path(c.cfg, minutes, machine, runs_dir) for c in cells]
    out: dict[int, Any] = {}
    for i, (cell, path) in enumerate(zip(cells, paths, strict=True)):
        entry = read_plan(path)
        if entry is not None:
            out[i] = replace(cell, cfg=with_plan(cell.cfg, entry))
    done = sum(finished(c.cfg) for c in out.values())
    new = [i for i in range(len(cells)) if i not in out]
    log.info("--time-budget %g min: %d cell(s) planned before (%d finished), %d to plan", minutes,
             len(out), done, len(new))  # fmt: skip
    if new and probe:
        out.update(_plan_new(cells, new, paths, minutes, jobs=jobs, to_run=len(cells) - done, measure=measure,
                             machine=machine, runs_dir=runs_dir, started=started))  # fmt: skip
    elif new:
        log.info(
            "%d cell(s) not planned yet: a run probes them first; their keys are before the budget", len(new)
        )
    return [out.get(i, cell) for i, cell in enumerate(cells)]


def _plan_new(
    cells: Sequence[Any],
    new: list[int],
    paths: list[Path],
    minutes: float,
    *,
    jobs: int,
    to_run: int,
    measure: Callable[..., Costs] | None,
    machine: str,
    runs_dir: str | Path | None,
    started: float | None,
) -> dict[int, Any]:
    from crener.tracking import experiment_name

    measure = measure or budget.measure  # (looked up now: tests replace it)
    before, t0 = budget.since(started), time.monotonic()
    costs: dict[str, Costs] = {}
    # Timed beside as many neighbours as it will train beside (fewer cells than jobs: fewer), each
    # a class that follows it in the plan: its cells alternate with those of the others.
    first_of: dict[str, RunConfig] = {}
    for i in new:
        first_of.setdefault(cost_class(cells[i].cfg), cells[i].cfg)
    firsts = list(first_of.values())
    count = max(min(jobs, to_run) - 1, 0)
    beside = {cost_class(cfg): [firsts[(k + 1 + j) % len(firsts)] for j in range(count)]
              for k, cfg in enumerate(firsts)}  # fmt: skip
    for i in new:
        cell, cls = cells[i], cost_class(cells[i].cfg)
        if cls not in costs:
            log.info("--time-budget: timing %s here%s", cell.label,
                     "".join(f", beside {cfg.label}" for cfg in beside[cls]))  # fmt: skip
            # Paid once, here (in ``spent``), not again by each cell of the class.
            costs[cls] = replace(measure(cell.cfg, experiment=experiment_name(cell.sweep, cell.cfg.profile),
                                         folder=resolve_runs_dir(runs_dir), beside=beside[cls]), probe=0.0)  # fmt: skip
    spent = before + time.monotonic() - t0
    share = share_minutes(minutes, jobs, to_run, spent)
    what = (f"--time-budget {minutes:g} over {to_run} cell(s) to run, {jobs} at a time, less {spent:.0f} s "
            f"spent before them (start-up and probing), leaves {share:.3g} min a cell")  # fmt: skip
    planned = {}
    for i in new:  # every cell planned before any is saved: a budget too short saves nothing
        c = costs[cost_class(cells[i].cfg)]
        planned[i] = (plan_steps(share, cells[i].cfg.train.epochs, c, what=f"{what} ({cells[i].label})"), c)
    log.info("%s", what)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = {}
    for i, ((epochs, steps), c) in planned.items():
        cell = cells[i]
        entry = {"cell": cell.label, "key_before_budget": run_key(cell.cfg), "minutes": float(minutes),
                 "machine": machine, "jobs": jobs, "cells_to_run": to_run, "spent_s": spent,
                 "timed_beside": [cfg.label for cfg in beside[cost_class(cell.cfg)]],
                 "share_minutes": share, "epochs": epochs, "max_steps": steps, "costs": asdict(c),
                 "planned": stamp}  # fmt: skip
        write_atomic(paths[i], json.dumps(entry, indent=1) + "\n")
        out[i] = replace(cell, cfg=with_plan(cell.cfg, entry))
        log.info("%s: %d epochs of at most %d steps (%.3g min) -> %s", cell.label, epochs, steps, share,
                 run_key(out[i].cfg))  # fmt: skip
    return out
