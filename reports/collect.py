"""MLflow runs -> one tidy DataFrame, plus per-run artifacts (predictions, history, per-type).

This is the only module of ``reports/`` that talks to MLflow. It relies on the tracking
contract written by ``crener.tracking`` (experiments ``crener-{sweep}-{profile}``; tags
``crener.*``; final metrics ``best/*``; artifacts ``predictions/test.jsonl``, ``per_type.json``).

Columns of :func:`collect_runs`:

- ``run_id``, ``experiment`` (name), ``start_time`` and ``end_time`` (ms since the epoch; no end
  for a run still open);
- one column per ``crener.*`` tag, without the prefix: ``key, sweep, model, variant, dataset,
  profile, seed (Int64), encoder, encoder_weights, msra_protocol, state, git_commit, machine``
  (the CPU and cores a run trained on; empty for runs logged before the tag);
- final metrics under their logged names (``best/test_f1``, ``seconds``, ``parameters``, ...);
- params as ``params.<name>`` (e.g. ``params.model.hidden``), strings as MLflow stores them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from crener.errors import CrenerError
from crener.workspace import sqlite_path
from crener.workspace import tracking_uri as resolve_tracking_uri

log = logging.getLogger(__name__)

TAG_PREFIX = "crener."
TAG_FIELDS: tuple[str, ...] = (
    "key",
    "sweep",
    "model",
    "variant",
    "dataset",
    "profile",
    "seed",
    "encoder",
    "encoder_weights",
    "msra_protocol",
    "state",
    "git_commit",
    "machine",
)
# Per-run final metrics (per-epoch metrics are read with load_history).
FINAL_METRICS: tuple[str, ...] = (
    "best/dev_precision",
    "best/dev_recall",
    "best/dev_f1",
    "best/test_precision",
    "best/test_recall",
    "best/test_f1",
    "best/epoch",
    "seconds",
    "parameters",
)
HISTORY_METRICS: tuple[str, ...] = ("train/loss", "dev/precision", "dev/recall", "dev/f1", "epoch_seconds")
PREDICTIONS_PATH = "predictions/test.jsonl"
PER_TYPE_PATH = "per_type.json"
EXPERIMENT_PREFIX = "crener-"
_PAGE = 1000


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        # MLflow would silently create an empty store; a report of nothing helps nobody.
        raise CrenerError(f"no MLflow store at {db} (set --tracking-uri or MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=uri)


def collect_runs(
    tracking_uri: str | None = None,
    profile: str | None = None,
    finished_only: bool = True,
) -> pd.DataFrame:
    """One row per run of every ``crener-*`` experiment (optionally of one profile).

    Runs are selected by tags (``crener.profile``, ``crener.state``), never by experiment name
    alone, so the CRENER full runs of the main sweep also serve the ablation table.
    """
    client = _client(tracking_uri)
    experiments = []
    token = None
    while True:
        page = client.search_experiments(
            filter_string=f"name LIKE '{EXPERIMENT_PREFIX}%'", max_results=_PAGE, page_token=token
        )
        experiments.extend(page)
        token = page.token
        if not token:
            break
    names = {e.experiment_id: e.name for e in experiments}
    filters = []
    if finished_only:
        filters.append("tags.`crener.state` = 'finished'")
    if profile is not None:
        filters.append(f"tags.`crener.profile` = '{profile}'")
    rows: list[dict[str, Any]] = []
    if names:
        token = None
        while True:
            page = client.search_runs(
                list(names), filter_string=" and ".join(filters), max_results=_PAGE, page_token=token
            )
            rows.extend(_row(run, names) for run in page)
            token = page.token
            if not token:
                break
    columns = ["run_id", "experiment", "start_time", "end_time", *TAG_FIELDS, *FINAL_METRICS]
    df = pd.DataFrame(rows)
    for col in columns:
        if col not in df:
            df[col] = pd.NA if col not in FINAL_METRICS else float("nan")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    ordered = columns + sorted(c for c in df.columns if c not in columns)
    df = df[ordered].sort_values(["dataset", "model", "variant", "seed", "start_time"], na_position="last")
    log.info("collected %d runs from %d experiments", len(df), len(names))
    return df.reset_index(drop=True)


def _row(run, experiment_names: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "experiment": experiment_names.get(run.info.experiment_id, run.info.experiment_id),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }
    for field in TAG_FIELDS:
        row[field] = run.data.tags.get(TAG_PREFIX + field)
    for key, value in run.data.metrics.items():
        if key in FINAL_METRICS or key.startswith("best/"):
            row[key] = value
    for key, value in run.data.params.items():
        row[f"params.{key}"] = value
    return row


_DOWNLOADS: dict[tuple[str, str, str], Path] = {}
_CACHE_DIR: Path | None = None


def _artifact(run_id: str, path: str, tracking_uri: str | None) -> Path | None:
    """Local copy of one artifact (downloaded once per process); None if the run lacks it."""
    import mlflow.artifacts

    global _CACHE_DIR
    # One progress bar per artifact floods the report's log; the user can still turn it on.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking_uri)
    key = (uri, run_id, path)
    if key in _DOWNLOADS:
        return _DOWNLOADS[key]
    if _CACHE_DIR is None:
        _CACHE_DIR = Path(tempfile.mkdtemp(prefix="crener-report-"))
    dst = _CACHE_DIR / run_id
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri
            )
        )
    except Exception as exc:  # MLflow raises several types for a missing artifact
        log.warning("run %s has no artifact %s (%s)", run_id, path, type(exc).__name__)
        return None
    _DOWNLOADS[key] = local
    return local


def load_predictions(run_id: str, tracking_uri: str | None = None) -> list[dict[str, Any]] | None:
    """The run's ``predictions/test.jsonl`` as a list of dicts sorted by ``index``; None if absent.

    Each dict has ``index``, ``text``, ``gold`` and ``pred`` (``[[indices, type], ...]``).
    """
    local = _artifact(run_id, PREDICTIONS_PATH, tracking_uri)
    if local is None:
        return None
    with open(local, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return sorted(records, key=lambda r: r["index"])


def load_per_type(run_id: str, tracking_uri: str | None = None) -> Any:
    """The run's ``per_type.json`` as parsed JSON; None if absent."""
    local = _artifact(run_id, PER_TYPE_PATH, tracking_uri)
    if local is None:
        return None
    return json.loads(local.read_text(encoding="utf-8"))


def load_history(run_id: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Per-epoch metrics: columns ``epoch`` and each of :data:`HISTORY_METRICS` that was logged."""
    client = _client(tracking_uri)
    frames = []
    for key in HISTORY_METRICS:
        points = client.get_metric_history(run_id, key)
        if points:
            frames.append(
                pd.DataFrame({"epoch": [m.step for m in points], key: [m.value for m in points]})
                .drop_duplicates("epoch", keep="last")
                .set_index("epoch")
            )
    if not frames:
        return pd.DataFrame(columns=["epoch", *HISTORY_METRICS])
    return pd.concat(frames, axis=1).sort_index().reset_index()
