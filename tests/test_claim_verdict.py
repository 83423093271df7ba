"""The Weibo claim (issue 35): its sweep (experiments/configs/claim.toml), the tests over seeds of
reports.stats, and the verdict page of reports/claim.py on synthetic runs with known answers."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crener.cli import main as cli_main
from crener.errors import CrenerError
from crener.identity import run_key
from experiments.sweeps import SWEEP_NAMES, expand, load_sweep, plan, sweeps_for
from reports import claim as claim_mod
from reports import stats, tables

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
        ("full", "weibo", "crener-char-18k")
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


# --- the claim on synthetic per-sentence counts -------------------------------------------

N_SENT = 20
GOLD = [[[0, 1], "PER.NAM"], [[3, 4], "LOC.NAM"]]
MISS = [[3], "LOC.NAM"]


def sentence_counts(wrong: set[int]) -> np.ndarray:
    """(correct, predicted, gold) per sentence: two gold entities, one of them missed where wrong."""
    return np.array([[1 if i in wrong else 2, 2, 2] for i in range(N_SENT)])


def in_memory(runs: dict[tuple[str, int], set[int]]) -> tuple[tables.RunIndex, dict[str, np.ndarray]]:
    """A RunIndex and per-run counts from ``(model, seed) -> sentences it gets wrong``."""
    rows, counts = [], {}
    for i, ((model, seed), wrong) in enumerate(runs.items()):
        run_id = f"{model}-s{seed}"
        counts[run_id] = sentence_counts(wrong)
        f1 = float(stats.f1_from_counts(counts[run_id].sum(axis=0)))
        rows.append(
            {"run_id": run_id, "sweep": "claim", "model": model, "variant": "full", "dataset": "weibo",
             "seed": seed, "start_time": i, "best/test_f1": f1}
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return tables.RunIndex(frame, sweeps=None), counts


def test_identical_systems_show_no_difference() -> None:
    # Both systems miss the same sentences, seed by seed; the seeds differ a little (F1 97.5, 97.5, 95),
    # so the seed test has a spread, but too little for a CI that reaches the paper's +4.31.
    runs = {(m, s): {s} if s < 2 else {s, s + 7} for m in ("crener", "w2ner") for s in range(3)}
    index, counts = in_memory(runs)
    claim = claim_mod.paper_claim("weibo")
    r = claim_mod.evaluate_claim(index, counts.get, claim, "full", resamples=200)
    assert (r.bootstrap.ci_low, r.bootstrap.ci_high, r.bootstrap.p_value) == (0.0, 0.0, 1.0)
    assert r.welch.p_value == pytest.approx(1.0) and r.welch.ci_low < 0 < r.welch.ci_high
    assert r.permutation == (pytest.approx(1.0), 20)
    size, sign = claim_mod.verdict(claim, claim_mod.intervals(r))
    assert size.startswith("**Not reproduced**") and sign.startswith("No difference")


def test_a_dominating_system_excludes_zero() -> None:
    # CRENER misses one entity in no sentence, W2NER in every sentence: Δ > 0 on every resample.
    runs = {("crener", s): set() for s in range(3)} | {("w2ner", s): set(range(N_SENT)) for s in range(3)}
    index, counts = in_memory(runs)
    claim = claim_mod.paper_claim("weibo")
    r = claim_mod.evaluate_claim(index, counts.get, claim, "full", resamples=200)
    # W2NER: 20 correct of 40 predicted and 40 gold, F1 = 0.5 on every resample.
    assert (r.bootstrap.delta, r.bootstrap.ci_low, r.bootstrap.ci_high) == pytest.approx((0.5, 0.5, 0.5))
    assert r.bootstrap.p_value == 0.0 and r.pairing.seeds == [0, 1, 2]
    assert r.welch.delta == pytest.approx(50.0) and r.welch.ci_low == r.welch.ci_high  # no spread
    size, sign = claim_mod.verdict(claim, claim_mod.intervals(r))
    assert size.startswith("**Larger than the paper's**") and sign.startswith("CRENER beats W²NER")


def test_verdict_words() -> None:
    claim = claim_mod.paper_claim("weibo")
    assert claim.delta == pytest.approx(4.31)  # 76.63 − 72.32, from reports.paper
    boot, welch = "the paired bootstrap", "Welch's t"
    size, sign = claim_mod.verdict(claim, [(boot, 1.0, 6.0), (welch, 2.5, 5.0)])
    assert size.startswith("**Consistent with the paper**") and "CIs of the paired bootstrap and of" in size
    assert sign.startswith("CRENER beats W²NER")
    size, sign = claim_mod.verdict(claim, [(boot, -1.0, 6.0), (welch, 0.5, 3.0)])
    assert (
        size
        == "**Mixed**: the paper's +4.31 F1 lies inside the CI of the paired bootstrap; above the CI of Welch's t."
    )
    assert sign.startswith(
        "The tests disagree on the sign: 0 lies inside the CI of the paired bootstrap; below"
    )
    assert claim_mod.verdict(claim, [(welch, -3.0, -1.0)])[1].startswith("W²NER beats CRENER")
    assert claim_mod.verdict(claim, [])[0].startswith("No test ran")


def test_one_seed_a_system_leaves_the_claim_untested() -> None:
    index, counts = in_memory({("crener", 0): set(), ("w2ner", 0): {1, 2}, ("w2ner", 1): {3}})
    claim = claim_mod.paper_claim("weibo")
    r = claim_mod.evaluate_claim(index, counts.get, claim, "full", resamples=50)
    assert r.welch is None and r.permutation is None and r.bootstrap is not None
    assert r.untested.startswith("CRENER 1 finished run on Weibo") and "--only claim" in r.untested
    page = claim_mod.claim_page(r, "Generated by a test.", [], 50, 0)
    assert "**Untested**: CRENER 1 finished run" in page and "not a test of the claim" in page
    # What one run a system shows is listed, but not in the verdict's bold words.
    assert not any(f"**{w}" in page for w in ("Consistent", "Not reproduced", "Larger", "Mixed"))
    assert "## (b) Test over seeds\n\nNot run (see the verdict)." in page
    with pytest.raises(CrenerError, match="the paper compares"):
        claim_mod.paper_claim("conll")


def test_time_note_sums_run_minutes_and_spans_first_start_to_last_end() -> None:
    t0 = 1_796_601_600_000  # 2026-12-07 00:00 UTC, in ms
    minute = 60_000

    def cell(rows: list[tuple[float, float, float]]) -> tables.Cell:
        frame = pd.DataFrame([{"start_time": a, "end_time": b, "seconds": s} for a, b, s in rows])
        return tables.Cell(frame, expected=())

    crener = cell([(t0, t0 + 12 * minute, 700.0), (t0 + 25 * minute, t0 + 37 * minute, 680.0)])
    w2ner = cell([(t0 + 12 * minute, t0 + 25 * minute, 760.0)])
    note = claim_mod.time_note([crener, w2ner])
    assert note == (
        "Time: 35.7 min summed over the 3 runs (each run's `seconds`: after its start-up, with its "
        "evaluations and test); first start 2026-12-07 00:00 UTC to last end 2026-12-07 00:37 UTC: 37.0 min "
        "(the sweep's wall time if one call ran them back to back, less what it did before its first run)."
    )
    # A run without its time, one still open: the sum says how many it covers, no span is given.
    partial = cell([(t0, t0 + minute, 60.0), (t0, float("nan"), float("nan"))])
    assert claim_mod.time_note([partial]) == (
        "Time: 1.0 min summed over the 2 runs (1 of them timed) (each run's `seconds`: after its start-up, "
        "with its evaluations and test)."
    )
    assert claim_mod.time_note([cell([])]) is None


# --- the page on a fake MLflow store ------------------------------------------------------

# Sentences each run gets wrong: CRENER 1-3, W2NER two more; F1 = 1 − wrong / 40.
WRONG = {"crener": (1, 2, 1, 2, 3), "w2ner": (3, 4, 3, 4, 5)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mlflow.tracking import MlflowClient

    from tests.helpers import mlflow_template

    root = tmp_path_factory.mktemp("claim-store")
    shutil.copy(mlflow_template(), root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiments = {}
    ids: dict[tuple, str] = {}

    def log_run(model, seed, *, sweep="claim", profile="full", dataset="weibo", state="finished", wrong=0):
        name = f"crener-{sweep}-{profile}"
        if name not in experiments:
            experiments[name] = client.create_experiment(name, artifact_location=(root / name).as_uri())
        tags = {"key": f"{model}-{seed}-{sweep}-{profile}-{dataset}-{state}", "sweep": sweep, "model": model,
                "variant": "full", "dataset": dataset, "profile": profile, "seed": str(seed),
                "encoder": "crener-char", "state": state, "git_commit": "abc1234def", "machine": "test CPU"}  # fmt: skip
        rid = client.create_run(
            experiments[name], tags={f"crener.{k}": v for k, v in tags.items()}
        ).info.run_id
        # A wrong sentence: one of its two entities predicted with the wrong span (F1 = 1 − wrong / 40).
        preds = [{"index": i, "text": "张三在北京", "gold": GOLD, "pred": GOLD if i >= wrong else [GOLD[0], MISS]}
                 for i in range(N_SENT)]  # fmt: skip
        client.log_metric(rid, "best/test_f1", 1 - wrong / (2 * N_SENT))
        # Equal minutes (--time-budget), so unequal steps: the page says so.
        steps = {"crener": "67", "w2ner": "244"}.get(model, "0")
        for k, v in {"train.epochs": "10", "train.max_steps": steps, "runtime.time_budget": "19.6"}.items():
            client.log_param(rid, k, v)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
        client.log_text(rid, lines, "predictions/test.jsonl")
        client.set_terminated(rid, "FINISHED" if state == "finished" else "FAILED")
        ids[(model, seed, sweep, profile, dataset, state)] = rid

    for model, wrongs in WRONG.items():
        for seed, wrong in enumerate(wrongs):
            # Seeds 0 and 1 finished in the main sweep first; the claim sweep ran the rest.
            log_run(model, seed, sweep="main" if seed < 2 else "claim", wrong=wrong)
        log_run(model, 0, profile="quick", wrong=1)  # one seed a system: untested at quick
    # Runs the page must leave out: failed, a tune trial, another dataset, another model.
    log_run("crener", 0, state="failed")
    log_run("crener", 9, sweep="tune")
    log_run("w2ner", 0, dataset="resume")
    log_run("tener", 0)
    return {"uri": uri, "ids": ids}


def test_the_page_on_a_fake_store(store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the stamp's commit lookup and relative paths stay here
    page = tmp_path / "reports" / "claim-weibo.md"
    args = ["report", "--claim", "weibo", "--profile", "full", "--page", str(page)]
    args += ["--tracking-uri", store["uri"], "--bootstrap", "200"]
    monkeypatch.setattr("sys.argv", ["crener", *args])  # the command the stamp names
    assert cli_main(args) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# Claim: CRENER beats W²NER on Weibo by +4.31 F1 (paper Table 2), profile `full`")
    assert "Generated by `crener report --claim weibo --profile full --page" in text
    assert "on test CPU" in text and "`abc1234`" in text
    assert "Runs: 10 finished of 11 logged" in text  # the failed CRENER run is logged, not used
    a = [100 * (1 - w / 40) for w in WRONG["crener"]]
    b = [100 * (1 - w / 40) for w in WRONG["w2ner"]]
    assert "Difference of means: **+5.00** (paper: 76.63 − 72.32 = +4.31)" in text
    welch = stats.welch_test(a, b)
    assert f"95 % CI [{welch.ci_low:+.2f}, {welch.ci_high:+.2f}]" in text and welch.ci_low > 0
    assert "all 252 splits of the 10 runs into groups of 5 and 5" in text
    assert "5 seed pairs (0, 1, 2, 3, 4), 20 test sentences, B = 200 resamples (seed 0)" in text
    ours = {k: v for k, v in store["ids"].items() if k[3] == "full" and k[4] == "weibo" and k[5] == "finished"
            and k[0] in ("crener", "w2ner") and k[2] in ("main", "claim")}  # fmt: skip
    assert len(ours) == 10 and all(rid in text for rid in ours.values())
    others = set(store["ids"].values()) - set(ours.values())
    assert others and not any(rid in text for rid in others)
    assert "## Verdict" in text and "Welch's t over seeds" in text and "Untested" not in text
    assert "- Time: first start " in text  # the fake runs log no `seconds`: only their span
    assert (
        "- Training length DIFFERS between rows (train.epochs / train.max_steps / runtime.time_budget of the "
        "runs): 10 epochs of at most 244 steps (--time-budget 19.6 min): W²NER; 10 epochs of at most 67 steps "
        "(--time-budget 19.6 min): CRENER." in text
    )


def test_the_page_says_untested_with_one_seed(
    store: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    page = claim_mod.write_claim_page(
        "weibo", "quick", tmp_path / "claim.md", tracking_uri=store["uri"], resamples=50
    )
    text = page.read_text(encoding="utf-8")
    assert "**Untested**: CRENER 1 finished run and W²NER 1 finished run on Weibo at profile `quick`" in text
    assert "missing seeds of the claim sweep: 1, 2" in text  # quick plans seeds 0-2
    for model in ("crener", "w2ner"):
        assert store["ids"][(model, 0, "claim", "quick", "weibo", "finished")] in text


def test_claim_mistakes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli_main(["report", "--claim", "weibo", "--profile", "full"]) == 2
    assert "--page FILE" in caplog.text
    assert cli_main(["report", "--claim", "conll", "--page", str(tmp_path / "x.md")]) == 2
    assert "weibo, resume, ontonotes4, msra" in caplog.text
