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
- **Tests over seeds** (:func:`welch_test`, :func:`permutation_test`) treat each run's test F1 as
  one draw of a system's training randomness: Welch's t-test (unequal variances,
  Welch-Satterthwaite degrees of freedom) with its CI of the difference of means, and the exact
  two-sided permutation test of the same difference over every split of the pooled runs. Runs of
  two systems are not paired by seed: one seed number draws unrelated weights in two models.
  The Student t distribution is computed here (regularised incomplete beta function, Numerical
  Recipes' continued fraction) because scipy is not a dependency.
"""

from __future__ import annotations

import itertools
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


# --- tests over seeds ---------------------------------------------------------------------

# The most splits permutation_test enumerates (5 + 5 runs make 252; 10 + 10 make 184,756).
MAX_PERMUTATIONS = 1_000_000


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):  # it takes about √max(a, b) terms: many degrees of freedom, many terms
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast only below the mean; above it, use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _continued_fraction(a, b, x) / a
    return 1.0 - front * _continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_sf)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile {q} is not strictly between 0 and 1")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_sf(high, df) > 1.0 - q:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_sf(mid, df) > 1.0 - q else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class WelchResult:
    """Welch's t-test of Δ = mean(system) − mean(reference), in the values' own unit."""

    delta: float
    se: float
    df: float
    t: float
    ci_low: float
    ci_high: float
    p_value: float
    level: float


def welch_test(system: Sequence[float], reference: Sequence[float], level: float = 0.95) -> WelchResult:
    """Welch's unequal-variance t-test and its ``level`` CI of the difference of means.

    Needs two values a side (one gives no spread). Two sides without any spread give the
    difference itself as the CI, with p = 1 when it is 0 and p = 0 otherwise."""
    a, b = np.asarray(system, dtype=float), np.asarray(reference, dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Welch's t-test needs two values a side, got {a.size} and {b.size}")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    delta, se = float(a.mean() - b.mean()), math.sqrt(va + vb)
    if se == 0.0:  # every run of each side scored alike: the difference is known exactly
        t = math.copysign(math.inf, delta) if delta else 0.0
        return WelchResult(
            delta, 0.0, float(a.size + b.size - 2), t, delta, delta, 0.0 if delta else 1.0, level
        )
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    t = delta / se
    half = t_ppf(0.5 + level / 2.0, df) * se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    return WelchResult(delta, se, float(df), t, delta - half, delta + half, p, level)


def permutation_test(system: Sequence[float], reference: Sequence[float]) -> tuple[float, int]:
    """Exact two-sided permutation test of the difference of means: ``(p, splits)``, p the share
    of the splits of the pooled values into groups of the two sizes whose |Δ| reaches the
    observed one (the observed split included, so p >= 2 / splits for distinct values)."""
    a, b = np.asarray(system, dtype=float), np.asarray(reference, dtype=float)
    if a.size < 1 or b.size < 1:
        raise ValueError("a permutation test needs a value on each side")
    pooled, n, k = np.concatenate([a, b]), a.size + b.size, a.size
    splits = math.comb(n, k)
    if splits > MAX_PERMUTATIONS:
        raise ValueError(f"{splits} splits of {n} values: too many to enumerate (at most {MAX_PERMUTATIONS})")
    total = float(pooled.sum())
    chosen = np.array(list(itertools.combinations(range(n), k)))
    sums = pooled[chosen].sum(axis=1)
    deltas = np.abs(sums / k - (total - sums) / (n - k))
    observed = abs(float(a.mean() - b.mean()))
    # Equal splits may differ in the last bits of a float sum: count them as reaching it.
    reached = deltas >= observed - 1e-9 * max(1.0, observed)
    return float(np.mean(reached)), splits


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
