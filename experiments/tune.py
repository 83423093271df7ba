"""Optuna search over one (model, variant, dataset, profile): objective = best dev F1.

- The search space of each model family is ONE function, the ``search_space`` of its registry
  entry (:mod:`crener.registry`, built from :mod:`crener.search`); Optuna parameter names are
  config keys (``train.lr``), so a trial's params are ``--set`` overrides and the best ones
  export as an overrides file that ``crener reproduce --config`` reads.
- Seeded ``TPESampler``; ``MedianPruner`` on per-epoch dev F1, reported from fit's
  ``on_epoch_end`` (which raises ``optuna.TrialPruned`` out of fit).
- Storage defaults to ``sqlite:///optuna.db`` and studies are opened with ``load_if_exists``, so
  any number of worker processes (or machines, with a PostgreSQL/MySQL URL) share one study.
- MLflow: one parent run per study in ``crener-tune-{profile}``; each trial is a nested run
  with the usual crener tags and params, per-epoch metrics and ``best/*``. Trials have their
  own workdir ``runs/tune/{study}/trial-NNNN`` and never use the sweep's skip-by-key logic.
- ``time_budget`` (``--time-budget MINUTES``): MINUTES for this worker's ``trials``; each trial
  gets ``(MINUTES - the start-up and the base probe) / trials`` (the start-up: from ``started``,
  when the command's clock started), its steps fixed by the probe of its own config
  (:func:`crener.budget.apply_budget`: the search space moves widths and the batch budget, so the
  step cost moves with it). The base config is probed once first, so a budget too short fails
  before the study; a trial whose own config cannot fit fails alone (as one out of memory does);
  a pruned trial leaves its unused minutes unused (each trial's steps stay independent of the
  others' luck). The parent run is tagged with the minutes, the trial's share and the base plan,
  and logs each trial's ``trial/epochs`` and ``trial/max_steps``; trials record their share as
  ``runtime.time_budget``.
- Dev must not be test: a dataset without a dev split (MSRA) is tuned under the clean
  protocol (``data.msra_protocol=clean``); an explicit ``lineage`` is refused.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from crener import registry
from crener.config import RunConfig, canonical_key
from crener.errors import CrenerError, StoreError
from crener.files import write_atomic
from crener.probe import check_driver, check_server
from crener.profiles import build_run_config
from crener.tracking import RunLogger, Tracker, check_store, experiment_name, file_lock, masked_uri
from crener.workspace import OPTUNA_STORAGE, foreign_sqlite, resolve_runs_dir, sqlite_path, tracking_uri
from experiments.sweeps import IDENTITY_KEYS, format_toml_value

log = logging.getLogger(__name__)


class _InterruptWithoutTraceback(logging.Filter):
    """Optuna logs a trial that Ctrl-C stopped with the interrupt's traceback; the command line
    reports an interrupt in one line (crener.cli), so the traceback is dropped (nothing else is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_InterruptWithoutTraceback())

OBJECTIVE_METRIC = "dev/f1"
TPE_STARTUP_TRIALS = 5  # random trials before TPE models the space
PRUNER_STARTUP_TRIALS = 3  # trials that run to the end before anything is pruned
PRUNER_WARMUP_EPOCHS = 1  # no pruning on the first epoch's (noisy) dev F1
SQLITE_TIMEOUT_S = 60  # concurrent workers wait this long for SQLite's single writer
OPTUNA_MARKER_TABLE = "studies"  # a table every Optuna RDB storage has


# --------------------------------------------------------------------------- study plumbing


class _DefaultTrial:
    """Answers every ``suggest_*`` with the base config's own value: the untuned point of a space."""

    def __init__(self, base: RunConfig):
        self.flat = base.flatten()
        self.params: dict[str, Any] = {}

    def _value(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.params[name] = self.flat[name]
        return self.flat[name]

    suggest_float = suggest_int = suggest_categorical = _value


def search_space(model: str) -> Callable[[Any, RunConfig], dict[str, Any]]:
    """The search space of family ``model`` (its registry entry's ``search_space``)."""
    try:
        space = registry.get(model).search_space
    except KeyError as exc:
        raise CrenerError(str(exc.args[0])) from None
    if space is None:
        raise CrenerError(f"model {model!r} declares no search space (crener.registry.ModelFamily)")
    return space


def default_params(model: str, base: RunConfig) -> dict[str, Any]:
    """The search space's parameters at the profile's defaults (enqueued as a study's trial 0)."""
    probe = _DefaultTrial(base)
    search_space(model)(probe, base)
    return probe.params


def default_study_name(model: str, variant: str, dataset: str, profile: str) -> str:
    return f"crener-{model}-{variant}-{dataset}-{profile}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage; for SQLite, a long lock timeout and a serialised first schema setup."""
    db = sqlite_path(url)
    if db is None:
        return _open_server_storage(url)
    with file_lock(db.with_name(db.name + ".init.lock")):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


def _open_server_storage(url: str, attempts: int = 5) -> optuna.storages.BaseStorage:
    """A database server's storage. Workers opening a fresh database together race to create
    its tables (PostgreSQL: a duplicate-key error on its type catalogue for the loser); the
    schema is complete once the winner commits, so the loser tries again after a short wait."""
    import random
    import time

    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if attempt == attempts - 1 or not any(s in str(exc) for s in ("duplicate key", "already exists")):
                raise
            log.info("another worker is creating the Optuna schema; retrying (%s)", type(exc).__name__)
            time.sleep(0.2 + random.random())  # noqa: S311 - jitter, not security
    raise AssertionError("unreachable")


def open_storage_or_explain(url: str) -> optuna.storages.BaseStorage:
    """:func:`open_storage`, with a URL it cannot open refused in one message (no traceback)."""
    import sqlalchemy.exc

    check_storage(url)
    try:
        return open_storage(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise _storage_error(url, exc) from None


# What to do about a storage crener cannot use (the message's last part).
STORAGE_HOW = "pass --storage sqlite:///PATH.db or a reachable postgresql+psycopg://USER@HOST/DB URL"


def _storage_error(url: str, exc: BaseException) -> StoreError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"cannot open the Optuna storage {masked_uri(url)!r} ({reason}); {STORAGE_HOW}")


def check_storage(url: str) -> None:
    """Refuse, without creating or writing anything, a storage URL that cannot be an Optuna storage:
    a scheme no database driver answers or whose driver is not installed, a SQLite file in a
    missing folder, a folder, a file that is not SQLite, another program's SQLite database, or a
    server address where no database server answers within seconds (:mod:`crener.probe`)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise _storage_error(url, exc) from None
    db = sqlite_path(url)
    if db is None and url.split(":", 1)[0] == "sqlite":  # sqlite:// is a database in memory
        return
    if db is None:  # a database server: its driver, then a PostgreSQL (or TCP) greeting
        check_driver(url, "--storage", STORAGE_HOW)
        check_server(url, "the Optuna storage", STORAGE_HOW)
        return
    if not db.parent.is_dir():
        raise StoreError(f"--storage {url}: folder {db.parent} does not exist; create it first")
    if db.is_dir():
        raise StoreError(f"--storage {url}: {db} is a folder, not a database file; name a file in it")
    if db.exists():
        try:
            foreign = foreign_sqlite(db, OPTUNA_MARKER_TABLE, "an Optuna storage")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"--storage {url}: {db} is not an SQLite database ({exc})") from None
        if foreign is not None:  # Optuna would add its tables to it
            raise StoreError(f"--storage {url}: {foreign}; nothing was written to it; name another file")


class TrialCallback:
    """fit callback for one trial: MLflow logging, then Optuna reporting and pruning."""

    def __init__(self, trial: optuna.Trial, logger: RunLogger | None):
        self.trial = trial
        self.logger = logger

    def on_start(self, info: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.on_start(info)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.on_epoch_end(epoch, metrics)
        value = metrics.get(OBJECTIVE_METRIC)
        if value is None or math.isnan(value):
            return
        self.trial.report(float(value), step=int(epoch))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({OBJECTIVE_METRIC}={value:.4f})")


def _fit(cfg: RunConfig, workdir: Path, *, callback: Any, data_root: str | None) -> dict[str, Any]:
    from crener.train import fit  # torch is loaded only when a trial trains

    return fit(cfg, workdir, callback=callback, resume=False, data_root=data_root)


def _clean_dev_protocol(base: RunConfig, dataset: str, sets: dict[str, Any]) -> RunConfig:
    """Tuning selects on dev F1, so dev must not be the test set.

    A dataset without a dev split (MSRA) defaults to ``data.msra_protocol=lineage``, where dev
    IS test: tuning on it would optimise test F1. Tune switches such a dataset to the clean
    protocol (dev = held-out end of train) and says so; an explicit lineage request is refused.
    """
    from crener.data.datasets import get_spec

    if "dev" in get_spec(dataset).files or base.data.msra_protocol != "lineage":
        return base
    if "data.msra_protocol" in sets:
        raise CrenerError(
            f"crener tune refuses data.msra_protocol=lineage on {dataset}: {dataset} has no dev split, "
            "so lineage uses the test set as dev and tuning would select on test F1; "
            "use data.msra_protocol=clean (the default for tune)"
        )
    log.info(
        "%s has no dev split: tuning uses the clean protocol (dev = held-out end of train), "
        "never lineage (dev = test)",
        dataset,
    )
    return base.with_overrides({"data.msra_protocol": "clean"})


class TrialOutOfMemory(RuntimeError):
    """A trial's configuration did not fit in memory: that trial fails, the study goes on."""


class TrialOverBudget(RuntimeError):
    """A trial's configuration cannot take one step an epoch in its minutes: that trial fails alone."""


def trial_minutes(minutes: float, trials: int, spent_s: float = 0.0) -> float:
    """Each trial's share of ``--time-budget MINUTES``: the minutes less the seconds spent before the
    trials (start-up and the base probe), split evenly."""
    return max(minutes * 60 - spent_s, 0.0) / trials / 60


def plan_trials(
    base: RunConfig, minutes: float, trials: int, *, track: bool, folder: Path, started: float | None = None
) -> tuple[float, dict[str, str]]:
    """``(minutes a trial, tags for the parent run)``: the base config probed once (as its trial would
    be, :func:`budget_trial`), so a budget too short for it fails here, before the study exists
    (:class:`CrenerError`, one line). ``started``: when the command's clock started (None: here)."""
    from crener import budget

    if track:  # as crener train does: an unusable store fails before the probe's seconds
        check_store(tracking_uri())

    before, t0 = budget.since(started), time.monotonic()
    costs = budget.measure(base, experiment=_trial_experiment(base, track), folder=folder)
    share = trial_minutes(minutes, trials, before + time.monotonic() - t0)
    what = (f"--time-budget {minutes:g} over {trials} trial(s), less the start-up and the probe, leaves "
            f"{share:.3g} min a trial")  # fmt: skip
    epochs, steps = budget.plan_steps(share, base.train.epochs, costs, what=what)
    log.info("%s: the base config gets %d epochs of at most %d steps; each trial is timed again", what,
             epochs, steps)  # fmt: skip
    tags = {"crener.time_budget": f"{minutes:g}", "crener.trial_minutes": f"{share:.4g}",
            "crener.base_epochs": str(epochs), "crener.base_max_steps": str(steps)}  # fmt: skip
    return share, tags


def budget_trial(cfg: RunConfig, minutes: float, *, track: bool, folder: Path) -> RunConfig:
    """``cfg`` with its steps fixed by its own probe (:func:`crener.budget.apply_budget`), timing the
    store the trial logs to (``track``) and the file system of ``folder``, where it writes."""
    from crener import budget

    try:
        return budget.apply_budget(cfg, minutes, experiment=_trial_experiment(cfg, track), folder=folder)
    except CrenerError as exc:
        raise TrialOverBudget(str(exc)) from None


def _trial_experiment(cfg: RunConfig, track: bool) -> str | None:
    """The MLflow experiment a trial of ``cfg`` logs to; None untracked."""
    return experiment_name("tune", cfg.profile) if track else None


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)  # CPU allocators raise a plain RuntimeError
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "DefaultCPUAllocator" in text)


def _has_default(study: optuna.Study) -> bool:
    """Whether the untuned default is in the study: done, queued or running (not failed)."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
    return any(
        t.user_attrs.get("crener.default") and t.state in live for t in study.get_trials(deepcopy=False)
    )


def _trials_so_far(store: Any, name: str) -> int:
    try:
        return len(optuna.load_study(study_name=name, storage=store).trials)
    except KeyError:  # no such study yet
        return 0


def tune(
    *,
    dataset: str,
    trials: int,
    model: str = "crener",
    variant: str = "full",
    profile: str = "quick",
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    seed: int = 0,
    sets: dict[str, Any] | None = None,
    data_root: str | None = None,
    runs_dir: str | Path | None = None,
    track: bool = True,
    time_budget: float | None = None,
    started: float | None = None,
) -> optuna.Study:
    """Run ``trials`` trials in this process on the shared study; returns the study.

    ``seed`` seeds the sampler, offset by the number of trials already in the study so that a
    worker joining later does not replay earlier random proposals; workers started at the
    same moment should be given different seeds. Trials train with the config's own seed.
    """
    space = search_space(model)
    if trials < 1:
        raise CrenerError("--trials must be >= 1")
    try:
        base = build_run_config(
            model=model, variant=variant, profile=profile, dataset=dataset, overrides=sets or {}
        )
    except (KeyError, ValueError) as exc:
        raise CrenerError(str(exc)) from exc
    base = _clean_dev_protocol(base, dataset, sets or {})
    name = study_name or default_study_name(model, variant, dataset, profile)
    # The MLflow store first: one that cannot be reached fails here, before a study (or its
    # database file) is created that would then hold no trial.
    check_storage(storage or OPTUNA_STORAGE)  # before the MLflow store is made (a fresh one is)
    # The probe: after the cheap checks, before anything is created.
    trial_root = resolve_runs_dir(runs_dir) / "tune" / _safe(name)
    share, budget_tags = (None, {})
    if time_budget:
        share, budget_tags = plan_trials(
            base, time_budget, trials, track=track, folder=trial_root, started=started
        )
    tracker = Tracker() if track else None
    store = open_storage_or_explain(storage or OPTUNA_STORAGE)
    offset = _trials_so_far(store, name)
    study = _open_study(store, name, seed + offset)
    if not _has_default(study):
        # The untuned default (trial 0 of a new study), so every study measures what tuning gained;
        # queued again if an interrupt failed it. Enqueued trials are claimed atomically, so of
        # several workers starting together one runs it.
        study.enqueue_trial(default_params(model, base), user_attrs={"crener.default": True})
    about = {"model": model, "variant": variant, "dataset": dataset, "profile": profile}
    for key, value in about.items():
        study.set_user_attr(key, value)
    parent = _study_parent(
        tracker, name, profile, {**{f"crener.{k}": v for k, v in about.items()}, **budget_tags}
    )
    objective = Objective(
        space=space, base=base, share=share, tracker=tracker, parent=parent, study_name=name, profile=profile,
        trial_root=trial_root, data_root=data_root,
    )  # fmt: skip
    log.info("study %s: %d trial(s) in this worker (%d already in the study)", name, trials, offset)
    _optimise(study, objective, trials, timeout, parent)
    _log_best(study, parent, dict(sets or {}))
    return study


def _open_study(store: optuna.storages.BaseStorage, name: str, seed: int) -> optuna.Study:
    """The shared study ``name``, created or loaded, with its sampler seeded by ``seed``."""
    return optuna.create_study(
        study_name=name,
        storage=store,
        direction="maximize",
        load_if_exists=True,
        # constant_liar: trials running in other workers count as bad results, so concurrent
        # workers propose different points; the seed offset keeps a worker joining later from
        # replaying the random start-up proposals of an earlier one.
        sampler=optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, constant_liar=True
        ),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
        ),
    )


@dataclass
class Objective:
    """One trial: its config (proposed, then budgeted), its MLflow run, its training; dev F1 back."""

    space: Callable[[Any, RunConfig], dict[str, Any]]
    base: RunConfig
    share: float | None  # minutes a trial under --time-budget, else None
    tracker: Tracker | None
    parent: RunLogger | None
    study_name: str
    profile: str
    trial_root: Path
    data_root: str | None

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space(trial, self.base)
        cfg = self.base.with_overrides(values)
        if self.share is not None:
            cfg = budget_trial(cfg, self.share, track=self.tracker is not None, folder=self.trial_root)
            if self.parent is not None:
                steps = {"trial/epochs": cfg.train.epochs, "trial/max_steps": cfg.train.max_steps}
                self.parent.log_metrics(steps, step=trial.number)
        workdir = self.trial_root / f"trial-{trial.number:04d}"
        logger = self._start_run(cfg, trial)
        log.info("trial %d of %s: %s", trial.number, self.study_name, values)
        try:
            summary = _fit(cfg, workdir, callback=TrialCallback(trial, logger), data_root=self.data_root)
        except optuna.TrialPruned:
            if logger is not None:
                logger.finish(None, workdir, **{"crener.pruned": "true"})
            raise
        except BaseException as exc:
            if logger is not None:
                logger.fail(exc, killed=isinstance(exc, KeyboardInterrupt))
            if _out_of_memory(exc):
                raise TrialOutOfMemory(str(exc)) from exc
            raise
        value = float(summary["dev"]["f1"])
        if logger is not None:
            logger.finish(summary, workdir)
            self.parent.log_metrics({"trial/dev_f1": value}, step=trial.number)
        return value

    def _start_run(self, cfg: RunConfig, trial: optuna.Trial) -> RunLogger | None:
        """The trial's MLflow run, a child of the study's parent run (None when not tracking)."""
        if self.tracker is None:
            return None
        logger = self.tracker.start_run(
            cfg,
            sweep="tune",
            parent_run_id=self.parent.run_id,
            experiment=experiment_name("tune", self.profile),
            name=f"{cfg.label}/trial-{trial.number}",
            tags={"crener.study": self.study_name, "crener.trial": str(trial.number)},
        )
        logger.log_config(cfg, {"trial.number": trial.number})
        return logger


def _optimise(
    study: optuna.Study, objective: Objective, trials: int, timeout: float | None, parent: RunLogger | None
) -> None:
    """``trials`` trials of ``objective``; the parent run ends KILLED, FAILED or finished with them."""
    # A trial that runs out of memory (or of minutes) fails alone; any other error (a shape bug)
    # stops the worker.
    try:
        study.optimize(objective, n_trials=trials, timeout=timeout, catch=(TrialOutOfMemory, TrialOverBudget))
    except KeyboardInterrupt:
        if parent is not None:  # the study is not done: say so; a rerun reopens and completes it
            parent.set_tags({"crener.interrupted": "true"})
            parent.terminate("KILLED")
        log.warning("study %s interrupted: run the same command again to complete it", study.study_name)
        raise
    except BaseException:
        if parent is not None:
            parent.terminate("FAILED")
        raise
    if parent is not None:  # reopened by the next worker that joins (status only)
        parent.set_tags({"crener.interrupted": "false"})
        parent.terminate()


def _study_parent(tracker: Tracker | None, name: str, profile: str, tags: dict[str, str]) -> RunLogger | None:
    """The study's MLflow parent run (shared by its workers), tagged with ``tags``; None untracked."""
    if tracker is None:
        return None
    parent = tracker.start_parent(
        experiment_name("tune", profile),
        name=name,
        tags={"crener.study": name, "crener.sweep": "tune", "crener.role": "study"},
    )
    parent.set_tags(tags)
    return parent


def _log_best(study: optuna.Study, parent: RunLogger | None, fixed: dict[str, Any]) -> None:
    try:
        best = study.best_trial
    except ValueError:
        log.warning("study %s has no completed trial yet", study.study_name)
        return
    log.info("best trial %d: dev F1 %.4f with %s", best.number, best.value, {**fixed, **best.params})
    default = default_trial(study)
    if default is not None:
        log.info("untuned default (trial %d): dev F1 %.4f; tuning gained %+.4f",
                 default.number, default.value, best.value - default.value)  # fmt: skip
    if parent is not None:
        parent.set_tags({"crener.best_trial": str(best.number), "crener.best_dev_f1": f"{best.value:.6f}"})


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The untuned default's trial that completed (an interrupted one is queued again), or None."""
    return next((t for t in study.trials if t.user_attrs.get("crener.default") and t.value is not None), None)


def best_overrides(
    study: optuna.Study, sets: dict[str, Any] | None = None
) -> tuple[optuna.trial.FrozenTrial, dict[str, Any]]:
    """The best trial and the values a recipe takes from it and the study's fixed ``--set``
    values: what ``--export`` writes and the tuning page lists. CrenerError without a completed trial."""
    try:
        best = study.best_trial
    except ValueError:
        raise CrenerError(f"study {study.study_name!r} has no completed trial to export") from None
    # Identity keys are the file's filters; fields that cannot change a result (threads, device,
    # progress bar: the runtime section) belong to the machine that tuned, not to the recipe.
    values = {
        k: v
        for k, v in {**(sets or {}), **best.params}.items()
        if k not in IDENTITY_KEYS and not canonical_key(k).startswith("runtime.")
    }
    return best, values


def export_best(study: optuna.Study, path: str | Path, *, sets: dict[str, Any] | None = None) -> Path:
    """Write the best trial's params (and the study's fixed ``--set`` values) as an overrides
    file for ``crener reproduce --config PATH``, filtered to the tuned model, dataset and profile."""
    best, values = best_overrides(study, sets)
    attrs = study.user_attrs
    lines = [
        f"# Best trial of Optuna study {study.study_name!r}, exported by `crener tune --export`.",
        "# Apply with: crener reproduce --config THIS_FILE  (filters below; edit them to widen).",
        f'description = "tuned {attrs.get("model", "?")} on {attrs.get("dataset", "?")} ({attrs.get("profile", "?")})"',
        "",
        "[source]",
        f"study = {format_toml_value(study.study_name)}",
        f"trial = {best.number}",
        f"dev_f1 = {format_toml_value(float(best.value))}",
        "",
        "[[overrides]]",
    ]
    for key, attr in (("models", "model"), ("datasets", "dataset"), ("profiles", "profile")):
        if attr in attrs:
            lines.append(f"{key} = [{format_toml_value(attrs[attr])}]")
    lines += ["", "[overrides.set]"]
    lines += [f"{format_toml_value(k)} = {format_toml_value(v)}" for k, v in sorted(values.items())]
    out = write_atomic(path, "\n".join(lines) + "\n")
    log.info("best params of %s written to %s", study.study_name, out)
    return out
