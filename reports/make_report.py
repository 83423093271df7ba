"""Entry point of ``crener report``: MLflow store -> tables, figures, footnotes and an index.

Layout under ``out`` (default ``reports/out``, git-ignored)::

    index.md            date, profile, git commit, run counts, links, missing runs
    footnotes.md        the run ids behind every table row / cell, superseded runs, missing runs
    runs.csv            the tidy run DataFrame (every run of the profile, any state)
    tables/<name>.{md,tex,csv}   Tables 1-6 and the bootstrap table
    tables/breakdown_{type,length}.csv   per-type / per-length counts behind the figures
    figures/<name>.{png,pdf}

It never trains: a run that is not in the store is reported missing.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from crener.files import write_atomic
from crener.metrics import Counts, bucket_names
from crener.workspace import OPTUNA_STORAGE, git_commit, page_address, sqlite_path
from crener.workspace import tracking_uri as resolve_tracking_uri
from reports import collect, plots, stats, tables
from reports.paper import TABLE_DATASET, VARIANT_LABELS, systems

log = logging.getLogger(__name__)


def main(
    profile: str = "quick",
    out: str | Path = "reports/out",
    tracking_uri: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    msra_protocol: str = "lineage",
    optuna_storage: str | None = OPTUNA_STORAGE,
    data_root: str | None = None,
    dataset_loader: Any = None,
    sweeps: tuple[str, ...] = tables.TABLE_SWEEPS,
    ablation_shared_x: bool = False,
    page: str | Path | None = None,
    command: str = "",
) -> Path:
    """Write the whole report for ``profile`` under ``out``; return the path of ``index.md``.

    ``bootstrap`` is the number of resamples B; ``seed`` seeds them. ``dataset_loader``
    replaces ``crener.data.datasets.load_dataset`` for Table 1 (tests). ``sweeps`` are the
    sweeps whose runs make the tables (default main and ablation; tune and adhoc runs use
    other configurations on purpose). ``ablation_shared_x``: one Δ F1 scale for every
    dataset's panel of the ablation chart.
    ``page``: also write the tables, their notes and run ids as one committed
    Markdown page, stamped by :func:`page_stamp` (``command`` is the command line that made it).
    """
    out = Path(out)
    table_dir, figure_dir = out / "tables", out / "figures"
    table_dir.mkdir(parents=True, exist_ok=True)
    figure_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(tracking_uri)

    all_runs = collect.collect_runs(uri, profile=profile, finished_only=False)
    write_atomic(out / "runs.csv", all_runs.to_csv(index=False))
    finished = all_runs[all_runs["state"] == "finished"].reset_index(drop=True)
    index = tables.RunIndex(finished, sweeps=sweeps, planned=planned_seeds(profile, sweeps))
    warnings: list[str] = []

    # --- tables
    built: list[tables.Table] = []
    built.append(tables.dataset_table(loader=dataset_loader, data_root=data_root))
    built += [tables.main_table(index, n, profile, msra_protocol) for n in sorted(TABLE_DATASET)]
    t6 = tables.ablation_table(index, profile, msra_protocol)
    built.append(t6)

    def predictions(run_id: str):
        return collect.load_predictions(run_id, uri)

    built.append(
        tables.bootstrap_table(index, predictions, profile, msra_protocol, resamples=bootstrap, seed=seed)
    )
    table_files = {t.name: t.write(table_dir) for t in built}

    # --- figures
    font = plots.setup_cjk_font()
    if font is None:
        warnings.append(
            "No CJK font found: Chinese labels in figures render as boxes (apt-get install fonts-noto-cjk)."
        )
    figures = _figures(index, uri, msra_protocol, t6, predictions, figure_dir, table_dir, ablation_shared_x)
    if optuna_storage and _storage_exists(optuna_storage):
        for path in plots.optuna_figures(optuna_storage, figure_dir):
            figures.setdefault(path.stem, []).append(path)
    else:
        log.info("no Optuna storage at %s: no Optuna figures", optuna_storage)

    # --- provenance
    missing = list(dict.fromkeys(m for t in built for m in t.missing))
    _write_footnotes(out / "footnotes.md", built, index, missing)
    index_path = out / "index.md"
    write_atomic(
        index_path,
        _index_text(
            profile,
            uri,
            all_runs,
            index,
            table_files,
            figures,
            missing,
            warnings,
            font,
            out,
            bootstrap,
            sweeps,
        ),
    )
    if page is not None:
        stamp = page_stamp(command, uri, all_runs, index.runs, profile)
        Path(page).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(page), results_page(profile, stamp, built, index, missing))
        log.info("and the results page %s", page)
    log.info("report written to %s", index_path)
    return index_path


def _figures(
    index: tables.RunIndex,
    uri: str,
    msra_protocol: str,
    t6: tables.Table,
    predictions: Any,
    figure_dir: Path,
    table_dir: Path,
    ablation_shared_x: bool,
) -> dict[str, list[Path]]:
    """The report's figures from the runs' logged curves and predictions: ``{name: files}``; the
    breakdowns behind the F1-by-group figures are written as CSV beside the tables."""
    figures: dict[str, list[Path]] = {}
    history = _histories(index, uri, msra_protocol)
    systems_hist = history[history["variant"] == "full"] if len(history) else history
    # First in the index: what each system reaches in how many minutes here.
    figures["time_to_accuracy"] = plots.learning_curves(
        systems_hist, figure_dir / "time_to_accuracy", x="minutes"
    )
    figures["ablation_delta_f1"] = plots.ablation_chart(
        t6.data, figure_dir / "ablation_delta_f1", ablation_shared_x
    )
    crener_hist = history[history["model"] == "crener"] if len(history) else history
    figures["learning_curves_variants"] = plots.learning_curves(
        crener_hist, figure_dir / "learning_curves_variants"
    )
    figures["learning_curves_systems"] = plots.learning_curves(
        systems_hist, figure_dir / "learning_curves_systems"
    )
    system_names = list(systems())
    for by in ("type", "length"):
        frame = _breakdowns(index, predictions, by, msra_protocol)
        write_atomic(table_dir / f"breakdown_{by}.csv", frame.to_csv(index=False))
        figures[f"f1_by_{by}"] = plots.f1_by_group(
            frame, by, figure_dir / f"f1_by_{by}", systems=system_names
        )
    return figures


def page_stamp(command: str, uri: str, all_runs: pd.DataFrame, used: pd.DataFrame, profile: str) -> str:
    """Where a results page's figures come from: the command, the report's commit and date, and the
    commits and machines its runs (``used``, of ``all_runs`` logged) trained on (a figure compares
    with figures of its machine only)."""
    from crener.device import machine_info

    m = machine_info()
    commits = sorted({str(c)[:7] for c in used.get("git_commit", pd.Series(dtype=object)).dropna()})
    machines = sorted({str(c) for c in used.get("machine", pd.Series(dtype=object)).dropna() if str(c)})
    untagged = len(used) - int(used["machine"].notna().sum()) if "machine" in used else len(used)
    where = "; ".join(machines) or "machines not recorded (runs logged before the crener.machine tag)"
    if machines and untagged:
        where += f"; {untagged} runs logged before the crener.machine tag"
    return (
        f"Generated by `{command or 'crener report --profile ' + profile}` from the MLflow store "
        f"`{page_address(uri)}` (do not edit: rerun it; nothing is retrained), report code at commit "
        f"`{str(m['commit'])[:7]}`, {m['date']}. Runs: {len(used)} finished of {len(all_runs)} logged "
        f"for profile `{profile}`, trained at commit{'s' * (len(commits) != 1)} "
        f"{', '.join(f'`{c}`' for c in commits) or 'none'} on {where}."
    )


def results_page(
    profile: str, stamp: str, built: list[tables.Table], index: tables.RunIndex, missing: list[str]
) -> str:
    """Tables 1-6 and the bootstrap tests as one Markdown page, each table with its notes and the
    MLflow run ids behind its cells."""
    lines = [f"# Results: profile `{profile}`", "", stamp, ""]
    lines += [
        "Every figure is test F1 (or P, R) ×100, mean ± sample std over the seeds each table's header "
        "names; a cell with no finished run reads —. Figures hold for the machines and commits above.",
        "",
    ]
    for t in built:
        lines += [t.markdown().replace("### ", "## ", 1), ""]
        if t.footnotes:
            lines += ["<details><summary>MLflow run ids</summary>", ""]
            lines += [f"- {cell}: {', '.join(ids)}" for cell, ids in t.footnotes]
            lines += ["", "</details>", ""]
    lines += [f"## Missing runs ({len(missing)})", ""] + ([f"- {m}" for m in missing] or ["- none"])
    return "\n".join(lines) + "\n"


def planned_seeds(profile: str, sweeps: tuple[str, ...]):
    """``(model, variant, dataset) -> seeds`` the named sweeps plan under ``profile`` (their union),
    or None for a cell no sweep plans; a sweep without a config file (adhoc) plans nothing.

    Without it every cell would be expected to have every seed seen in the store, and quick's
    single seed of OntoNotes 4.0 and MSRA read as missing beside Resume's and Weibo's three."""
    from experiments.sweeps import SweepError, load_sweep

    plans = []
    for name in sweeps:
        try:
            plans.append(load_sweep(name))
        except SweepError:
            continue

    def seeds(model: str, variant: str, dataset: str) -> tuple[int, ...] | None:
        found = {
            s
            for sw in plans
            if model in sw.models and variant in sw.variants and dataset in sw.datasets
            for s in sw.seeds_for(profile, dataset)
        }
        return tuple(sorted(found)) if found else None

    return seeds


def _histories(index: tables.RunIndex, uri: str, msra_protocol: str) -> pd.DataFrame:
    frames = []
    for row in index.runs.to_dict("records"):
        if row["dataset"] == "msra" and row["protocol"] != msra_protocol:
            continue
        hist = collect.load_history(row["run_id"], uri)
        if len(hist) and "dev/f1" in hist:
            frames.append(
                hist.assign(
                    model=row["model"],
                    variant=row["variant"],
                    dataset=row["dataset"],
                    seed=row["seed"],
                    run_id=row["run_id"],
                )
            )
    if not frames:
        return pd.DataFrame(columns=["model", "variant", "dataset", "seed", "epoch", "dev/f1", "run_id"])
    return pd.concat(frames, ignore_index=True)


def _breakdowns(index: tables.RunIndex, predictions, by: str, msra_protocol: str) -> pd.DataFrame:
    """Per-type / per-length counts of each rerun system, pooled over its seeds."""
    rows = []
    for name, (model, variant) in systems().items():
        for ds in TABLE_DATASET.values():
            cell = index.cell(model, variant, ds, msra_protocol)
            parts, used = [], []
            for run_id in cell.run_ids:
                preds = predictions(run_id)
                if preds is not None:
                    parts.append(stats.breakdown(preds, by))
                    used.append(run_id)
            if not parts:
                continue
            pooled = pd.concat(parts).groupby("group", sort=False)[["correct", "predicted", "gold"]].sum()
            for group, r in pooled.iterrows():
                counts = Counts(int(r["correct"]), int(r["predicted"]), int(r["gold"]))
                rows.append(
                    {
                        "system": name,
                        "dataset": ds,
                        "group": group,
                        "correct": int(r["correct"]),
                        "predicted": int(r["predicted"]),
                        "gold": int(r["gold"] / len(parts)),  # the same test set for every seed
                        "precision": counts.precision,
                        "recall": counts.recall,
                        "f1": counts.f1,
                        "n_seeds": len(parts),
                        "run_ids": ";".join(used),
                    }
                )
    columns = [
        "system",
        "dataset",
        "group",
        "correct",
        "predicted",
        "gold",
        "precision",
        "recall",
        "f1",
        "n_seeds",
        "run_ids",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        # Seeds may lack a group, so pooled order is arbitrary: sort buckets by length, types by name.
        order = {label: i for i, label in enumerate(bucket_names())}

        def key(col: pd.Series) -> pd.Series:
            return col.map(order) if by == "length" and col.name == "group" else col

        frame = frame.sort_values(["dataset", "group"], key=key, kind="stable").reset_index(drop=True)
    return frame


def _storage_exists(storage: str) -> bool:
    db = sqlite_path(storage)
    return db is None or db.exists()


def _write_footnotes(
    path: Path, built: list[tables.Table], index: tables.RunIndex, missing: list[str]
) -> None:
    lines = ["# Run ids behind every reported number", ""]
    lines.append(
        "Each line names a table cell (or a row whose P, R and F1 cells share the runs) and the MLflow "
        "run ids it is computed from, in seed order."
    )
    for t in built:
        lines += ["", f"## {t.title} (`{t.name}`)", ""]
        if not t.footnotes:
            lines.append(
                "- no runs behind this table"
                + (" (measured from the data)" if t.name.startswith("table1") else "")
            )
        lines += [f"- {cell}: {', '.join(ids)}" for cell, ids in t.footnotes]
    lines += ["", "## Superseded runs (same seed run again; the later run is used)", ""]
    lines += [f"- {rid}" for rid in index.superseded] or ["- none"]
    lines += ["", "## Missing runs", ""]
    lines += [f"- {m}" for m in missing] or ["- none"]
    write_atomic(path, "\n".join(lines) + "\n")


def _index_text(
    profile: str,
    uri: str,
    all_runs: pd.DataFrame,
    index: tables.RunIndex,
    table_files: dict[str, dict[str, Path]],
    figures: dict[str, list[Path]],
    missing: list[str],
    warnings: list[str],
    font: str | None,
    out: Path,
    bootstrap: int,
    sweeps: tuple[str, ...],
) -> str:
    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    states = all_runs["state"].fillna("unknown").value_counts().to_dict() if len(all_runs) else {}
    sweeps = all_runs["sweep"].fillna("unknown").value_counts().to_dict() if len(all_runs) else {}
    run_commits = sorted({str(c)[:7] for c in all_runs.get("git_commit", pd.Series(dtype=object)).dropna()})
    lines = [
        f"# CRENER reproduction report — profile `{profile}`",
        "",
        f"- generated: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- report code at git commit: `{git_commit()[:7]}`; runs from commits: {', '.join(f'`{c}`' for c in run_commits) or 'none'}",
        f"- tracking store: `{uri}`",
        f"- runs of this profile: {len(all_runs)} ({', '.join(f'{k}: {v}' for k, v in sorted(states.items())) or 'none'}); "
        f"by sweep: {', '.join(f'{k}: {v}' for k, v in sorted(sweeps.items())) or 'none'}",
        f"- runs used in tables (finished, sweeps {', '.join(sweeps)}): {len(index.runs)}; "
        f"superseded: {len(index.superseded)}; seeds: {', '.join(map(str, index.seeds)) or 'none'}",
        f"- cells: mean ± sample std over seeds (ddof = 1; one seed reads `x ± –`; no run reads `—`); bootstrap B = {bootstrap}",
        f"- figure font: {font or 'none (no CJK font found; Chinese labels render as boxes — install fonts-noto-cjk)'}",
        "- provenance: [footnotes.md](footnotes.md) (run ids per cell), [runs.csv](runs.csv) (all runs)",
        "",
        "## Tables",
        "",
    ]
    for name, files in table_files.items():
        lines.append(f"- {name}: " + " · ".join(f"[{ext}]({rel(p)})" for ext, p in files.items()))
    lines += ["", "## Figures", ""]
    for name, paths in figures.items():
        lines.append(f"- {name}: " + " · ".join(f"[{p.suffix[1:]}]({rel(p)})" for p in paths))
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", f"## Missing runs ({len(missing)})", ""]
    lines += [f"- {m}" for m in missing] or ["- none"]
    lines += ["", "Ablation rows: " + ", ".join(f"`{v}` = {label}" for v, label in VARIANT_LABELS.items())]
    return "\n".join(lines) + "\n"
