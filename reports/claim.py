"""One of the paper's claims tested: CRENER full beats W²NER on a dataset by the margin of its
Tables 2-5 (Weibo: Table 2), as a stamped, committed page.

``crener report --claim weibo --profile full --page reports/claim-weibo.md`` reads the finished
runs of both systems on the dataset (the table sweeps' and the claim sweep's,
``experiments/configs/claim.toml``) and writes their per-seed test F1, two tests of the gap and
the verdict on the paper's number in plain words, with every MLflow run id:

(a) the paired bootstrap over test sentences of :func:`reports.stats.paired_bootstrap`, runs
    paired by seed as in the report's bootstrap table (:func:`reports.tables.pair_by_seed`): how
    much the gap depends on which sentences were tested, the trained models held fixed;
(b) tests over seeds (:func:`reports.stats.welch_test`, :func:`reports.stats.permutation_test`):
    how much it depends on training randomness, the test sentences held fixed.

The paper's gap compares one reported F1 a system on one test set, so it carries both kinds of
noise: the verdict reads it against both intervals. Fewer than two runs of a system
leave the claim untested: one run says nothing of the spread retraining alone causes.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from crener.errors import CrenerError
from crener.files import write_atomic
from crener.workspace import tracking_uri as resolve_tracking_uri
from reports import collect, paper, stats, tables

log = logging.getLogger(__name__)

SYSTEM = ("crener", "full")
REFERENCE = ("w2ner", "full")
CLAIM_SWEEP = "claim"  # experiments/configs/claim.toml
MIN_SEEDS = 2  # runs a system needs before the spread over seeds can be measured
LEVEL = 0.95


@dataclass(frozen=True)
class Claim:
    """The paper's claim on one dataset: its F1 of both systems (points, as printed)."""

    dataset: str
    table: int
    system: str  # the paper's label, e.g. "CRENER"
    reference: str  # e.g. "W²NER"
    system_f1: float
    reference_f1: float

    @property
    def delta(self) -> float:
        return self.system_f1 - self.reference_f1


def paper_claim(dataset: str) -> Claim:
    """The claim of the paper's table on ``dataset`` (its numbers from :mod:`reports.paper`)."""
    tables_of = {ds: n for n, ds in paper.TABLE_DATASET.items()}
    if dataset not in tables_of:
        raise CrenerError(
            f"--claim {dataset}: the paper compares CRENER and W²NER on {', '.join(tables_of)} only"
        )
    labels = {pair: label for label, pair in paper.rerun_systems().items()}
    if SYSTEM not in labels or REFERENCE not in labels:
        raise CrenerError("--claim needs the crener and w2ner model families registered (pip install -e .)")
    n = tables_of[dataset]
    sys_label, ref_label = labels[SYSTEM], labels[REFERENCE]
    return Claim(
        dataset,
        n,
        sys_label,
        ref_label,
        paper.paper_value(n, sys_label, dataset),
        paper.paper_value(n, ref_label, dataset),
    )


@dataclass
class ClaimResult:
    """Our runs of both systems and the tests of their gap (F1 in points; a test not run is None)."""

    claim: Claim
    profile: str
    system: tables.Cell
    reference: tables.Cell
    pairing: tables.Pairing
    bootstrap: stats.BootstrapResult | None  # fractions, as reports.stats computes them
    welch: stats.WelchResult | None
    permutation: tuple[float, int] | None  # (p, splits)
    untested: str  # why the claim stays untested; "" when the test over seeds ran

    def f1(self, cell: tables.Cell) -> list[float]:
        """Test F1 (points) of each run of ``cell``, in seed order (runs without it left out)."""
        return [v * 100 for v in cell.values("f1") if not math.isnan(v)]


def evaluate_claim(
    index: tables.RunIndex,
    counts: Callable[[str], np.ndarray | None],
    claim: Claim,
    profile: str,
    resamples: int = 1000,
    seed: int = 0,
) -> ClaimResult:
    """Both tests of ``claim`` on the runs of ``index``; ``counts`` is :func:`reports.tables.run_counts`."""
    sys_cell = index.cell(*SYSTEM, claim.dataset)
    ref_cell = index.cell(*REFERENCE, claim.dataset)
    pairing = tables.pair_by_seed(sys_cell, ref_cell, counts)
    boot = None
    if pairing.seeds:
        boot = stats.paired_bootstrap(
            pairing.system_counts, pairing.reference_counts, resamples=resamples, seed=seed
        )
    result = ClaimResult(claim, profile, sys_cell, ref_cell, pairing, boot, None, None, "")
    a, b = result.f1(sys_cell), result.f1(ref_cell)
    short = [(name, len(v)) for name, v in ((claim.system, a), (claim.reference, b)) if len(v) < MIN_SEEDS]
    if short:
        from experiments.sweeps import load_sweep

        have = " and ".join(f"{name} {n} finished run{'s' * (n != 1)}" for name, n in short)
        how = (
            "--only claim"
            if claim.dataset in load_sweep(CLAIM_SWEEP).datasets
            else f"--only table{claim.table} --models crener w2ner --seeds ..."
        )
        result.untested = (
            f"{have} on {paper.DATASET_LABELS[claim.dataset]} at profile `{profile}`: a test over seeds "
            f"needs at least {MIN_SEEDS} runs a system, for one run says nothing of how far retraining "
            "alone moves test F1, and a gap between single runs may be no more than that spread. "
            f"`crener reproduce --profile {profile} {how}` runs more seeds."
        )
    else:
        result.welch = stats.welch_test(a, b, level=LEVEL)
        result.permutation = stats.permutation_test(a, b)
    return result


# --- verdict ------------------------------------------------------------------------------


def place(low: float, high: float, value: float) -> str:
    """Where ``value`` lies against the interval [low, high]: "inside", "above" or "below" it."""
    if value > high:
        return "above"
    return "below" if value < low else "inside"


def intervals(result: ClaimResult) -> list[tuple[str, float, float]]:
    """(test, low, high) of the tests that ran, in points."""
    out = []
    if result.bootstrap is not None:
        out.append(("the paired bootstrap over test sentences", result.bootstrap.ci_low * 100,
                    result.bootstrap.ci_high * 100))  # fmt: skip
    if result.welch is not None:
        out.append(("Welch's t over seeds", result.welch.ci_low, result.welch.ci_high))
    return out


def _cis_of(names: Sequence[str]) -> str:
    return ("the 95 % CI of " if len(names) == 1 else "the 95 % CIs of ") + " and of ".join(names)


def _each(where: dict[str, str]) -> str:
    return "; ".join(f"{w} the CI of {name}" for name, w in where.items())


def verdict(claim: Claim, cis: Sequence[tuple[str, float, float]]) -> list[str]:
    """The verdict on the paper's gap and on the sign of ours, in plain words, from 95 % CIs
    ``(test, low, high)`` of our gap (points)."""
    if not cis:
        return ["No test ran: one of the systems has no finished run with a test F1 and predictions."]
    gap, names = f"{claim.delta:+.2f} F1", [name for name, _, _ in cis]
    where = {name: place(low, high, claim.delta) for name, low, high in cis}
    size = {
        "inside": f"**Consistent with the paper**: its {gap} lies inside {_cis_of(names)}.",
        "above": f"**Not reproduced**: the paper's {gap} lies above {_cis_of(names)}: our gap is smaller.",
        "below": f"**Larger than the paper's**: its {gap} lies below {_cis_of(names)}: our gap is larger.",
    }
    kinds = set(where.values())
    lines = [size[kinds.pop()] if len(kinds) == 1 else f"**Mixed**: the paper's {gap} lies {_each(where)}."]
    zero = {name: place(low, high, 0.0) for name, low, high in cis}
    sign = {
        "below": f"{claim.system} beats {claim.reference} here: 0 lies below {_cis_of(names)}.",
        "above": f"{claim.reference} beats {claim.system} here: 0 lies above {_cis_of(names)}.",
        "inside": f"No difference between {claim.system} and {claim.reference} is detected: 0 lies "
        f"inside {_cis_of(names)}.",
    }
    kinds = set(zero.values())
    lines.append(
        sign[kinds.pop()] if len(kinds) == 1 else f"The tests disagree on the sign: 0 lies {_each(zero)}."
    )
    return lines


# --- page ---------------------------------------------------------------------------------


def time_note(cells: Sequence[tables.Cell]) -> str | None:
    """How long the page's runs took: their own minutes summed (``seconds``: each run after its
    start-up, evaluations and test included) and the span from the first one's start to the last
    one's end, which is the sweep's wall time when one call ran them back to back (it leaves out
    what the call did before its first run, e.g. ``--time-budget``'s probes). None without runs."""
    frames = [c.runs for c in cells if not c.runs.empty]
    if not frames:
        return None
    runs = pd.concat(frames, ignore_index=True)
    # collect_runs gives every run these columns (NaN where a run lacks one: no end while open).
    seconds = pd.to_numeric(runs["seconds"], errors="coerce").dropna()
    parts = []
    if len(seconds):
        timed = f" ({len(seconds)} of them timed)" if len(seconds) < len(runs) else ""
        parts.append(f"{seconds.sum() / 60:.1f} min summed over the {len(runs)} runs{timed} (each run's "
                     "`seconds`: after its start-up, with its evaluations and test)")  # fmt: skip
    starts, ends = (pd.to_numeric(runs[c], errors="coerce") / 1000 for c in ("start_time", "end_time"))
    if starts.notna().all() and ends.notna().all():
        first, last = (
            datetime.datetime.fromtimestamp(t, tz=datetime.UTC) for t in (starts.min(), ends.max())
        )
        parts.append(f"first start {first:%Y-%m-%d %H:%M} UTC to last end {last:%Y-%m-%d %H:%M} UTC: "
                     f"{(last - first).total_seconds() / 60:.1f} min (the sweep's wall time if one call ran them "
                     "back to back, less what it did before its first run)")  # fmt: skip
    return f"Time: {'; '.join(parts)}." if parts else None


def _ci(low: float, high: float) -> str:
    return f"[{low:+.2f}, {high:+.2f}]"


def _verdict_section(result: ClaimResult) -> list[str]:
    claim = result.claim
    lines = ["## Verdict", ""]
    if result.untested:
        lines += [f"**Untested**: {result.untested}", ""]
        if result.bootstrap is not None:
            lines += ["What the bootstrap of these runs alone shows (not a test of the claim):", ""]
    a, b = result.f1(result.system), result.f1(result.reference)
    if a and b:
        cis = "; ".join(f"{name} {_ci(low, high)}" for name, low, high in intervals(result))
        ours = stats.mean_std(a)[0] - stats.mean_std(b)[0]
        lines.append(
            f"- Our gap (difference of mean test F1): {ours:+.2f}; the paper's: {claim.delta:+.2f}"
            + (f"; 95 % CIs of ours: {cis}." if cis else ".")
        )
    # Untested, the words stay unbolded: what single runs show must not read as the verdict.
    lines += [
        f"- {line.replace('**', '') if result.untested else line}"
        for line in verdict(claim, intervals(result))
    ]
    if len(a) >= MIN_SEEDS and len(b) >= MIN_SEEDS:
        spread = math.sqrt(stats.mean_std(a)[1] ** 2 + stats.mean_std(b)[1] ** 2)
        lines.append(
            f"- The paper's gap compares one reported number a system: if its runs varied with the seed as "
            f"ours do, a gap between single runs would itself vary by about ±{spread:.2f} F1 "
            "(one standard deviation, √(s₁² + s₂²) of our per-seed spreads), so a paper value just outside "
            "a CI is weak evidence against it."
        )
    return [*lines, ""]


def _runs_section(result: ClaimResult) -> list[str]:
    claim = result.claim
    label = paper.DATASET_LABELS[claim.dataset]
    rows = []
    for name, cell, theirs in ((claim.system, result.system, claim.system_f1),
                               (claim.reference, result.reference, claim.reference_f1)):  # fmt: skip
        per_seed = ", ".join(f"s{s}: {v * 100:.2f}" for s, v in zip(cell.seeds, cell.values("f1")))
        rows.append([name, str(len(cell.runs)), per_seed or "—", stats.format_mean_std(cell.values("f1")),
                     f"{theirs:.2f}"])  # fmt: skip
    a, b = result.f1(result.system), result.f1(result.reference)
    ours = stats.mean_std(a)[0] - stats.mean_std(b)[0] if a and b else math.nan
    table = tabulate(rows, headers=["System", "runs", "test F1 per seed", "mean ± std", "paper"],
                     tablefmt="github", disable_numparse=True)  # fmt: skip
    return [
        f"## {label} test F1 (×100), profile `{result.profile}`",
        "",
        table,
        "",
        f"Difference of means: **{stats.format_number(ours, signed=True)}** "
        f"(paper: {claim.system_f1:.2f} − {claim.reference_f1:.2f} = {claim.delta:+.2f}). "
        "Mean ± sample std over seeds (ddof = 1).",
        "",
    ]


def _bootstrap_section(result: ClaimResult, resamples: int, seed: int) -> list[str]:
    lines = ["## (a) Paired bootstrap over test sentences", ""]
    boot, pairing = result.bootstrap, result.pairing
    if boot is None:
        lines += ["Not run: no seed has finished runs with test predictions on both sides.", ""]
    else:
        lines += [
            f"- Δ F1 = {boot.delta * 100:+.2f}, 95 % CI {_ci(boot.ci_low * 100, boot.ci_high * 100)}, "
            f"two-sided p {stats.format_p(boot.p_value, resamples)}",
            f"- {boot.seeds} seed pair{'s' * (boot.seeds != 1)} ({', '.join(map(str, pairing.seeds))}), "
            f"{boot.sentences} test sentences, B = {resamples} resamples (seed {seed})",
            "",
        ]
    claim = result.claim
    lines += [
        "Each resample draws test sentences with replacement, one draw for every run of both systems, and "
        f"takes the mean over seeds of F1({claim.system}) − F1({claim.reference}) recomputed from the drawn "
        "sentences' entity counts; the CI is its 2.5/97.5 percentiles, p = 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)). Runs are paired by "
        "seed rather than pooled: the mean of per-run F1 is the number the tables report and the seed test "
        "compares, while pooling the seeds' counts into one F1 a system would weigh each run by the entities "
        "it predicts. One seed number starts two different models, so pairing by it does not pair like with "
        "like; it only uses every run once. This test holds the trained models fixed: it measures the test "
        "set's sampling, not training randomness, which (b) measures.",
        "",
    ]
    why = []
    if pairing.unpaired:
        why.append(f"seeds run by one system only, left out: {', '.join(map(str, pairing.unpaired))}")
    if pairing.no_predictions:
        why.append(f"runs without test predictions, left out: {', '.join(pairing.no_predictions)}")
    return lines + [f"- {w}" for w in why] + ([""] if why else [])


def _seeds_section(result: ClaimResult) -> list[str]:
    lines = ["## (b) Test over seeds", ""]
    welch = result.welch
    if welch is None:
        return [*lines, "Not run (see the verdict).", ""]
    p_perm, splits = result.permutation or (math.nan, 0)
    a, b = result.f1(result.system), result.f1(result.reference)
    # Groups of equal size: a split and its mirror reach the same |Δ|, so p cannot go below 2/splits.
    floor = (2 if len(a) == len(b) else 1) / splits
    lines += [
        f"- Welch's t-test: Δ = {welch.delta:+.2f}, SE {welch.se:.2f}, t = {welch.t:.2f}, "
        f"df = {welch.df:.1f}, 95 % CI {_ci(welch.ci_low, welch.ci_high)}, two-sided p {welch.p_value:.3g}",
        f"- Exact permutation test of the difference of means: two-sided p {p_perm:.3g} "
        f"(all {splits} splits of the {len(a) + len(b)} runs into groups of {len(a)} and {len(b)}; the "
        f"smallest p it can give is {floor:.3g})",
        "",
        "Each run's test F1 is one draw of its system's training randomness. Welch's test does not assume "
        "the two systems vary alike; its CI is Δ ± t(0.975, df)·SE. With a handful of seeds, normality "
        "cannot be checked, so the permutation test, which assumes only that the runs are exchangeable "
        "under no difference, gives a second p. Runs are not paired by seed here (unlike (a)): one seed "
        "number starts two different models, so nothing ties their runs together.",
        "",
    ]
    return lines


def _run_ids_section(result: ClaimResult) -> list[str]:
    lines = ["## Runs", ""]
    for name, cell in ((result.claim.system, result.system), (result.claim.reference, result.reference)):
        ids = [f"s{s} `{rid}`" for s, rid in zip(cell.seeds, cell.run_ids)]
        lines.append(f"- {name}: {', '.join(ids) or 'no finished run'}")
        if cell.missing_seeds:
            lines.append(f"  - missing seeds of the claim sweep: {', '.join(map(str, cell.missing_seeds))}")
    return [*lines, ""]


def claim_page(result: ClaimResult, stamp: str, header: list[str], resamples: int, seed: int) -> str:
    """The page: title, stamp, verdict, runs, both tests and every run id."""
    claim = result.claim
    lines = [
        f"# Claim: {claim.system} beats {claim.reference} on {paper.DATASET_LABELS[claim.dataset]} "
        f"by {claim.delta:+.2f} F1 (paper Table {claim.table}), profile `{result.profile}`",
        "",
        stamp,
        "",
        *[f"- {h}" for h in header],
        "",
    ]
    lines += _verdict_section(result)
    lines += _runs_section(result)
    lines += _bootstrap_section(result, resamples, seed)
    lines += _seeds_section(result)
    lines += _run_ids_section(result)
    return "\n".join(lines).rstrip("\n") + "\n"


def claim_runs(runs: pd.DataFrame, dataset: str, sweeps: Sequence[str]) -> pd.DataFrame:
    """The runs of both systems on ``dataset`` from ``sweeps`` (any state)."""
    if runs.empty:
        return runs
    # isin, not ==: a run without a tag holds None or NA, which == would not answer with a bool.
    system = runs["model"].astype(str) + "/" + runs["variant"].astype(str)
    keep = (
        system.isin([f"{m}/{v}" for m, v in (SYSTEM, REFERENCE)])
        & runs["dataset"].isin([dataset])
        & runs["sweep"].isin(list(sweeps))
    )
    return runs[keep].reset_index(drop=True)


def write_claim_page(
    dataset: str,
    profile: str,
    page: str | Path,
    *,
    tracking_uri: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
    sweeps: Sequence[str] = tables.TABLE_SWEEPS,
    command: str = "",
) -> Path:
    """Test the paper's claim on ``dataset`` with the finished runs of ``profile`` from ``sweeps``
    and the claim sweep, and write the page to ``page``; nothing is trained."""
    from reports.make_report import page_stamp, planned_seeds  # (loads matplotlib)

    claim = paper_claim(dataset)
    uri = resolve_tracking_uri(tracking_uri)
    sources = tuple(dict.fromkeys((*sweeps, CLAIM_SWEEP)))
    runs = claim_runs(collect.collect_runs(uri, profile=profile, finished_only=False), dataset, sources)
    finished = runs[runs["state"] == "finished"].reset_index(drop=True)
    # Expected seeds: the claim sweep's plan (a dataset it does not plan: the seeds seen).
    index = tables.RunIndex(finished, sweeps=sources, planned=planned_seeds(profile, (CLAIM_SWEEP,)))
    counts = tables.run_counts(lambda run_id: collect.load_predictions(run_id, uri))
    result = evaluate_claim(index, counts, claim, profile, resamples=resamples, seed=seed)
    command = command or f"crener report --claim {dataset} --profile {profile} --page {page}"
    stamp = page_stamp(command, uri, runs, index.runs, profile)
    header = [
        *index.header(profile),
        f"runs of sweeps {', '.join(sources)}; the latest run of a seed is used",
        *tables.training_notes(
            {claim.system: (result.system, SYSTEM[0]), claim.reference: (result.reference, REFERENCE[0])}
        ),
    ]
    timing = time_note([result.system, result.reference])
    if timing:
        header.append(timing)
    if index.superseded:
        header.append(f"superseded (an earlier run of the same seed): {', '.join(index.superseded)}")
    Path(page).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(page), claim_page(result, stamp, header, resamples, seed))
    log.info("claim page %s: %s", page, " ".join(verdict(claim, intervals(result))))
    return Path(page)
