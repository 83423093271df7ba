"""Time to accuracy as a stamped, committed page: what each system reaches on dev in how many
minutes of this machine (``crener report --time-to-accuracy --page FILE``).

One row per finished run of the ``full`` variant of a model (any sweep the command names, so the
runs of ``crener train --time-budget`` count): its encoder, how it trained it, the budget it was
planned for, the best dev F1 on its curve and the minutes that took, the minutes it took to first
reach the dataset's target, and its test F1. The figure draws dev F1 against minutes, one line
per (model, encoder, budget; without one, step cap), seeds averaged; a second table gives each
setting's mean and spread over its seeds (:func:`summary_rows`). Minutes are the run's own: the
cumulative ``epoch_seconds`` it logged (training and dev evaluation), which leave out start-up and
the final test; ``run min`` is the run's ``seconds`` (everything after start-up). Nothing is
trained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from crener.files import write_atomic
from crener.workspace import tracking_uri as resolve_tracking_uri
from reports import collect, plots, stats, tables

log = logging.getLogger(__name__)

# The dev F1 a run is timed to on each dataset: the time-to-accuracy goals this page is read
# against (reports/decisions.md says where they come from). A dataset without one gets "—".
TARGETS: dict[str, float] = {"resume": 0.93, "weibo": 0.55}

COLUMNS = (
    "model",
    "dataset",
    "encoder",
    "encoder regime",
    "seed",
    "budget min",
    "steps an epoch",
    "run min",
    "best dev F1",
    "at min",
    "target",
    "reached at min",
    "test F1",
    "run",
)


def curve_row(history: pd.DataFrame, target: float | None) -> dict[str, float]:
    """From one run's per-epoch curve (``epoch``, ``dev/f1``, ``epoch_seconds``): the best dev F1,
    the minutes at which the curve first reached it, and the minutes at which it first reached
    ``target`` (NaN if it never did or there is no target)."""
    if "epoch_seconds" not in history or "dev/f1" not in history or history["dev/f1"].isna().all():
        return {"best": math.nan, "at": math.nan, "reached": math.nan}
    # The figure's minutes (over every epoch logged, so an unscored epoch's time still passed),
    # then the epochs that were scored.
    hist = plots.with_minutes(history.assign(run_id="")).dropna(subset=["dev/f1"])
    minutes = hist["minutes"]
    f1 = hist["dev/f1"].to_numpy()
    best_i = int(f1.argmax())  # argmax: the first epoch with the best value
    hit = [i for i, v in enumerate(f1) if target is not None and v >= target]
    return {
        "best": float(f1[best_i]),
        "at": float(minutes.iloc[best_i]),
        "reached": float(minutes.iloc[hit[0]]) if hit else math.nan,
    }


def encoder_name(value: object) -> str:
    """A run's encoder as a short name: a path's last part (``.crener/encoders/x`` -> ``x``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    return Path(str(value)).name or str(value)


def _param(row: dict, name: str) -> str:
    """A logged param as the page shows it, to a tenth as the claim page gives a budget's minutes
    (a cell's share of a plan's minutes is fractional): "—" where the run did not log it or logged 0
    (a time budget of 0 is none; a step cap of 0 is no cap)."""
    value = row.get(f"params.{name}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        return "—" if float(value) == 0 else f"{round(float(value), 1):g}"
    except ValueError:
        return str(value)


def timing_rows(runs: pd.DataFrame, history: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run (:data:`COLUMNS`), F1 as fractions and minutes as floats; ``history`` maps
    run id -> its curve (:func:`reports.collect.load_history`)."""
    rows = []
    for row in runs.to_dict("records"):
        target = TARGETS.get(str(row["dataset"]))
        curve = curve_row(history.get(row["run_id"], pd.DataFrame()), target)
        cell = tables.Cell(pd.DataFrame([row]), ())
        regimes = tables.encoder_regimes(cell, row["model"])
        rows.append(
            {
                "model": row["model"],
                "dataset": row["dataset"],
                "encoder": encoder_name(row.get("encoder")) if tables.reads_encoder(row["model"]) else "—",
                "encoder regime": ", ".join(sorted(regimes)) or "—",
                "seed": row["seed"],
                "budget min": _param(row, "runtime.time_budget"),
                "steps an epoch": _param(row, "train.max_steps"),
                "run min": float(row.get("seconds", math.nan)) / 60,
                "best dev F1": curve["best"],
                "at min": curve["at"],
                "target": target if target is not None else math.nan,
                "reached at min": curve["reached"],
                "test F1": float(row.get("best/test_f1", math.nan)),
                "run": str(row["run_id"])[:8],
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


# What makes two runs one setting of the summary: all of a row but its seed and its outcomes. A
# run with a time budget is set by its minutes: the step cap is what the probe made of them on
# the machine at hand (seeds of one budget may get different caps), so there the caps are listed,
# not grouped on; a run without a budget is set by its step cap.
SETTING = ("model", "dataset", "encoder", "encoder regime", "budget min", "steps an epoch")
SUMMARY_COLUMNS = (*SETTING, "seeds", "run min", "best dev F1", "reached target", "reached at min", "test F1")


def summary_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (:data:`SETTING`) of :func:`timing_rows`: its step caps and seeds, and
    over them the mean run minutes, best dev F1 and test F1 as ``(mean, std)``, how many runs
    reached the target (``"k/n"``, "—" without one) and the mean minutes of those that did (a run
    that never reached it has no minutes to average, so the count says how many the mean covers)."""
    out = []
    setting = [_setting_label(b, c) for b, c in zip(rows["budget min"], rows["steps an epoch"], strict=True)]
    for _, group in rows.groupby(
        [*SETTING[:-1], pd.Series(setting, index=rows.index)], sort=False, dropna=False
    ):
        reached = f"{int(group['reached at min'].notna().sum())}/{len(group)}"
        caps = sorted(set(group["steps an epoch"]), key=lambda c: (len(c), c))
        out.append(
            {
                **{c: group[c].iloc[0] for c in SETTING[:-1]},
                "steps an epoch": ", ".join(caps),
                "seeds": ", ".join(str(s) for s in sorted(group["seed"])),
                "run min": float(group["run min"].mean()),
                "best dev F1": stats.mean_std(group["best dev F1"])[:2],
                "reached target": reached if group["target"].notna().any() else "—",
                "reached at min": stats.mean_std(group["reached at min"])[:2],
                "test F1": stats.mean_std(group["test F1"])[:2],
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


def _setting_label(budget: str, cap: str) -> str:
    """How :data:`SETTING` tells a run's training length apart, as the summary groups on it and a
    figure line is labelled: the budget, else the step cap."""
    if budget != "—":
        return f"({budget} min budget)"
    return "(every batch an epoch)" if cap == "—" else f"({cap} steps an epoch)"


def _fmt_summary(column: str, value: object) -> str:
    """A summary cell: ``mean ± std`` (×100 for F1; std "–" for one seed), minutes to 0.1."""
    if not isinstance(value, tuple):
        return _fmt(column, value)
    mean, std = value
    if math.isnan(mean):
        return "never" if column == "reached at min" else "—"
    scale, digits = (100, 2) if column in ("best dev F1", "test F1") else (1, 1)
    return f"{mean * scale:.{digits}f} ± " + (
        stats.NO_STD if math.isnan(std) else f"{std * scale:.{digits}f}"
    )


def _fmt(column: str, value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "never" if column == "reached at min" else "—"
        return f"{value * 100:.2f}" if column in ("best dev F1", "target", "test F1") else f"{value:.1f}"
    return str(value)


def timing_page(rows: pd.DataFrame, stamp: str, figure: str | None, run_ids: Sequence[str]) -> str:
    """The page: title, stamp, how to read it, the table, the figure and every run id."""
    body = [[_fmt(c, v) for c, v in zip(COLUMNS, r, strict=True)] for r in rows.itertuples(index=False)]
    lines = [
        "# Time to accuracy",
        "",
        stamp,
        "",
        "Dev F1 ×100 on each run's curve (one evaluation an epoch), and the minutes that took on the "
        "machine above: the run's cumulative training and dev-evaluation time, without start-up and "
        "the final test (`run min` is the whole run after start-up). `budget min` is the "
        "`--time-budget` the run's steps were planned for (— if none), `steps an epoch` its step cap "
        "an epoch; `reached at min` is when the curve first reached the dataset's `target` (never: "
        "not within the run). `test F1` is the "
        "test score of the best dev checkpoint. One seed a row: a single run, not a mean.",
        "",
        tabulate(body, headers=list(COLUMNS), tablefmt="github", disable_numparse=True)
        if body
        else "No finished runs.",
        "",
    ]
    if body:
        summary = [
            [_fmt_summary(c, v) for c, v in zip(SUMMARY_COLUMNS, r, strict=True)]
            for r in summary_rows(rows).itertuples(index=False)
        ]
        lines += [
            "## Over seeds",
            "",
            "The runs above grouped by setting (all but the seed): mean ± sample std over its seeds "
            "(ddof = 1; – for one seed). `reached target`: how many of its runs reached the target; "
            "`reached at min` is the mean over those runs only.",
            "",
            tabulate(summary, headers=list(SUMMARY_COLUMNS), tablefmt="github", disable_numparse=True),
            "",
        ]
    if figure:
        lines += [f"![dev F1 against minutes]({figure})", ""]
    lines += ["<details><summary>MLflow run ids</summary>", ""]
    lines += [f"- {r}" for r in run_ids] or ["- none"]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def latest_runs(runs: pd.DataFrame, sweeps: Sequence[str]) -> pd.DataFrame:
    """The finished ``full``-variant runs of ``sweeps``, the latest of each run key: unlike the
    tables' index, two encoders (or budgets) of one model, dataset and seed are two rows here."""
    keep = (runs["state"] == "finished") & runs["sweep"].isin(list(sweeps)) & runs["variant"].isin(["full"])
    df = runs[keep].sort_values("start_time")
    # A run logged without a key is a row of its own (NA keys would all count as one).
    own = df["key"].astype(object).where(df["key"].notna(), df["run_id"])
    df = df[~own.duplicated(keep="last")]
    return df.sort_values(["dataset", "model", "start_time"]).reset_index(drop=True)


def write_timing_page(
    profile: str,
    page: str | Path,
    *,
    tracking_uri: str | None = None,
    sweeps: Sequence[str] = tables.TABLE_SWEEPS,
    command: str = "",
) -> Path:
    """Write the time-to-accuracy page of ``profile``'s finished ``full``-variant runs from
    ``sweeps`` to ``page``, with its figure beside it (``<page stem>.png``)."""
    from reports.make_report import page_stamp

    uri = resolve_tracking_uri(tracking_uri)
    all_runs = collect.collect_runs(uri, profile=profile, finished_only=False)
    runs = latest_runs(all_runs, sweeps)
    history = {run_id: collect.load_history(run_id, uri) for run_id in runs["run_id"]}
    rows = timing_rows(runs, history)
    page = Path(page)
    figure = None
    if any(len(h) for h in history.values()):
        plots.setup_cjk_font()  # or English labels only, where the machine has no CJK font
        curves = pd.concat(
            [h.assign(run_id=i) for i, h in history.items() if len(h)], ignore_index=True
        ).merge(runs[["run_id", "model", "dataset", "seed", "encoder"]], on="run_id")
        curves["encoder"] = curves["encoder"].map(encoder_name)
        # A line is a model, encoder and setting (SETTING): seeds of one setting are averaged,
        # different budgets (or, without one, different steps an epoch) are not.
        label = {
            i: _setting_label(b, c)
            for i, b, c in zip(runs["run_id"], rows["budget min"], rows["steps an epoch"], strict=True)
        }
        curves["steps"] = [label[i] for i in curves["run_id"]]
        paths = plots.learning_curves(
            curves, page.with_suffix(""), x="minutes", by=("model", "encoder", "steps")
        )
        figure = next(p.name for p in paths if p.suffix == ".png")
    command = command or f"crener report --time-to-accuracy --profile {profile} --page {page}"
    stamp = page_stamp(command, uri, all_runs, runs, profile)
    page.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(page, timing_page(rows, stamp, figure, list(runs["run_id"])))
    log.info("time-to-accuracy page %s: %d runs", page, len(runs))
    return page
