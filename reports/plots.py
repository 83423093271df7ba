"""Figures of the report (PNG and PDF), drawn from tidy DataFrames only; no MLflow here.

- ablation chart: Δ test F1 from the full model per ablation, ours vs paper, per dataset;
- learning curves: dev F1 per epoch for each variant (mean over seeds, band = ± std);
- F1 by entity length and by entity type, per dataset and system;
- Optuna optimisation history and parameter importances, when studies exist.

Titles use Chinese dataset names (微博, 简历), so a CJK font is needed: :func:`setup_cjk_font`
looks for Noto Sans CJK (``apt-get install fonts-noto-cjk``) or another CJK family; without one
it warns once and every figure falls back to its English labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from crener.files import write_atomic  # noqa: E402
from reports.paper import DATASET_LABELS, DATASET_LABELS_ZH, DATASETS, VARIANT_LABELS  # noqa: E402

log = logging.getLogger(__name__)

# Preferred CJK families, best first.
CJK_FAMILIES: tuple[str, ...] = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Noto Sans SC",
    "Source Han Sans SC",
    "Source Han Sans CN",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Noto Serif CJK SC",
)
_CJK_FILE_HINTS = ("cjk", "wqy", "sourcehan", "simhei", "msyh", "pingfang", "notosanssc")
FORMATS: tuple[str, ...] = ("png", "pdf")
DPI = 150


# Whether figure labels may hold Chinese: False after setup_cjk_font found no CJK font, so the
# figures fall back to their English labels instead of boxes and one glyph warning per character.
_CJK = True


def setup_cjk_font() -> str | None:
    """Make a CJK-capable family matplotlib's first sans-serif; return its name, or None (then
    every label of these figures is English)."""
    global _CJK
    names = {f.name for f in font_manager.fontManager.ttflist}
    if not any(f in names for f in CJK_FAMILIES):
        # Fonts installed after matplotlib built its cache are not in it: register them.
        for path in font_manager.findSystemFonts():
            if any(h in Path(path).name.lower() for h in _CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        names = {f.name for f in font_manager.fontManager.ttflist}
    for family in CJK_FAMILIES:
        if family in names:
            plt.rcParams["font.family"] = "sans-serif"
            plt.rcParams["font.sans-serif"] = [family, *plt.rcParams["font.sans-serif"]]
            plt.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212
            _CJK = True
            return family
    _CJK = False
    log.warning("no CJK font found (install fonts-noto-cjk): figures use English labels only")
    return None


def dataset_title(dataset: str) -> str:
    """``微博 Weibo``; the plain label where the Chinese name is the same or no CJK font exists."""
    zh, en = DATASET_LABELS_ZH.get(dataset, dataset), DATASET_LABELS.get(dataset, dataset)
    return en if zh == en or not _CJK else f"{zh} {en}"


def bilingual(zh: str, en: str) -> str:
    """``zh (en)``, or ``en`` alone without a CJK font."""
    return f"{zh} ({en})" if _CJK else en


def save(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf``; close the figure."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        path = stem.with_suffix(f".{ext}")
        write_atomic(path, lambda fh, ext=ext: fig.savefig(fh, format=ext, dpi=DPI, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths


def _datasets_present(df: pd.DataFrame) -> list[str]:
    present = set(df["dataset"]) if len(df) else set()
    return [d for d in DATASETS if d in present] or list(DATASETS)


def ablation_chart(data: pd.DataFrame, stem: Path, shared_x: bool = False) -> list[Path]:
    """Δ F1 from full per ablation, ours (error bar = std of the variant) vs paper, per dataset.

    ``data``: Table 6 CSV rows with ``variant, dataset, delta_full, paper_delta_full, f1_std``.
    ``shared_x``: one Δ scale for every dataset, so bar lengths compare across panels (each
    panel's own scale shows small deltas better).
    """
    rows = data[~data["variant"].isin(["full", "_agreement"])]
    variants = [v for v in VARIANT_LABELS if v != "full"]
    fig, axes = plt.subplots(
        1, len(DATASETS), figsize=(4.2 * len(DATASETS), 4.6), sharey=False, sharex=shared_x
    )
    y = np.arange(len(variants))
    for ax, ds in zip(np.atleast_1d(axes), DATASETS):
        sub = rows[rows["dataset"] == ds].set_index("variant").reindex(variants)
        ours = sub["delta_full"].astype(float).to_numpy()
        theirs = sub["paper_delta_full"].astype(float).to_numpy()
        err = sub["f1_std"].astype(float).fillna(0).to_numpy() if "f1_std" in sub else None
        ax.barh(y - 0.2, theirs, height=0.4, label="paper / 论文" if _CJK else "paper", color="#bbbbbb")
        ax.barh(
            y + 0.2,
            np.nan_to_num(ours),
            height=0.4,
            xerr=err,
            label="ours / 复现" if _CJK else "ours",
            color="#1f77b4",
        )
        for yi, value in zip(y, ours):
            if np.isnan(value):  # no run: say so instead of drawing a zero-length bar
                ax.text(0, yi + 0.2, "no run ", ha="right", va="center", fontsize=7, color="#1f77b4")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(dataset_title(ds))
        ax.set_yticks(y)
        ax.set_yticklabels([VARIANT_LABELS[v] for v in variants] if ds == DATASETS[0] else [])
        ax.invert_yaxis()
        ax.set_xlabel("Δ F1 from full (points)")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(("消融实验 " if _CJK else "") + "Ablation: Δ test F1 vs full model")
    fig.tight_layout()
    return save(fig, stem)


def with_minutes(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` with ``minutes``: each run's wall-clock minutes at the end of each epoch."""
    history = history.sort_values(["run_id", "epoch"])
    return history.assign(minutes=history.groupby("run_id")["epoch_seconds"].cumsum() / 60)


def learning_curves(
    history: pd.DataFrame,
    stem: Path,
    metric: str = "dev/f1",
    x: str = "epoch",
    by: tuple[str, ...] = ("model", "variant"),
) -> list[Path]:
    """Dev F1 per epoch for each line (by default each (model, variant); ``by`` names the columns
    that tell lines apart), mean over seeds with a ± std band.

    ``history``: columns ``model, variant, dataset, seed, epoch`` and ``metric`` (fractions).
    ``x="minutes"``: against wall-clock minutes instead (each run's cumulative ``epoch_seconds``,
    training and dev evaluation, then their mean over seeds at each epoch): time to accuracy.
    """
    if x == "minutes" and len(history) and "epoch_seconds" in history:
        history = with_minutes(history)
    datasets = _datasets_present(history)

    def label_of(keys: tuple) -> str:
        return " ".join(VARIANT_LABELS.get(v, v) if col == "variant" else str(v) for col, v in zip(by, keys))

    # One colour a line across panels, whichever lines a panel has.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = sorted({label_of(k) for k, _ in history.groupby(list(by))}) if len(history) else []
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(lines)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = history[(history["dataset"] == ds)] if len(history) else history
        if not len(sub) or metric not in sub:
            ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
        else:
            for keys, grp in sub.groupby(list(by), sort=True):
                curve = grp.groupby("epoch")[metric].agg(["mean", "std"]).sort_index()
                xs = grp.groupby("epoch")["minutes"].mean().sort_index() if "minutes" in grp else curve.index
                label = label_of(keys)
                line = ax.plot(
                    xs, curve["mean"] * 100, marker="o", markersize=3, label=label, color=colour[label]
                )[0]
                std = curve["std"].fillna(0).to_numpy() * 100
                mean = curve["mean"].to_numpy() * 100
                # F1 lies in [0, 100]: a wide band early in training (one seed still at 0) would
                # otherwise reach below the axis's meaning.
                ax.fill_between(
                    xs,
                    np.clip(mean - std, 0, 100),
                    np.clip(mean + std, 0, 100),
                    alpha=0.15,
                    color=line.get_color(),
                )
        ax.set_title(dataset_title(ds))
        if x == "minutes":
            ax.set_xlabel("wall-clock minutes (training + dev evaluation, this machine)")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
        ax.set_ylabel("dev F1 (%)")
    title = "Time to accuracy (dev F1 against minutes)" if x == "minutes" else "Learning curves (dev F1)"
    fig.suptitle(("学习曲线 " if _CJK else "") + title)
    _figure_legend(fig, axes[0])
    return save(fig, stem)


def f1_by_group(
    breakdown: pd.DataFrame, by: str, stem: Path, systems: Sequence[str] | None = None
) -> list[Path]:
    """Grouped bars of test F1 per entity type or length bucket, per dataset and system.

    ``breakdown``: columns ``system, dataset, group, f1, gold`` (f1 a fraction, counts pooled
    over seeds). Groups keep the order of appearance (length buckets are pre-sorted).
    """
    datasets = _datasets_present(breakdown)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = breakdown[breakdown["dataset"] == ds] if len(breakdown) else breakdown
        if not len(sub):
            ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
            ax.set_title(dataset_title(ds))
            continue
        groups = list(dict.fromkeys(sub["group"]))
        names = [s for s in (systems or list(dict.fromkeys(sub["system"]))) if s in set(sub["system"])]
        width = 0.8 / max(len(names), 1)
        x = np.arange(len(groups))
        for i, name in enumerate(names):
            values = sub[sub["system"] == name].set_index("group").reindex(groups)["f1"].astype(float)
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values.fillna(0) * 100, width, label=name)
        gold = sub.groupby("group", sort=False)["gold"].max().reindex(groups)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [f"{g}\n(n={int(n)})" for g, n in zip(groups, gold.fillna(0))],
            fontsize=7,
            rotation=45 if len(groups) > 4 else 0,
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("test F1 (%)")
        ax.set_title(dataset_title(ds))
    what = (
        bilingual("各实体类型的 F1", "F1 by entity type")
        if by == "type"
        else bilingual("按实体长度的 F1", "F1 by entity length, characters")
    )
    fig.suptitle(what)
    _figure_legend(fig, axes[0])
    return save(fig, stem)


def _figure_legend(fig, axes) -> None:
    """One legend to the right of all panels: every panel draws the same systems, and a legend
    inside a panel hides its bars or curves."""
    handles: dict[str, Any] = {}  # label -> first handle, in drawing order
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout()
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8
        )


def optuna_figures(storage: str, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances of every study in ``storage``."""
    import optuna

    try:
        names = optuna.get_all_study_names(storage=storage)
    except Exception as exc:  # no database, or not an Optuna one
        log.info("no Optuna studies in %s (%s)", storage, type(exc).__name__)
        return []
    paths: list[Path] = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            continue
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        paths += _optuna_plot(study, "history", out_dir / f"optuna_{safe}_history")
        if len(done) >= 2 and any(t.params for t in done):
            paths += _optuna_plot(study, "importance", out_dir / f"optuna_{safe}_importance")
    return paths


def study_title(study) -> str:  # noqa: ANN001 - an optuna.Study
    """``CRENER full on Resume (quick), 20 trials`` from the attributes `crener tune` stores; the
    study name only for other studies (the default name repeats the project's prefix)."""
    a = study.user_attrs
    n = len(study.trials)
    if {"model", "variant", "dataset", "profile"} <= set(a):
        from crener import registry
        from reports.paper import DATASET_LABELS, VARIANT_LABELS

        family = registry.families().get(a["model"])
        name = family.label if family is not None else a["model"]
        if a["variant"] != "full":
            name += f" {VARIANT_LABELS.get(a['variant'], a['variant'])}"
        what = f"{name} on {DATASET_LABELS.get(a['dataset'], a['dataset'])}"
        return f"Tuning {what} ({a['profile']}), {n} trials"
    return f"Optuna study {study.study_name}, {n} trials"


def _optuna_plot(study, kind: str, stem: Path) -> list[Path]:
    import warnings

    from optuna.visualization import matplotlib as ovm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            ax = (
                ovm.plot_optimization_history(study)
                if kind == "history"
                else ovm.plot_param_importances(study)
            )
    except Exception as exc:  # e.g. importances need varied params; never sink the report
        log.warning("Optuna %s plot of %s failed: %s", kind, study.study_name, exc)
        plt.close("all")
        return []
    fig = np.atleast_1d(ax)[0].figure
    fig.suptitle(study_title(study))
    return save(fig, stem)
