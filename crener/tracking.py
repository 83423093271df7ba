"""MLflow bookkeeping: the only module of crener that imports mlflow.

It owns the tracking contract that ``reports/`` reads:

- tracking URI: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``; for a SQLite store,
  artifacts live beside the database in ``mlartifacts/`` (resolved in :mod:`crener.workspace`);
- one experiment per sweep and profile, ``crener-{sweep}-{profile}``;
- tags on every run (``crener.key``, its ``crener.key_schema`` and ``crener.data_digest``,
  ``crener.state``, ...), run name :attr:`crener.config.RunConfig.label`
  (``{model}:{variant}/{dataset}/s{seed}``);
- params ``cfg.flatten()`` + ``num_labels`` + ``parameters``, logged once (MLflow params are
  immutable, so a resumed run only adds what is missing);
- per-epoch metrics with ``step=epoch``, logged idempotently (a step already in a metric's
  history is skipped, so a resumed fit that replays its history logs nothing twice);
- final ``best/*`` metrics and the workdir artifacts.

Everything goes through one ``MlflowClient`` with explicit run ids: no fluent ``mlflow.start_run``
global state, so nested Optuna trials and resumed runs cannot leak into each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crener.config import RunConfig
from crener.data.digest import dataset_digest
from crener.device import machine_label
from crener.errors import CheckpointError, StoreError
from crener.identity import KEY_SCHEMA, encoder_weights, run_key
from crener.probe import PROBE_TIMEOUT_S, check_driver, check_server, masked_uri, scheme_of
from crener.workspace import (
    TRACKING_URI_ENV,
    artifact_root,
    foreign_sqlite,
    git_commit,
    sqlite_path,
    tracking_uri,
)

log = logging.getLogger(__name__)

# The MLflow 3 UI opens an experiment by its kind; this one shows the runs table, not GenAI pages.
_KIND_TAG = "mlflow.experimentKind"
_KIND_TRAINING = "custom_model_development"


# Values of the ``crener.state`` tag; MLflow's own status (RUNNING/FINISHED/FAILED/KILLED) is kept
# in step, but a SIGKILLed process leaves its run RUNNING, so readers should trust neither blindly.
STATE_RUNNING, STATE_FINISHED, STATE_FAILED = "running", "finished", "failed"
# "diagnostic": runs of `crener curves`, never reused as sweep cells (like tune trials).
# "claim": runs of experiments/configs/claim.toml, cells of the main sweep run for one claim's test.
SWEEPS = ("main", "ablation", "tune", "adhoc", "diagnostic", "encoders", "claim")
NOT_CELLS = ("tune", "diagnostic")

# What fit's callback reports each epoch (logged with step = epoch).
EPOCH_METRICS = ("train/loss", "dev/precision", "dev/recall", "dev/f1", "epoch_seconds")
# Workdir files logged as artifacts at the end, relative to the workdir.
ARTIFACT_FILES = ("summary.json", "config.json", "history.json", "per_type.json", "predictions/test.jsonl")
# MLflow accepts at most 100 params a batch.
PARAMS_PER_BATCH = 100
# The best checkpoint's absolute path on the machine that trained the run.
CHECKPOINT_TAG = "crener.checkpoint"
# MLflow caps tag values (5000 chars); an error message is cut well below that.
MAX_TAG_CHARS = 1000
# SQLite allows one writer at a time; concurrent workers retry a locked database this often.
LOCKED_RETRIES = 8
LOCKED_BACKOFF_S = 0.25

T = TypeVar("T")


# --------------------------------------------------------------------------- names


def experiment_name(sweep: str, profile: str) -> str:
    return f"crener-{sweep}-{profile}"


def run_tags(cfg: RunConfig, sweep: str) -> dict[str, str]:
    """The tags every crener run carries (``crener.state`` is set separately)."""
    digest = dataset_digest(cfg.data, cfg.runtime.data_root)
    commit = git_commit()
    return {
        "crener.key": run_key(cfg, data_digest=digest),
        "crener.key_schema": str(KEY_SCHEMA),
        "crener.data_digest": digest,
        "crener.sweep": sweep,
        "crener.model": cfg.model.name,
        "crener.variant": cfg.variant,
        "crener.dataset": cfg.data.dataset,
        "crener.profile": cfg.profile,
        "crener.seed": str(cfg.train.seed),
        "crener.encoder": cfg.model.encoder,
        **({"crener.encoder_weights": w} if (w := encoder_weights(cfg)) else {}),
        "crener.msra_protocol": cfg.data.msra_protocol,
        "crener.git_commit": commit,
        "crener.machine": machine_label(),  # figures of one machine compare; reports say which
        # MLflow's own source tags, which its UI shows on the run page.
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": "crener",
        "mlflow.source.type": "LOCAL",
    }


# MLflow stores an input dataset's digest in a 36-character column.
INPUT_DIGEST_CHARS = 32


def dataset_inputs(cfg: RunConfig) -> list[Any]:
    """The split files ``cfg`` reads as MLflow dataset inputs: name ``dataset/split``, digest the
    file's SHA-256 (first 32 hex digits; the whole one is in ``crener.data_digest``), the path as
    source, and the split as MLflow's ``mlflow.data.context`` tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from crener.data.datasets import get_spec, resolve_data_root
    from crener.data.digest import file_digest

    spec = get_spec(cfg.data.dataset)
    root = resolve_data_root(cfg.runtime.data_root)
    out = []
    for split in sorted(spec.files):
        path = spec.path(split, root)
        ds = Dataset(
            name=f"{cfg.data.dataset}/{split}", digest=file_digest(path)[:INPUT_DIGEST_CHARS],
            source_type="local", source=str(path.resolve()),
        )  # fmt: skip
        out.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", split)]))
    return out


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param (``RunConfig.from_flat`` reads it back)."""
    if isinstance(value, tuple | list):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path``; yields False (instead of blocking) when ``wait`` is off
    and another process holds it. The OS drops the lock when its holder dies, even by SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# What a store says when another worker inserted the same row first (SQLite; PostgreSQL).
RACED_INSERT = ("unique constraint failed", "duplicate key value violates unique constraint")


def _retry_locked(fn: Callable[[], T], *, raced_insert: bool = False) -> T:
    """Run ``fn``, retrying while SQLite reports the database locked by another worker; with
    ``raced_insert``, also when another worker inserted the same row between ``fn``'s check and its
    insert (MLflow's dataset rows: the retry finds the row and links to it)."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return fn()
        except MlflowException as exc:
            text = str(exc).lower()
            retry = "locked" in text or (raced_insert and any(m in text for m in RACED_INSERT))
            if not retry or attempt == LOCKED_RETRIES - 1:
                raise
            time.sleep(LOCKED_BACKOFF_S * (attempt + 1))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- reachability

# MLflow retries a store it cannot open for minutes, so a wrong store is checked once, up front
# (crener.probe).
STORE_PROBE_TIMEOUT_S = PROBE_TIMEOUT_S
MLFLOW_MARKER_TABLE = "experiments"  # a table every MLflow SQLite store has
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"  # MLflow's own switch for its deprecated file store
# The stores crener opens: MLflow's database stores (through SQLAlchemy, whose driver must be
# installed) and its tracking server. MLflow knows others (databricks, ...) that nothing here tests.
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https")
STORE_FORMS = "sqlite:///PATH.db, http(s)://HOST:PORT or postgresql+psycopg://USER@HOST/DB"


def check_store(uri: str) -> None:
    """Raise :class:`~crener.errors.StoreError` within seconds if the tracking store ``uri`` cannot
    be used: a SQLite file in a missing or read-only folder, not a database, or another program's
    database; a scheme crener does not open, or whose driver is missing; a server that does not
    answer as an MLflow server (http, https) or a database server (postgresql; mysql and mssql by
    a TCP connection) should, within :data:`crener.probe.PROBE_TIMEOUT_S`. Writes nothing."""
    how = f"set {TRACKING_URI_ENV} to a reachable store, or unset it for ./mlflow.db"
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite_store(uri, db, how)
        return
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        if os.environ.get(FILE_STORE_OPT_IN, "").lower() == "true":
            return
        # MLflow reads a bare word or path as a file store, which MLflow 3 refuses with a traceback.
        raise StoreError(f"MLflow store {masked_uri(uri)!r} is not a store address: use {STORE_FORMS}; {how}")
    if scheme not in DATABASE_SCHEMES + SERVER_SCHEMES:
        raise StoreError(
            f"MLflow store {masked_uri(uri)!r}: crener does not open {scheme}:// stores; use {STORE_FORMS}, "
            f"or mysql:// or mssql:// with their driver installed; {how}"
        )
    if scheme in DATABASE_SCHEMES:
        check_driver(uri, "MLflow store", how)
    check_server(uri, "the MLflow store", how)


def _check_sqlite_store(uri: str, db: Path, how: str) -> None:
    where = f"MLflow store {uri}"
    if db.is_dir():
        raise StoreError(f"{where}: {db} is a folder, not a database file; {how}")
    if not db.parent.is_dir():
        raise StoreError(f"{where}: folder {db.parent} does not exist; create it, or {how}")
    try:  # the store, its journal and the lock beside it are new files in that folder
        tempfile.TemporaryFile(dir=db.parent).close()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StoreError(f"{where}: cannot create files in {db.parent} ({reason}); {how}") from None
    if not db.exists():  # MLflow creates it
        return
    if not os.access(db, os.R_OK):
        raise StoreError(f"{where}: {db} is not readable; {how}")
    try:
        con = sqlite3.connect(str(db), timeout=STORE_PROBE_TIMEOUT_S)
        try:
            con.execute("PRAGMA schema_version").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc).lower():  # another worker is writing: the store is fine
            return
        raise StoreError(f"{where}: cannot open {db} ({exc}); {how}") from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{where}: {db} is not an SQLite database ({exc}); {how}") from None
    foreign = foreign_sqlite(db, MLFLOW_MARKER_TABLE, "an MLflow store")
    if foreign is not None:  # MLflow would add its tables to it
        raise StoreError(f"{where}: {foreign}; nothing was written to it; {how}")


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunInfo:
    """A run as crener sees it: ids, MLflow status, ``crener.state`` and its data."""

    run_id: str
    experiment_id: str
    status: str  # MLflow status: RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    state: str  # the crener.state tag ("" when missing)
    start_time: int  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == STATE_FINISHED

    @classmethod
    def from_mlflow(cls, run: Any) -> RunInfo:
        return cls(
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            status=run.info.status,
            state=run.data.tags.get("crener.state", ""),
            start_time=int(run.info.start_time or 0),
            tags=dict(run.data.tags),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
        )


class Tracker:
    """One tracking store: experiments, run lookup by key, starting and resuming runs."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or tracking_uri()
        check_store(self.uri)  # fail in seconds, not after MLflow's minutes of retries
        db = sqlite_path(self.uri)
        if db is None:
            self.client = MlflowClient(tracking_uri=self.uri)
            return
        # Creating a SQLite store runs schema migrations; two workers doing it at once on a fresh
        # file collide, so the client is made and first used under a lock beside the file (MLflow
        # may open the store, and migrate it, as soon as the client exists).
        with file_lock(db.with_name(db.name + ".init.lock")):
            self.client = MlflowClient(tracking_uri=self.uri)
            self.client.search_experiments(max_results=1)

    # ---- experiments
    def experiment_id(self, name: str) -> str:
        """Get or create the experiment ``name`` (artifacts beside a SQLite store)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if _KIND_TAG not in exp.tags:  # stores made before the tag existed
                self.client.set_experiment_tag(exp.experiment_id, _KIND_TAG, _KIND_TRAINING)
            return exp.experiment_id
        root = artifact_root(self.uri)
        location = f"{root}/{name}" if root else None
        try:
            tags = {_KIND_TAG: _KIND_TRAINING}
            return _retry_locked(
                lambda: self.client.create_experiment(name, artifact_location=location, tags=tags)
            )
        except MlflowException:
            # Another worker created it between our lookup and our insert.
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def crener_experiments(self, *, include_tune: bool = False) -> list[tuple[str, str]]:
        """(name, id) of this suite's experiments, sorted by name."""
        exps = self.client.search_experiments(filter_string="name LIKE 'crener-%'")
        return sorted(
            (e.name, e.experiment_id)
            for e in exps
            if include_tune or not e.name.startswith(experiment_name("tune", ""))
        )

    def crener_experiment_ids(self, *, include_tune: bool = False) -> list[str]:
        return [exp_id for _, exp_id in self.crener_experiments(include_tune=include_tune)]

    # ---- lookup
    def find_runs(self, key: str, *, include_tune: bool = False) -> list[RunInfo]:
        """Active runs tagged ``crener.key = key`` in any crener experiment, oldest first.

        Tune trials share keys with sweep cells but are never reused, so they are left out."""
        ids = self.crener_experiment_ids(include_tune=include_tune)
        if not ids:
            return []
        runs = self.client.search_runs(
            ids,
            filter_string=f"tags.`crener.key` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
        )
        found = [RunInfo.from_mlflow(r) for r in runs]
        if not include_tune:
            found = [r for r in found if r.tags.get("crener.sweep") not in NOT_CELLS]
        return sorted(found, key=lambda r: (r.start_time, r.run_id))

    def crener_runs(self, *, include_tune: bool = True) -> list[RunInfo]:
        """Every active run with a ``crener.key`` tag in the crener experiments, oldest first."""
        ids = self.crener_experiment_ids(include_tune=include_tune)
        found: list[RunInfo] = []
        token = None
        while ids:
            page = self.client.search_runs(
                ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            found += [RunInfo.from_mlflow(r) for r in page if "crener.key" in r.data.tags]
            token = page.token
            if not token:
                break
        return sorted(found, key=lambda r: (r.start_time, r.run_id))

    def get_run(self, run_id: str) -> RunInfo:
        return RunInfo.from_mlflow(self.client.get_run(run_id))

    def search(self, experiment: str, filter_string: str = "") -> list[RunInfo]:
        """Active runs of experiment ``experiment`` (by name) matching an MLflow filter string."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY
        )
        return sorted((RunInfo.from_mlflow(r) for r in runs), key=lambda r: (r.start_time, r.run_id))

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        _retry_locked(lambda: self.client.log_batch(run_id, tags=batch))

    # ---- starting
    def start_run(
        self,
        cfg: RunConfig,
        *,
        sweep: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        experiment: str | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> RunLogger:
        """A new run for ``cfg``, or ``resume_run_id`` reopened (same id, status back to RUNNING)."""
        if sweep not in SWEEPS:
            raise ValueError(f"sweep {sweep!r} is not one of {', '.join(SWEEPS)}")
        all_tags = {**run_tags(cfg, sweep), **(tags or {}), "crener.state": STATE_RUNNING}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id is not None:
            _retry_locked(lambda: self.client.update_run(resume_run_id, status="RUNNING"))
            logger = RunLogger(self.client, resume_run_id, resumed=True)
            logger.set_tags(all_tags)
            log.info("resuming MLflow run %s (%s)", resume_run_id, cfg.label)
            return logger
        exp_id = self.experiment_id(experiment or experiment_name(sweep, cfg.profile))
        run = _retry_locked(lambda: self.client.create_run(exp_id, run_name=name or cfg.label, tags=all_tags))
        log.info("MLflow run %s (%s) in experiment %s", run.info.run_id, cfg.label, exp_id)
        return RunLogger(self.client, run.info.run_id, resumed=False)

    def start_plain_run(
        self, experiment: str, *, name: str, tags: dict[str, str], resume_run_id: str | None = None
    ) -> RunLogger:
        """A run outside the sweep contract (e.g. encoder pretraining), or ``resume_run_id`` reopened."""
        if resume_run_id:
            try:
                self.client.get_run(resume_run_id)
            except MlflowException:
                log.warning("MLflow run %s of the saved state is gone; starting a new one", resume_run_id)
            else:
                _retry_locked(lambda: self.client.update_run(resume_run_id, status="RUNNING"))
                return RunLogger(self.client, resume_run_id, resumed=True)
        exp_id = self.experiment_id(experiment)
        run = _retry_locked(lambda: self.client.create_run(exp_id, run_name=name, tags=tags))
        log.info("MLflow run %s (%s) in experiment %s", run.info.run_id, name, experiment)
        return RunLogger(self.client, run.info.run_id, resumed=False)

    def start_parent(self, experiment: str, *, name: str, tags: dict[str, str]) -> RunLogger:
        """The one parent run tagged ``tags`` in ``experiment``, created if missing.

        Several workers may start at once: each creates one if it finds none, then all keep the
        oldest and delete the others, so exactly one parent survives without a shared lock."""
        exp_id = self.experiment_id(experiment)
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())

        def matching() -> list[RunInfo]:
            runs = self.client.search_runs([exp_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY)
            return sorted((RunInfo.from_mlflow(r) for r in runs), key=lambda r: (r.start_time, r.run_id))

        found = matching()
        if not found:
            created = _retry_locked(lambda: self.client.create_run(exp_id, run_name=name, tags=dict(tags)))
            found = matching()
            if created.info.run_id != found[0].run_id:
                self.client.delete_run(created.info.run_id)
        if found[0].status != "RUNNING":
            _retry_locked(lambda: self.client.update_run(found[0].run_id, status="RUNNING"))
        return RunLogger(self.client, found[0].run_id, resumed=True)

    # ---- reading back
    def time_one_write(self, experiment_id: str) -> float:
        """Seconds one write to the store takes, timed on a write that changes nothing: the
        experiment's kind tag set again to the value it has (:mod:`crener.budget` counts each
        logging call of a run as one such write)."""
        value = self.client.get_experiment(experiment_id).tags.get(_KIND_TAG, _KIND_TRAINING)
        t0 = time.perf_counter()
        _retry_locked(lambda: self.client.set_experiment_tag(experiment_id, _KIND_TAG, value))
        return time.perf_counter() - t0

    def checkpoint_of(self, run_id: str) -> Path:
        """The best checkpoint of a finished run (its ``crener.checkpoint`` tag), or a clear error."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            raise CheckpointError(f"no MLflow run {run_id!r} in {self.uri}") from exc
        path = run.data.tags.get(CHECKPOINT_TAG)
        if not path:
            raise CheckpointError(
                f"run {run_id} has no {CHECKPOINT_TAG} tag (not finished, or made before the tag): "
                "pass --checkpoint <workdir>/checkpoints/best.pt"
            )
        if not Path(path).is_file():
            raise CheckpointError(
                f"run {run_id}'s checkpoint {path} is not on this machine: pass --checkpoint"
            )
        return Path(path)

    def load_summary(self, run: RunInfo) -> dict[str, Any]:
        """The run's ``summary.json`` artifact, or one rebuilt from its ``best/*`` metrics."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run.run_id, "summary.json", tmp)
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except (MlflowException, OSError, ValueError):
                pass
        m = run.metrics

        def split(name: str) -> dict[str, float]:
            return {k: m.get(f"best/{name}_{k}", math.nan) for k in ("precision", "recall", "f1")}

        return {
            "dev": split("dev"),
            "test": split("test"),
            "best_epoch": int(m.get("best/epoch", 0)),
            "seconds": m.get("seconds", math.nan),
            "parameters": int(m.get("parameters", 0)),
            "key": run.tags.get("crener.key", ""),
        }


def run_store_writes(cfg: RunConfig) -> tuple[int, int]:
    """``(at the start, at the end)``: the writes a new tracked run of ``cfg`` makes to the store
    outside its epochs (:func:`crener.runner.run_one` through :class:`RunLogger`, whose calls this
    counts; an epoch's metrics are one more write, a curve row another). The start: the run, its
    params in batches of :data:`PARAMS_PER_BATCH`, its dataset inputs, fit's ``on_start`` params.
    The end: the summary's metrics, one upload a file of :data:`ARTIFACT_FILES`, the state tag and
    the status (the summary's params were logged by ``on_start``)."""
    start = 1 + math.ceil(len(cfg.flatten()) / PARAMS_PER_BATCH) + 1 + 1
    return start, 1 + len(ARTIFACT_FILES) + 1 + 1


class RunLogger:
    """One MLflow run, and a ``fit`` callback that writes into it.

    ``on_start`` and ``on_epoch_end`` follow ``crener.train.fit``'s callback contract. Metrics
    already logged at a step are skipped, so a resumed fit replaying its history is harmless.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, resumed: bool):
        self.client = client
        self.run_id = run_id
        self.resumed = resumed
        self._logged_steps: dict[str, set[int]] = {}
        self._params: dict[str, str] = {}
        if resumed:
            run = client.get_run(run_id)
            self._params = dict(run.data.params)
            for key in run.data.metrics:
                history = client.get_metric_history(run_id, key)
                self._logged_steps[key] = {m.step for m in history}

    # ---- fit callback
    def on_start(self, info: dict[str, Any]) -> None:
        extra = {k: info[k] for k in ("num_labels", "parameters") if k in info}
        self.log_params(extra)
        if info.get("resumed_from_epoch"):
            self.set_tags({"crener.resumed_from_epoch": str(info["resumed_from_epoch"])})

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=int(epoch))

    def on_step_eval(self, step: int, metrics: dict[str, float]) -> None:
        """The learning-start curve (``runtime.eval_every``): ``curve/*`` metrics against the step."""
        self.log_metrics({f"curve/{k.replace('/', '_')}": v for k, v in metrics.items()}, step=int(step))

    # ---- primitives
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not logged yet; a changed value keeps the first one and warns."""
        new: dict[str, str] = {}
        for key, value in params.items():
            text = param_value(value)
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                log.warning("param %s was logged as %r; keeping it (now %r)", key, old, text)
        if not new:
            return
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i : i + PARAMS_PER_BATCH]
            _retry_locked(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))
        self._params.update(new)

    def log_config(self, cfg: RunConfig, extra: dict[str, Any] | None = None) -> None:
        """Params, and on a new run the dataset inputs (a resumed run has them already)."""
        self.log_params({**cfg.flatten(), **(extra or {})})
        if not self.resumed:
            # Two workers starting their first runs of an experiment at once both find a dataset
            # missing and both insert it: the second insert fails, and its retry links to the row.
            inputs = dataset_inputs(cfg)
            _retry_locked(lambda: self.client.log_inputs(self.run_id, datasets=inputs), raced_insert=True)

    def log_metrics(self, metrics: dict[str, float], *, step: int = 0) -> None:
        """Log each finite metric at ``step`` unless that step is already in its history."""
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if value is None or step in self._logged_steps.get(key, set()):
                continue
            value = float(value)
            if math.isnan(value):
                continue
            batch.append(Metric(key, value, now, step))
        if batch:
            _retry_locked(lambda: self.client.log_batch(self.run_id, metrics=batch))
            for m in batch:
                self._logged_steps.setdefault(m.key, set()).add(step)

    def set_tags(self, tags: dict[str, str]) -> None:
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        _retry_locked(lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifacts(self, workdir: Path) -> None:
        """Upload the workdir files of the contract that exist (re-uploading overwrites)."""
        for rel in ARTIFACT_FILES:
            path = Path(workdir) / rel
            if path.is_file():
                parent = str(Path(rel).parent)
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    # ---- end of run
    def log_summary(self, summary: dict[str, Any]) -> None:
        """Final metrics from fit's summary: ``best/*``, ``seconds``, ``parameters``."""
        final: dict[str, float] = {}
        for split in ("dev", "test"):
            for name in ("precision", "recall", "f1"):
                value = (summary.get(split) or {}).get(name)
                if value is not None:
                    final[f"best/{split}_{name}"] = value
        for src, dst in (("best_epoch", "best/epoch"), ("seconds", "seconds"), ("parameters", "parameters")):
            if summary.get(src) is not None:
                final[dst] = summary[src]
        self.log_metrics(final, step=0)
        self.log_params({k: summary[k] for k in ("num_labels", "parameters") if summary.get(k) is not None})

    def finish(self, summary: dict[str, Any] | None = None, workdir: Path | None = None, **tags: str) -> None:
        if summary is not None:
            self.log_summary(summary)
        if workdir is not None:
            self.log_artifacts(workdir)
            best = Path(workdir) / "checkpoints" / "best.pt"
            if best.is_file():  # too large to copy per run: where it is (crener evaluate --run-id)
                tags = {CHECKPOINT_TAG: str(best.resolve()), **tags}
        self.set_tags({"crener.state": STATE_FINISHED, **tags})
        _retry_locked(lambda: self.client.set_terminated(self.run_id, "FINISHED"))

    def terminate(self, status: str = "FINISHED") -> None:
        """Set the MLflow status only (a study's parent run, which has no crener.state)."""
        _retry_locked(lambda: self.client.set_terminated(self.run_id, status))

    def fail(self, error: BaseException | str, *, killed: bool = False) -> None:
        """Mark the run failed (``killed``: interrupted by the user); it stays resumable."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            self.set_tags({"crener.state": STATE_FAILED, "crener.error": text[:MAX_TAG_CHARS]})
            _retry_locked(lambda: self.client.set_terminated(self.run_id, "KILLED" if killed else "FAILED"))
        except Exception as exc:  # noqa: BLE001 - never hide the original error behind a logging one
            # One line: the store is most often unreachable here, and the cause is reported anyway.
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            log.error("could not mark MLflow run %s failed (%s); it stays resumable", self.run_id, reason)
