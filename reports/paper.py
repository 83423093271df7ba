"""The CRENER paper's reported numbers (method.md §6), machine-readable, with consistency notes.

This module is the single source of every number we *copy* rather than measure: Tables 1-6 of
the paper, TENER's F1 (method.md §6.8) and the notes of §6.7. Tables, plots and
:mod:`reports.reported` read them through :func:`paper_table`; nothing else should hard-code a
paper value.

Percentages are stored as printed in the paper (0-100). Our MLflow metrics are fractions, so
``reports.tables`` multiplies ours by 100 before comparing.
"""

from __future__ import annotations

import math

import pandas as pd

from crener import registry

# Our dataset names (crener.dataset tag) in the paper's column order, with display labels.
DATASETS: tuple[str, ...] = ("weibo", "resume", "ontonotes4", "msra")
DATASET_LABELS: dict[str, str] = {
    "weibo": "Weibo",
    "resume": "Resume",
    "ontonotes4": "OntoNotes 4.0",
    "msra": "MSRA",
}
# Chinese names, used in figure titles (so the CJK font matters there).
DATASET_LABELS_ZH: dict[str, str] = {
    "weibo": "微博",
    "resume": "简历",
    "ontonotes4": "OntoNotes 4.0",
    "msra": "MSRA",
}
# Paper table number -> dataset of Tables 2-5.
TABLE_DATASET: dict[int, str] = {2: "weibo", 3: "resume", 4: "ontonotes4", 5: "msra"}


def rerun_systems() -> dict[str, tuple[str, str]]:
    """Paper rows we rerun -> our (crener.model, crener.variant) tags: the model families that
    say they are a paper row (:mod:`crener.registry`), under the paper's spelling."""
    return {f.label: (f.name, "full") for f in registry.families().values() if f.paper_row}


def extra_systems() -> dict[str, tuple[str, str]]:
    """Our extra baselines (registered families that are not rows of the paper's tables)."""
    return {f.label: (f.name, "full") for f in registry.families().values() if not f.paper_row}


def systems() -> dict[str, tuple[str, str]]:
    """Every system of Tables 2-5 we run: the rerun paper rows, then our extra baselines."""
    return {**rerun_systems(), **extra_systems()}


# Table 6 rows: our variant name (crener.profiles.VARIANTS) -> the paper's row label.
VARIANT_LABELS: dict[str, str] = {
    "full": "full",
    "no_transformer": "w/o Transformer",
    "no_region": "w/o Region matrix",
    "no_distance": "w/o Distance matrix",
    "no_dconv": "w/o Dilated convolution",
    "no_mlp": "w/o MLP",
    "no_biaffine": "w/o Biaffine",
    "no_enhancement": "w/o Enhancement",
    "no_relation": "w/o relation (NNW, PNW, THW, HTW)",
}

# --- Tables 2-5 (method.md §6.2-6.5): system -> (P, R, F1) per dataset, in the paper's row order.
_MAIN: dict[str, dict[str, tuple[float, float, float]]] = {
    "weibo": {
        "CAN-NER": (55.38, 62.98, 59.31),
        "SoftLexicon": (70.94, 67.02, 70.50),
        "MECT": (61.91, 62.51, 63.30),
        "MSFM": (60.75, 51.83, 55.94),
        "MFT": (63.72, 65.03, 64.38),
        "W²NER": (70.84, 73.87, 72.32),
        "Token-Relation": (72.82, 66.02, 69.62),
        "NER-MC": (62.20, 64.05, 63.06),
        "VisPhone": (65.65, 71.29, 70.79),
        "DAE-NER": (69.68, 48.89, 57.45),
        "CRENER": (74.03, 79.43, 76.63),
    },
    "resume": {
        "CAN-NER": (95.71, 95.77, 95.74),
        "SoftLexicon": (96.08, 96.13, 96.11),
        "MECT": (96.40, 95.39, 95.89),
        "MSFM": (96.08, 94.79, 95.43),
        "MFT": (96.05, 95.52, 95.78),
        "W²NER": (96.96, 96.35, 96.65),
        "Token-Relation": (96.01, 96.50, 96.36),
        "NER-MC": (94.60, 95.73, 95.16),
        "VisPhone": (96.09, 96.44, 96.26),
        "DAE-NER": (96.92, 95.18, 96.04),
        "CRENER": (97.16, 96.56, 96.86),
    },
    "ontonotes4": {
        "CAN-NER": (75.05, 72.29, 73.64),
        "SoftLexicon": (83.41, 82.21, 82.81),
        "MECT": (77.57, 76.27, 76.92),
        "W²NER": (82.31, 83.36, 83.08),
        "Token-Relation": (82.57, 83.99, 83.28),
        "NER-MC": (76.22, 75.81, 76.01),
        "VisPhone": (80.57, 84.79, 82.63),
        "CRENER": (81.25, 85.34, 83.25),
    },
    "msra": {
        "CAN-NER": (93.53, 92.42, 92.97),
        "SoftLexicon": (95.75, 95.10, 95.42),
        "MECT": (94.55, 94.09, 94.32),
        "W²NER": (96.12, 96.12, 96.10),
        "Token-Relation": (96.08, 96.18, 96.13),
        "NER-MC": (94.27, 92.66, 93.46),
        "VisPhone": (96.31, 95.83, 96.07),
        "CRENER": (96.09, 96.34, 96.21),
    },
}

# Extra baselines' F1 published elsewhere: TENER (no BERT), from the TENER paper (method.md §6.8);
# P/R are not given there.
_EXTRA_F1: dict[str, dict[str, float]] = {
    "TENER": {"weibo": 58.17, "resume": 95.00, "ontonotes4": 72.43, "msra": 92.74}
}

# --- Table 6 (method.md §6.6): variant -> F1 on (Weibo, Resume, OntoNotes4, MSRA).
_ABLATION: dict[str, tuple[float, float, float, float]] = {
    "full": (76.63, 96.86, 83.25, 96.21),
    "no_transformer": (70.20, 95.30, 79.39, 93.99),
    "no_region": (68.42, 95.91, 78.40, 95.97),
    "no_distance": (67.94, 95.31, 79.39, 95.56),
    "no_dconv": (74.75, 96.07, 82.69, 95.99),
    "no_mlp": (75.79, 95.92, 79.36, 94.48),
    "no_biaffine": (75.91, 95.80, 79.64, 94.58),
    "no_enhancement": (76.00, 96.15, 79.69, 94.41),
    "no_relation": (72.82, 94.81, 82.08, 94.31),
}

# --- Table 1 (method.md §6.1): (split -> (sentences, entities)) and number of types, as printed
# (k = thousands; None where the paper prints "–").
_STATS: dict[str, tuple[dict[str, tuple[float | None, float | None]], int]] = {
    "weibo": ({"train": (1350, 1890), "dev": (270, 390), "test": (270, 420)}, 4),
    "resume": ({"train": (3800, 1340), "dev": (460, 160), "test": (480, 150)}, 8),
    "ontonotes4": ({"train": (15700, 13400), "dev": (4300, 6950), "test": (4300, 7700)}, 4),
    "msra": ({"train": (46400, 74800), "dev": (None, None), "test": (4400, 6200)}, 3),
}
_STATS_NOTES: dict[str, str] = {
    "weibo": "paper counts 4 coarse types; the data carries 8 fine labels (PER/ORG/LOC/GPE × NAM/NOM), used for training and scoring",
    "resume": "paper's entity row is 10× too small: measured 13,440 / 1,497 / 1,630 entities",
    "ontonotes4": "",
    "msra": "no dev split: lineage protocol uses test as dev, clean protocol holds out the last 4,365 train sentences",
}

# --- §6.7 consistency notes that arithmetic alone does not produce, keyed (table, system).
_HAND_NOTES: dict[tuple[int, str], str] = {
    (5, "W²NER"): (
        "recall likely mis-copied: the W2NER paper gives R = 96.08, which makes F1 = 96.10 consistent"
    ),
    (3, "CRENER"): "prose claims +0.31 F1 over W²NER; the table gives +0.21",
    (5, "VisPhone"): "prose gives F1 96.09; the table 96.07",
    (4, "CRENER"): "prose says 'similar F1 to Token-Relation'; 83.25 vs 83.28 is slightly lower",
    (4, "W²NER"): "the W2NER paper's own numbers (82.31/83.36/83.08) carry the same inconsistency",
    (6, "no_region"): (
        "prose ('direction' at most 2.61, at least 0.54) does not match the table; "
        "Weibo drop > 8 F1 for a 20-dim embedding is odd"
    ),
    (6, "no_distance"): (
        "prose ('at most 3.32, at least 0.75') does not match the table; "
        "Weibo drop > 8 F1 for a 20-dim embedding is odd"
    ),
    (6, "no_biaffine"): "prose claims 'at least 0.74'; the table's smallest drop is 0.72 (Weibo)",
    (6, "no_mlp"): "OntoNotes: MLP, Biaffine and Enhancement each cost 3.6-3.9 F1, dilated convs only 0.56",
    (
        6,
        "no_enhancement",
    ): "OntoNotes: MLP, Biaffine and Enhancement each cost 3.6-3.9 F1, dilated convs only 0.56",
    (6, "no_dconv"): "the prose's 'at most 1.88' is the only ablation figure that matches the table",
}
_EXTRA_NOTE = "our extra baseline; not in the paper"
_EXTRA_NOTES: dict[str, str] = {
    "TENER": "our extra baseline; F1 from the TENER paper (no BERT), P/R not reported there",
}

# A row whose F1 differs from the harmonic mean of its P and R by more than this (in points)
# cannot come from one set of counts; rounding of P and R alone moves F1 by < 0.01.
HARMONIC_TOLERANCE = 0.015


def harmonic_f1(precision: float, recall: float) -> float:
    """F1 implied by P and R (same unit as the inputs); NaN if either is missing."""
    if precision is None or recall is None or math.isnan(precision) or math.isnan(recall):
        return math.nan
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _consistency_note(p: float, r: float, f1: float) -> str:
    implied = harmonic_f1(p, r)
    if math.isnan(implied) or abs(implied - f1) <= HARMONIC_TOLERANCE:
        return ""
    return f"F1 is not the harmonic mean of P/R (implied {implied:.2f}): averaged runs or mis-copied"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def paper_table(n: int, include_extra: bool = False) -> pd.DataFrame:
    """The paper's Table ``n`` (1-6) as a DataFrame, with a ``note`` per row.

    Tables 2-5: columns ``system, dataset, precision, recall, f1, note, model, variant, rerun``
    (one row per paper system in the paper's order; ``model``/``variant`` are our tags for
    rerun systems, else None). ``include_extra`` appends our extra baselines (BERT-Softmax,
    BERT-CRF, TENER) with NaN values, except TENER's F1.

    Table 6: same columns, one row per (variant, dataset); ``system`` is the paper's row label,
    ``precision``/``recall`` are NaN (the paper gives F1 only), ``model`` is ``crener``.

    Table 1: columns ``dataset, split, sentences, entities, types, note`` (counts as printed,
    ``1.35k`` -> 1350; NaN where the paper prints "–").
    """
    if n == 1:
        rows = []
        for ds, (splits, types) in _STATS.items():
            for split, (sents, ents) in splits.items():
                rows.append(
                    {
                        "dataset": ds,
                        "split": split,
                        "sentences": math.nan if sents is None else sents,
                        "entities": math.nan if ents is None else ents,
                        "types": types,
                        "note": _STATS_NOTES[ds],
                    }
                )
        return pd.DataFrame(rows)
    if n in TABLE_DATASET:
        ds = TABLE_DATASET[n]
        rows = []
        rerun = rerun_systems()
        for system, (p, r, f1) in _MAIN[ds].items():
            model, variant = rerun.get(system, (None, None))
            rows.append(
                {
                    "system": system,
                    "dataset": ds,
                    "precision": p,
                    "recall": r,
                    "f1": f1,
                    "note": _join(_consistency_note(p, r, f1), _HAND_NOTES.get((n, system), "")),
                    "model": model,
                    "variant": variant,
                    "rerun": system in rerun,
                }
            )
        if include_extra:
            for system, (model, variant) in extra_systems().items():
                f1 = _EXTRA_F1.get(system, {}).get(ds, math.nan)
                rows.append(
                    {
                        "system": system,
                        "dataset": ds,
                        "precision": math.nan,
                        "recall": math.nan,
                        "f1": f1,
                        "note": _EXTRA_NOTES.get(system, _EXTRA_NOTE),
                        "model": model,
                        "variant": variant,
                        "rerun": True,
                    }
                )
        return pd.DataFrame(rows)
    if n == 6:
        rows = []
        for variant, values in _ABLATION.items():
            for ds, f1 in zip(DATASETS, values):
                rows.append(
                    {
                        "system": VARIANT_LABELS[variant],
                        "dataset": ds,
                        "precision": math.nan,
                        "recall": math.nan,
                        "f1": f1,
                        "note": _HAND_NOTES.get((6, variant), ""),
                        "model": "crener",
                        "variant": variant,
                        "rerun": True,
                    }
                )
        return pd.DataFrame(rows)
    raise ValueError(f"the paper has Tables 1-6, not {n}")


def paper_value(n: int, system: str, dataset: str, metric: str = "f1") -> float:
    """One paper number (NaN if the paper has none), e.g. ``paper_value(2, "CRENER", "weibo")``.

    For Table 6 ``system`` may be our variant name or the paper's row label.
    """
    df = paper_table(n, include_extra=True)
    hit = df[((df.system == system) | (df.get("variant") == system)) & (df.dataset == dataset)]
    if hit.empty:
        return math.nan
    return float(hit.iloc[0][metric])


def paper_note(n: int, system: str, dataset: str) -> str:
    """The consistency note of one row ('' if none)."""
    df = paper_table(n, include_extra=True)
    hit = df[((df.system == system) | (df.get("variant") == system)) & (df.dataset == dataset)]
    return "" if hit.empty else str(hit.iloc[0]["note"])
