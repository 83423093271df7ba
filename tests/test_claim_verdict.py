"""The Weibo claim (issue 35): its sweep (experiments/configs/claim.toml) and the tests over
seeds of reports.stats."""

from __future__ import annotations

import math
import statistics

import pytest

from crener.cli import main as cli_main
from crener.identity import run_key
from experiments.sweeps import SWEEP_NAMES, expand, load_sweep, plan, sweeps_for
from reports import stats

T975_DF2 = math.sqrt(2 * 4 * 0.475**2 / (1 - 4 * 0.475**2))  # df = 2: t / (2 √(2 + t²)) = 0.475
T975_DF8 = 2.306004  # Student t tables


# --- the sweep ----------------------------------------------------------------------------


def test_the_claim_sweep_loads_and_is_opt_in() -> None:
    sw = load_sweep("claim")
    assert (sw.models, sw.variants, sw.datasets) == (("crener", "w2ner"), ("full",), ("weibo",))
    assert sw.default_profile == "full" and sw.seeds_for("full") == (0, 1, 2, 3, 4)
    assert sw.seeds_for("smoke") == (0, 1) and sw.seeds_for("quick") == (0, 1, 2)
    # `crener reproduce` without --only claim plans the table sweeps only.
    assert sweeps_for(None) == sweeps_for(["table2"]) == SWEEP_NAMES
    assert sweeps_for(["claim"]) == (*SWEEP_NAMES, "claim")


def test_the_claim_sweep_plans_ten_cells_at_full_keyed_as_the_main_sweeps() -> None:
    cells = plan(sweeps_for(["claim"]), "full", only=["claim"])
    assert len(cells) == 10 and {c.sweep for c in cells} == {"claim"}
    assert sorted((c.cfg.model.name, c.cfg.train.seed) for c in cells) == sorted(
        (m, s) for m in ("crener", "w2ner") for s in range(5)
    )
    assert {(c.cfg.variant, c.cfg.data.dataset, c.cfg.model.encoder) for c in cells} == {
        ("full", "weibo", "crener-char")
    }
    main = {run_key(cfg) for cfg in expand("main", "full", datasets=["weibo"], models=["crener", "w2ner"])}
    assert {run_key(c.cfg) for c in cells} == main  # finished main-sweep cells are found, not retrained
    # Planned beside Table 2, every claim cell is a main-sweep cell already: none is added.
    both = plan(sweeps_for(["claim", "table2"]), "full", only=["claim", "table2"])
    assert len(both) == 25 and {c.sweep for c in both} == {"main"}


def test_reproduce_only_claim_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["reproduce", "--profile", "full", "--only", "claim", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all(line.split()[:2] == ["claim", "full"] for line in lines)


# --- tests over seeds ---------------------------------------------------------------------


def test_incomplete_beta_and_student_t_against_closed_forms() -> None:
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert stats.regularized_beta(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert stats.regularized_beta(3, 1, x) == pytest.approx(x**3, abs=1e-12)
        assert stats.regularized_beta(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-12)
    for t in (-7.0, -1.0, 0.0, 0.3, 2.0, 40.0):
        assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert stats.t_ppf(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert stats.t_ppf(0.975, 2) == pytest.approx(T975_DF2, rel=1e-9)
    assert stats.t_ppf(0.025, 2) == pytest.approx(-T975_DF2, rel=1e-9)
    assert stats.t_ppf(0.975, 8) == pytest.approx(T975_DF8, abs=1e-6)
    assert stats.t_ppf(0.975, 4.5) == pytest.approx(2.650, abs=0.05)  # between df 4 (2.776) and 5 (2.571)
    # Large df: z + (z³ + z) / 4ν (Cornish-Fisher), z = 1.959964 the normal's quantile.
    assert stats.t_ppf(0.975, 1e4) == pytest.approx(1.960201, abs=2e-6)
    with pytest.raises(ValueError):
        stats.t_ppf(1.0, 3)


def test_welch_against_a_hand_computed_case() -> None:
    # Reference without spread: df = n - 1 = 2, se = √(4/3), t = 1 / se; Student t with 2 df has a
    # closed form, so p = 1 − t / √(2 + t²) and the CI is 1 ± t(0.975, 2)·se.
    r = stats.welch_test([0.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    se = math.sqrt(4 / 3)
    assert (r.delta, r.se, r.df, r.t) == pytest.approx((1.0, se, 2.0, 1 / se))
    assert r.p_value == pytest.approx(1 - (1 / se) / math.sqrt(2 + 1 / se**2))
    assert (r.ci_low, r.ci_high) == pytest.approx((1 - T975_DF2 * se, 1 + T975_DF2 * se))


def test_welch_on_five_seeds_each() -> None:
    a, b = [97.5, 95.0, 97.5, 95.0, 92.5], [92.5, 90.0, 92.5, 90.0, 87.5]  # gap 5, s² = 4.375 each
    r = stats.welch_test(a, b)
    se = math.sqrt(statistics.variance(a) / 5 + statistics.variance(b) / 5)
    assert (r.delta, r.se, r.df) == pytest.approx((5.0, se, 8.0))  # equal variances and sizes: 2(n − 1)
    assert (r.ci_low, r.ci_high) == pytest.approx((5 - T975_DF8 * se, 5 + T975_DF8 * se), abs=1e-5)
    assert r.p_value == pytest.approx(2 * stats.t_sf(5 / se, 8)) and r.p_value < 0.01


def test_welch_edge_cases() -> None:
    same = stats.welch_test([0.7, 0.7], [0.7, 0.7])
    assert (same.delta, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    apart = stats.welch_test([0.8, 0.8], [0.7, 0.7])
    assert apart.ci_low == apart.ci_high == pytest.approx(0.1) and apart.p_value == 0.0
    with pytest.raises(ValueError, match="two values a side"):
        stats.welch_test([0.8], [0.7, 0.6])


def test_exact_permutation_test() -> None:
    # 20 splits of 6 values into 3 + 3: only the observed one and its mirror reach |Δ| = 3.
    assert stats.permutation_test([1, 2, 3], [4, 5, 6]) == (pytest.approx(0.1), 20)
    # 10 splits into 2 + 3: {1, 2} (the observed, |1.5 − 4|) and {4, 5} (|4.5 − 2|) reach 2.5.
    assert stats.permutation_test([1, 2], [3, 4, 5]) == (pytest.approx(0.2), 10)
    assert stats.permutation_test([0.5] * 5, [0.5] * 5) == (1.0, 252)
