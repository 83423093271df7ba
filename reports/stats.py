"""Statistics of the report: mean ± std over seeds, paired bootstrap, per-type/per-length F1.

Conventions (documented once, used by every table):

- **Mean ± std** over seeds uses the *sample* standard deviation (ddof = 1). With a single seed
  there is no spread to estimate, so the cell reads ``76.63 ± –``; with none it reads ``—``.
- **Entity counting** is :mod:`crener.metrics` (method.md §5), the scorer of training itself:
  per sentence, gold and predicted entities are sets of (indices, type); correct = |gold ∩ pred|.
  Counts are summed over sentences and F1 = 2c / (p + g) (equal to 2PR/(P+R), and 0 when
  p + g = 0). Per-type and per-length breakdowns are its ``score`` and ``by_length``.
- **Paired bootstrap** (Koehn 2004; Berg-Kirkpatrick et al. 2012) over test sentences: resample
  sentence indices with replacement B times (seeded), recompute each system's F1 from the
  summed counts of the resample, and take Δ = F1(system) − F1(reference). Both systems see the
  same resampled sentences. With several seeds, runs are paired by seed and, for each resample,
  the per-seed Δ are *averaged* (the same indices are used for every seed), so the statistic is
  the mean Δ over seeds, like the tables. The CI is the 2.5/97.5 percentile of the resampled Δ;
  the two-sided p-value is ``min(1, 2 · min(P*(Δ ≤ 0), P*(Δ ≥ 0)))`` under the bootstrap
  distribution, so identical systems give p = 1 and a system better on every resample p = 0
  (read "p < 1/B").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from crener import metrics
from crener.data.schema import Entity

MISSING = "—"  # a cell without any run
NO_STD = "–"  # the std of a single seed


# --- mean ± std ---------------------------------------------------------------------------


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof = 1, n); NaNs are dropped; std is NaN for n < 2."""
    arr = np.asarray([v for v in values if v is not None and not _isnan(v)], dtype=float)
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    std = float(arr.std(ddof=1)) if n > 1 else math.nan
    return float(arr.mean()), std, n


def format_mean_std(values: Iterable[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"76.63 ± 0.41"``; ``"76.63 ± –"`` for one value; ``"—"`` for none. Values × ``scale``."""
    mean, std, n = mean_std(values)
    if n == 0:
        return MISSING
    spread = NO_STD if n == 1 else f"{std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {spread}"


def format_number(value: float | None, digits: int = 2, signed: bool = False) -> str:
    """A number or ``—`` for NaN/None."""
    if value is None or _isnan(value):
        return MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_p(p: float, resamples: int) -> str:
    """p-value text; 0 from the bootstrap is shown as ``< 1/B``."""
    if _isnan(p):
        return MISSING
    if p == 0:
        return f"< {1 / resamples:.3g}"
    return f"{p:.3f}"


def _isnan(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# --- entity counts from predictions -------------------------------------------------------


def _entities(items: Sequence[Sequence[Any]]) -> set[Entity]:
    """Entities of one side of a ``predictions/test.jsonl`` record (``[[indices], type], ...``)."""
    return {Entity(tuple(int(i) for i in indices), str(typ)) for indices, typ in items}


def _gold_and_pred(predictions: Sequence[dict[str, Any]]) -> tuple[list[set[Entity]], list[set[Entity]]]:
    records = sorted(predictions, key=lambda r: r["index"])
    return [_entities(r["gold"]) for r in records], [_entities(r["pred"]) for r in records]


def sentence_counts(predictions: Sequence[dict[str, Any]]) -> np.ndarray:
    """(n_sentences, 3) int array of (correct, predicted, gold) per sentence, in ``index`` order."""
    rows = [(c.correct, c.predicted, c.gold) for c in metrics.sentence_counts(*_gold_and_pred(predictions))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """F1 = 2c / (p + g) over the last axis of summed (c, p, g) counts; 0 where p + g = 0.

    :attr:`crener.metrics.Counts.f1` vectorised over bootstrap resamples."""
    counts = np.asarray(counts, dtype=float)
    c, p, g = counts[..., 0], counts[..., 1], counts[..., 2]
    denom = p + g
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * c / np.where(denom > 0, denom, 1), 0.0)


# --- paired bootstrap ---------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """Δ = F1(system) − F1(reference) (fractions), its 95 % percentile CI and two-sided p."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    resamples: int
    seeds: int
    sentences: int


def bootstrap_deltas(
    system: Sequence[np.ndarray], reference: Sequence[np.ndarray], indices: np.ndarray
) -> np.ndarray:
    """Δ for each row of ``indices`` (shape (B, n)): mean over seeds of F1(sys) − F1(ref).

    ``system`` and ``reference`` are per-seed (n, 3) count arrays, paired by position.
    Pure function of its inputs, so a test can pass every possible resample (enumeration).
    """
    if len(system) != len(reference) or not system:
        raise ValueError("need the same positive number of seeds for both systems")
    indices = np.asarray(indices)
    n = system[0].shape[0]
    # Resample counts = multiplicity matrix (B, n) @ per-sentence counts (n, 3): one BLAS call
    # per seed instead of a (B, n, 3) gather.
    rows = indices.shape[0]
    flat = (indices + np.arange(rows)[:, None] * n).ravel()
    weights = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)
    total = np.zeros(rows)
    for a, b in zip(system, reference):
        if a.shape != b.shape or a.shape[0] != n:
            raise ValueError(f"systems were scored on different test sets: {a.shape} vs {b.shape}")
        total += f1_from_counts(weights @ a) - f1_from_counts(weights @ b)
    return total / len(system)


def summarize_deltas(deltas: np.ndarray) -> tuple[float, float, float]:
    """(ci_low, ci_high, p) of a bootstrap distribution (see the module docstring)."""
    deltas = np.asarray(deltas, dtype=float)
    low, high = np.percentile(deltas, [2.5, 97.5])
    p = min(1.0, 2.0 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    return float(low), float(high), p


def paired_bootstrap(
    system: Sequence[np.ndarray] | np.ndarray,
    reference: Sequence[np.ndarray] | np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap test of Δ = F1(system) − F1(reference) over test sentences.

    ``system`` / ``reference``: one (n, 3) count array (one seed) or a list of them, paired by
    position (same seed at the same position). Sentence indices are drawn with
    ``numpy.random.default_rng(seed)``, so results are reproducible.
    """
    sys_list = [system] if isinstance(system, np.ndarray) else list(system)
    ref_list = [reference] if isinstance(reference, np.ndarray) else list(reference)
    if not sys_list or len(sys_list) != len(ref_list):
        raise ValueError("need the same positive number of seeds for both systems")
    n = sys_list[0].shape[0]
    if n == 0:
        raise ValueError("no test sentences")
    observed = float(
        np.mean(
            [
                f1_from_counts(a.sum(axis=0)) - f1_from_counts(b.sum(axis=0))
                for a, b in zip(sys_list, ref_list)
            ]
        )
    )
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, min(resamples, 2_000_000 // max(n, 1)))  # bound memory of the index matrix
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        deltas[start:stop] = bootstrap_deltas(sys_list, ref_list, idx)
    low, high, p = summarize_deltas(deltas)
    return BootstrapResult(observed, low, high, p, resamples, len(sys_list), n)


# --- breakdowns ---------------------------------------------------------------------------


def breakdown(predictions: Sequence[dict[str, Any]], by: str) -> pd.DataFrame:
    """Counts and P/R/F1 per entity type (``by="type"``) or length bucket (``by="length"``,
    :data:`crener.metrics.LENGTH_BUCKETS`): :func:`crener.metrics.score` and
    :func:`crener.metrics.by_length` of the run's test predictions.

    Columns: ``group, correct, predicted, gold, precision, recall, f1``; groups with no entity on
    either side are left out. A predicted entity is grouped by its own type/length, a gold one
    by its own; correct ones agree on both.
    """
    if by not in ("type", "length"):
        raise ValueError("by must be 'type' or 'length'")
    gold, pred = _gold_and_pred(predictions)
    groups = metrics.score(gold, pred).per_type if by == "type" else metrics.by_length(gold, pred)
    return pd.DataFrame(
        [
            {"group": key, **counts.to_dict()}
            for key, counts in groups.items()
            if counts.predicted or counts.gold
        ],
        columns=["group", "correct", "predicted", "gold", "precision", "recall", "f1"],
    )


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with < 3 pairs or no variance."""
    pairs = [(a, b) for a, b in zip(x, y) if not (_isnan(a) or _isnan(b))]
    if len(pairs) < 3:
        return math.nan
    rx = pd.Series([a for a, _ in pairs]).rank().to_numpy()
    ry = pd.Series([b for _, b in pairs]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])
