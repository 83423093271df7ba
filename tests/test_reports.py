"""reports/: paper numbers, statistics, tables and figures on a synthetic MLflow store.

The store (module fixture) holds 3 seeds of CRENER full and no_region and of W2NER (seed 2
missing on Resume) on Weibo and Resume, with known metrics and predictions, plus runs that
must be ignored (failed, tune sweep, other profile). Every table cell is checked against a
mean ± std computed here with the ``statistics`` module.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import statistics
import subprocess

import numpy as np
import pytest
import torch

from crener.data.schema import Entity, Sentence
from reports import paper, stats, tables

SEEDS = (0, 1, 2)
DATASETS = ("weibo", "resume")
BASE = {("crener", "full"): 0.80, ("crener", "no_region"): 0.75, ("w2ner", "full"): 0.78}
OFFSET = {"weibo": 0.0, "resume": 0.1}
N_SENT = 6
GOLD = [[[0, 1], "PER"], [[3, 4], "LOC"]]


def metrics_of(model: str, variant: str, dataset: str, seed: int) -> dict[str, float]:
    base = BASE[(model, variant)] + OFFSET[dataset]
    return {
        "best/test_precision": base + 0.01 * seed,
        "best/test_recall": base - 0.005 * seed**2,
        "best/test_f1": base + 0.003 * seed,
    }


def predictions_of(model: str, variant: str, seed: int) -> list[dict]:
    """CRENER full is always right; no_region swaps LOC for a wrong span on alternate sentences."""
    rows = []
    for i in range(N_SENT):
        pred = [list(e) for e in GOLD]
        if variant == "no_region" and (i + seed) % 2 == 0:
            pred = [GOLD[0], [[5], "LOC"]]
        if model == "w2ner" and i == 0:
            pred = [*pred, [[6], "PER"]]
        rows.append({"index": i, "text": "张三在北京工作了", "gold": GOLD, "pred": pred})
    return rows[::-1]  # stored out of order on purpose: load_predictions sorts by index


def _expected(model, variant, dataset, metric, seeds=SEEDS):
    values = [metrics_of(model, variant, dataset, s)[f"best/test_{metric}"] for s in seeds]
    if len(values) == 1:
        return f"{values[0] * 100:.2f} ± –"
    text = f"{statistics.mean(values) * 100:.2f} ± {statistics.stdev(values) * 100:.2f}"
    return text if len(seeds) == len(SEEDS) else f"{text} (n={len(seeds)})"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiments = {
        (sweep, profile): client.create_experiment(
            f"crener-{sweep}-{profile}", artifact_location=(root / f"art-{sweep}-{profile}").as_uri()
        )
        for sweep, profile in (("main", "quick"), ("ablation", "quick"), ("tune", "quick"), ("main", "full"))
    }
    ids: dict[tuple, str] = {}

    def log_run(model, variant, dataset, seed, sweep="main", profile="quick", state="finished"):
        tags = {
            "crener.key": f"{model}-{variant}-{dataset}-{seed}-{sweep}-{profile}-{state}",
            "crener.sweep": sweep,
            "crener.model": model,
            "crener.variant": variant,
            "crener.dataset": dataset,
            "crener.profile": profile,
            "crener.seed": str(seed),
            "crener.encoder": "embedded",
            "crener.msra_protocol": "lineage",
            "crener.state": state,
            "crener.git_commit": "abc1234",
        }
        run = client.create_run(experiments[(sweep, profile)], tags=tags)
        rid = run.info.run_id
        final = {
            **metrics_of(model, variant, dataset, seed),
            "best/epoch": 2,
            "seconds": 1.5,
            "parameters": 1000,
        }
        history = [
            Metric(key, value, 0, epoch)
            for epoch in range(3)
            for key, value in (("dev/f1", 0.5 + 0.1 * epoch + 0.01 * seed), ("train/loss", 1.0 / (epoch + 1)))
        ]
        client.log_batch(
            rid,
            metrics=[Metric(k, v, 0, 0) for k, v in final.items()] + history,
            params=[
                Param("model.name", model),
                Param("variant", variant),
                Param("train.seed", str(seed)),
                Param("train.encoder_lr", "0.0"),
            ],
        )
        lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in predictions_of(model, variant, seed))
        client.log_text(rid, lines + "\n", "predictions/test.jsonl")
        client.log_dict(rid, {"PER": {"correct": 1}}, "per_type.json")
        client.set_terminated(rid, "FINISHED" if state == "finished" else "FAILED")
        ids[(model, variant, dataset, seed, sweep, profile, state)] = rid
        return rid

    for dataset in DATASETS:
        for seed in SEEDS:
            log_run("crener", "full", dataset, seed)
            log_run("crener", "no_region", dataset, seed, sweep="ablation")
            if not (dataset == "resume" and seed == 2):
                log_run("w2ner", "full", dataset, seed)
    # Runs the report must ignore.
    log_run("crener", "full", "weibo", 0, state="failed")
    log_run("crener", "full", "weibo", 7, sweep="tune")
    log_run("crener", "full", "weibo", 0, profile="full")
    return {"uri": uri, "ids": ids, "root": root}


def labelled(shown, name):
    """The row of ``shown`` (indexed by label) for system ``name``, whatever its note marker."""
    hits = [x for x in shown.index if x == name or x.startswith(name + " [")]
    assert len(hits) == 1, (name, list(shown.index))
    return shown.loc[hits[0]]


def rid(store, model, variant, dataset, seed, sweep=None):
    sweep = sweep or ("ablation" if variant != "full" else "main")
    return store["ids"][(model, variant, dataset, seed, sweep, "quick", "finished")]


# --- paper numbers ------------------------------------------------------------------------


def test_paper_tables_and_consistency_notes():
    assert paper.rerun_systems() == {"CRENER": ("crener", "full"), "W²NER": ("w2ner", "full")}
    assert list(paper.extra_systems()) == ["BERT-Softmax", "BERT-CRF", "TENER"]
    t2 = paper.paper_table(2)
    assert list(t2.columns[:6]) == ["system", "dataset", "precision", "recall", "f1", "note"]
    assert t2.set_index("system").loc["CRENER", ["precision", "recall", "f1"]].tolist() == [
        74.03,
        79.43,
        76.63,
    ]
    # The rows flagged by arithmetic are exactly those of method.md §6.7.
    flagged = {
        (n, s)
        for n in (2, 3, 4, 5)
        for s, note in paper.paper_table(n)[["system", "note"]].itertuples(index=False)
        if "harmonic mean" in note
    }
    weibo = {"CAN-NER", "SoftLexicon", "MECT", "Token-Relation", "NER-MC", "VisPhone"}
    assert flagged == {(2, s) for s in weibo} | {(3, "Token-Relation"), (4, "W²NER"), (5, "W²NER")}
    assert "mis-copied" in paper.paper_note(5, "W²NER", "msra")
    extra = paper.paper_table(3, include_extra=True).set_index("system")
    assert extra.loc["TENER", "f1"] == 95.00 and math.isnan(extra.loc["TENER", "precision"])
    assert math.isnan(extra.loc["BERT-CRF", "f1"])
    t6 = paper.paper_table(6)
    assert len(t6) == 9 * 4 and paper.paper_value(6, "no_region", "weibo") == 68.42
    assert paper.paper_table(1).set_index(["dataset", "split"]).loc[("msra", "test"), "sentences"] == 4400
    with pytest.raises(ValueError):
        paper.paper_table(7)


# --- statistics ---------------------------------------------------------------------------


def test_mean_std_formatting():
    assert stats.format_mean_std([0.5, 0.7]) == f"60.00 ± {statistics.stdev([50, 70]):.2f}"
    assert stats.format_mean_std([0.7634]) == "76.34 ± –"
    assert stats.format_mean_std([]) == "—"
    assert stats.mean_std([0.1, float("nan"), 0.3])[2] == 2


def test_bootstrap_identical_systems():
    counts = np.array([[1, 2, 1], [0, 1, 2], [3, 3, 3], [0, 0, 1]])
    r = stats.paired_bootstrap(counts, counts.copy(), resamples=200, seed=1)
    assert (r.delta, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_strictly_better_everywhere():
    ref = np.array([[0, 1, 1]] * 20)
    better = np.array([[1, 1, 1]] * 20)
    r = stats.paired_bootstrap(better, ref, resamples=300, seed=0)
    assert r.delta == 1.0 and r.ci_low > 0 and r.p_value == 0.0
    assert stats.format_p(r.p_value, 300).startswith("<")
    assert stats.paired_bootstrap(ref, better, resamples=300, seed=0).p_value == 0.0


def test_bootstrap_exact_enumeration():
    """3 sentences; all 27 resamples enumerated. By hand, with k_j copies of sentence j:
    F1(ref) = 2k0/(k0+k1+3), F1(sys) = 2(k0+k1)/(k0+k1+3), so Δ = 2k1/(6-k2); Δ = 0 iff k1 = 0,
    which has probability (2/3)^3 = 8/27, hence p = 2·8/27 = 16/27."""
    ref = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    sys_ = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 1]])
    resamples = np.array(list(itertools.product(range(3), repeat=3)))
    deltas = stats.bootstrap_deltas([sys_], [ref], resamples)
    by_hand = [2 * list(r).count(1) / (6 - list(r).count(2)) for r in resamples]
    assert np.allclose(deltas, by_hand)
    low, high, p = stats.summarize_deltas(deltas)
    assert p == pytest.approx(16 / 27)
    assert (low, high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    # Monte Carlo converges to the exact values.
    r = stats.paired_bootstrap(sys_, ref, resamples=4000, seed=3)
    assert r.delta == pytest.approx(0.4) and r.p_value == pytest.approx(16 / 27, abs=0.04)
    # Several seeds: per-resample Δ is the mean of the per-seed Δ (same indices for all seeds).
    pooled = stats.bootstrap_deltas([sys_, ref], [ref, ref], resamples)
    assert np.allclose(pooled, np.asarray(by_hand) / 2)
    again = stats.paired_bootstrap([sys_, ref], [ref, ref], resamples=100, seed=5)
    assert again == stats.paired_bootstrap([sys_, ref], [ref, ref], resamples=100, seed=5)
    with pytest.raises(ValueError):
        stats.paired_bootstrap([sys_], [ref[:2]], resamples=10)


def test_breakdown_and_spearman():
    preds = [
        {"index": 0, "gold": [[[0, 1], "PER"], [[3], "LOC"]], "pred": [[[0, 1], "PER"], [[3, 4], "LOC"]]}
    ]
    by_type = stats.breakdown(preds, "type").set_index("group")
    assert by_type.loc["PER", "f1"] == 1.0 and by_type.loc["LOC", "f1"] == 0.0
    by_len = stats.breakdown(preds, "length").set_index("group")
    assert by_len.loc["2", ["correct", "predicted", "gold"]].tolist() == [1, 2, 1]
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 2], [1, 2]))


def test_reported_systems_cover_the_paper_rows_we_do_not_rerun() -> None:
    from reports.paper import paper_table, paper_value, rerun_systems
    from reports.reported import REPORTED, reported_table

    paper_systems = {s for n in (2, 3, 4, 5) for s in paper_table(n).system}
    assert set(REPORTED) == paper_systems - set(rerun_systems())
    df = reported_table()
    assert set(df.system) == set(REPORTED)
    assert all(df.reason.str.len() > 0)
    row = df[(df.system == "VisPhone") & (df.dataset == "weibo")].iloc[0]
    assert row.f1 == paper_value(2, "VisPhone", "weibo")  # numbers come from reports.paper, not copies


# --- collect ------------------------------------------------------------------------------


def test_collect_runs(store):
    from reports import collect

    df = collect.collect_runs(store["uri"], profile="quick")
    assert len(df) == 2 * 3 * 3 - 1 + 1  # 17 table runs + the tune run; failed and other profile excluded
    assert set(df["state"]) == {"finished"} and set(df["profile"]) == {"quick"}
    assert str(df["seed"].dtype) == "Int64"
    row = df.set_index("run_id").loc[rid(store, "crener", "full", "weibo", 1)]
    assert row["best/test_f1"] == pytest.approx(0.803) and row["params.model.name"] == "crener"
    preds = collect.load_predictions(rid(store, "crener", "no_region", "weibo", 0), store["uri"])
    assert [p["index"] for p in preds] == list(range(N_SENT)) and preds[0]["text"] == "张三在北京工作了"
    hist = collect.load_history(rid(store, "crener", "full", "weibo", 1), store["uri"])
    assert hist["epoch"].tolist() == [0, 1, 2] and hist["dev/f1"].tolist() == pytest.approx(
        [0.51, 0.61, 0.71]
    )
    assert collect.load_per_type(rid(store, "crener", "full", "weibo", 1), store["uri"]) == {
        "PER": {"correct": 1}
    }
    assert collect.collect_runs(store["uri"], profile="nope").empty
    from crener.errors import CrenerError

    with pytest.raises(CrenerError):
        collect.collect_runs(f"sqlite:///{store['root'] / 'absent.db'}")


# --- tables -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(store):
    from reports import collect

    return tables.RunIndex(collect.collect_runs(store["uri"], profile="quick"))


def test_main_table_cells(index, store):
    t = tables.main_table(index, 2, "quick")
    shown = t.display.set_index("System")
    crener = labelled(shown, "CRENER")
    for short, metric in tables.METRICS:
        assert crener[f"{short} ours"] == _expected("crener", "full", "weibo", metric)
        ours = (
            statistics.mean(metrics_of("crener", "full", "weibo", s)[f"best/test_{metric}"] for s in SEEDS)
            * 100
        )
        theirs = paper.paper_value(2, "CRENER", "weibo", metric)
        assert crener[f"{short} paper"] == f"{theirs:.2f}"
        assert crener[f"Δ{short}"] == f"{ours - theirs:+.2f}"
    assert labelled(shown, "W²NER")["F1 ours"] == _expected("w2ner", "full", "weibo", "f1")
    assert labelled(shown, "BERT-CRF")["F1 ours"] == "—" and labelled(shown, "TENER")["F1 paper"] == "58.17"
    assert labelled(shown, "MECT")["Source"] == "reported" and labelled(shown, "MECT")["F1 ours"] == ""
    assert "bert_crf/full on weibo: all seeds (0, 1, 2)" in t.missing
    assert any(n.startswith("Not rerun: MECT — ") for n in t.notes)  # reports/reported.py's reason
    data = t.data.set_index("system")
    assert data.loc["CRENER", "run_ids"].split(";") == [
        rid(store, "crener", "full", "weibo", s) for s in SEEDS
    ]
    assert (
        "CRENER (P, R, F1 ours)",
        [rid(store, "crener", "full", "weibo", s) for s in SEEDS],
    ) in t.footnotes
    assert "profile: quick" in t.header and any("0, 1, 2" in h for h in t.header)

    resume = tables.main_table(index, 3, "quick").display.set_index("System")
    assert labelled(resume, "W²NER")["F1 ours"] == _expected("w2ner", "full", "resume", "f1", seeds=(0, 1))
    assert "w2ner/full on resume: seeds 2" in tables.main_table(index, 3, "quick").missing
    msra = tables.main_table(index, 5, "quick")
    assert labelled(msra.display.set_index("System"), "CRENER")["F1 ours"] == "—"
    assert "MSRA protocol: lineage" in msra.header
    assert "crener/full on msra (lineage protocol): all seeds (0, 1, 2)" in msra.missing


def test_ablation_table(index, store):
    t = tables.ablation_table(index, "quick")
    shown = t.display.set_index("Setting")
    region = labelled(shown, "w/o Region matrix").name
    assert shown.loc[region, "Weibo ours"] == _expected("crener", "no_region", "weibo", "f1")
    assert shown.loc["full", "Resume ours"] == _expected("crener", "full", "resume", "f1")
    assert shown.loc[region, "Weibo Δ ours"] == "-5.00"
    assert shown.loc[region, "Weibo Δ paper"] == f"{68.42 - 76.63:+.2f}"
    assert shown.loc[region, "MSRA ours"] == "—" and shown.loc["full", "MSRA paper"] == "96.21"
    assert shown.loc["same sign of Δ", "Weibo Δ ours"] == "1/1"
    assert shown.loc["Spearman ρ of Δ (ours vs paper)", "Weibo Δ ours"] == "—"  # < 3 ablations
    assert "crener/no_mlp on weibo: all seeds (0, 1, 2)" in t.missing
    row = t.data[(t.data.variant == "no_region") & (t.data.dataset == "resume")].iloc[0]
    assert row["run_ids"].split(";") == [rid(store, "crener", "no_region", "resume", s) for s in SEEDS]
    assert row["delta_full"] == pytest.approx(-5.0)


def test_bootstrap_table(index, store):
    from reports import collect

    def loader(run_id):
        return collect.load_predictions(run_id, store["uri"])

    t = tables.bootstrap_table(index, loader, "quick", resamples=100, seed=0)
    shown = t.display
    row = shown[
        (shown["System (vs CRENER full)"] == "CRENER w/o Region matrix") & (shown["Dataset"] == "Weibo")
    ].iloc[0]
    # Full is always right (F1 = 1); no_region gets 9 of 12 entities with 12 predicted (F1 = 0.75).
    assert row["ΔF1"] == "-25.00" and row["seeds"] == "3" and row["sentences"] == str(N_SENT)
    assert row["p"] == "< 0.01"  # each sentence is wrong for some seed: every resample has Δ < 0
    counts = {
        (v, s): stats.sentence_counts(predictions_of("crener", v, s))
        for v in ("full", "no_region")
        for s in SEEDS
    }
    direct = stats.paired_bootstrap(
        [counts[("no_region", s)] for s in SEEDS], [counts[("full", s)] for s in SEEDS], resamples=100, seed=0
    )
    assert row["95% CI"] == f"[{direct.ci_low * 100:+.2f}, {direct.ci_high * 100:+.2f}]"  # wiring
    # Independent of the function: no resample can favour no_region (it is never right where full
    # is wrong), so the whole interval lies below 0, and it holds the observed -25 points.
    low, high = (float(x) for x in row["95% CI"].strip("[]").split(","))
    assert low <= -25.0 <= high and high < 0
    w2 = shown[(shown["System (vs CRENER full)"] == "W²NER") & (shown["Dataset"] == "Resume")].iloc[0]
    assert w2["seeds"] == "2"
    assert any(m.startswith("W²NER vs CRENER full on resume: unpaired seeds 2") for m in t.missing)
    assert shown[shown["System (vs CRENER full)"] == "BERT-CRF"]["ΔF1"].eq("—").all()


def test_pair_by_seed_names_what_the_pairing_left_out(index, store):
    """The pairing the bootstrap table and the claim page share (reports/claim.py)."""
    from reports import collect

    reads = []

    def loader(run_id):
        reads.append(run_id)
        # W2NER's seed-0 run on Resume lost its predictions.
        return (
            None
            if run_id == rid(store, "w2ner", "full", "resume", 0)
            else collect.load_predictions(run_id, store["uri"])
        )

    counts = tables.run_counts(loader)
    full = index.cell("crener", "full", "resume")
    pairing = tables.pair_by_seed(index.cell("w2ner", "full", "resume"), full, counts)
    assert pairing.seeds == [1] and pairing.unpaired == [2]  # W2NER has no seed 2 on Resume
    assert pairing.no_predictions == [rid(store, "w2ner", "full", "resume", 0)]
    assert pairing.run_ids == [
        rid(store, "w2ner", "full", "resume", 1),
        rid(store, "crener", "full", "resume", 1),
    ]
    assert [c.shape for c in pairing.system_counts + pairing.reference_counts] == [(N_SENT, 3)] * 2
    tables.pair_by_seed(index.cell("crener", "no_region", "resume"), full, counts)
    assert len(reads) == len(set(reads)) == 2 + 3 + 3  # W2NER, CRENER full, no_region: each read once
    assert tables.pair_by_seed(index.cell("bert_crf", "full", "resume"), full, counts).unpaired == []


def test_dataset_table_with_loader():
    sent = Sentence(tuple("张三在北京"), (Entity.span(0, 2, "PER"), Entity.span(3, 5, "LOC")))

    def loader(name):
        if name != "weibo":
            raise FileNotFoundError(f"{name} not staged")
        return {"train": [sent] * 3, "dev": [sent], "test": [sent, sent]}

    t = tables.dataset_table(loader=loader)
    shown = t.display.set_index(["Dataset", "Split"])
    assert shown.loc[("Weibo", "train"), "Sentences ours"] == "3"
    assert shown.loc[("Weibo", "train"), "Entities ours"] == "6"
    assert shown.loc[("Weibo", "train"), "Sentences paper"] == "1,350"
    assert shown.loc[("Weibo", "test"), "Types ours"] == "2"
    assert shown.loc[("MSRA", "dev"), "Sentences paper"] == "—"
    assert any(m.startswith("dataset resume: FileNotFoundError") for m in t.missing)


# --- LaTeX --------------------------------------------------------------------------------


def check_latex_tabular(tex: str) -> None:
    """Balanced braces and $, booktabs rules in order, the same column count on every row."""
    # Comment lines, and a "%" ending a line on purpose (no space after "{%"), are not content.
    body = "\n".join(
        line.removesuffix("{%") + "{" if line.endswith("{%") else line
        for line in tex.splitlines()
        if not line.startswith("%")
    )
    unescaped = re.sub(r"\\[{}_%&#$]", "", body)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "closing brace without opening"
    assert depth == 0, "unbalanced braces"
    assert unescaped.count("$") % 2 == 0, "unbalanced math mode"
    assert not re.search(r"[_%#]", unescaped.replace(r"\textbackslash{}", "")), "unescaped special character"
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", body).group(1)
    inner = body.split(r"\begin{tabular}{" + spec + "}")[1].split(r"\end{tabular}")[0]
    assert inner.index(r"\toprule") < inner.index(r"\midrule") < inner.index(r"\bottomrule")
    rows = [line for line in inner.splitlines() if line.rstrip().endswith(r"\\")]
    assert len(rows) >= 2
    for line in rows:
        cells = re.split(r"(?<!\\)&", line.rstrip()[:-2])
        width = sum(int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", c)) else 1 for c in cells)
        assert width == len(spec), f"row has {width} columns, spec {len(spec)}: {line}"


def test_latex_is_valid_tabular(index, tmp_path):
    built = [tables.main_table(index, 2, "quick"), tables.ablation_table(index, "quick")]
    weird = tables.Table(
        name="weird_name",
        title="100% of A & B_c #1 {x} ~ ^ \\",
        display=__import__("pandas").DataFrame([{"a_b": "x_y & 5%", "Δ": "1.00 ± –"}]),
        data=__import__("pandas").DataFrame([{"a": 1, "run_ids": ""}]),
        notes=["W²NER ≥ 3 — ok"],
    )
    for t in [*built, weird]:
        tex = t.latex()
        check_latex_tabular(tex)
        assert r"\toprule" in tex and r"\bottomrule" in tex
        paths = t.write(tmp_path)
        assert paths["md"].read_text(encoding="utf-8").startswith("### ")
        assert "run_ids" in paths["csv"].read_text(encoding="utf-8").splitlines()[0]
    assert r"\multicolumn{4}{c}{Weibo}" in built[1].latex() and r"\cmidrule(lr){2-5}" in built[1].latex()


def _weird_table():
    import pandas as pd

    return tables.Table(
        name="weird_name",
        title="100% of A & B_c #1 {x} ~ ^ \\",
        display=pd.DataFrame([{"a_b": "x_y & 5%", "Δ": "1.00 ± –"}]),
        data=pd.DataFrame([{"a": 1, "run_ids": ""}]),
        notes=["W²NER ≥ 3 — ok"],
    )


def test_latex_compiles(index, tmp_path):
    """The tables compile with pdflatex and booktabs (CI installs them; see .ci/run)."""
    if not shutil.which("pdflatex"):
        pytest.skip("no pdflatex (apt-get install texlive-latex-base texlive-latex-recommended)")
    built = [tables.main_table(index, 2, "quick"), tables.ablation_table(index, "quick"), _weird_table()]
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\\usepackage{booktabs,graphicx}\\usepackage[T1]{fontenc}\n\\begin{document}\n"
        + "\n".join(t.latex() for t in built)
        + "\\end{document}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


# --- the whole report ---------------------------------------------------------------------


def test_make_report_end_to_end(store, tmp_path, monkeypatch):
    import optuna

    from reports import make_report

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="crener-tune-quick", storage=storage, sampler=optuna.samplers.TPESampler(seed=0)
    )
    study.optimize(
        lambda tr: tr.suggest_float("lr", 1e-4, 1e-2, log=True) + tr.suggest_int("rounds", 1, 3), n_trials=4
    )
    sent = Sentence(tuple("张三"), (Entity.span(0, 2, "PER"),))
    monkeypatch.chdir(tmp_path)  # git commit lookup and any relative path stay inside tmp_path
    from reports import plots

    monkeypatch.setattr(plots, "DPI", 50)  # small PNGs: this test checks that figures exist, not looks

    out = tmp_path / "out"
    index_path = make_report.main(
        profile="quick",
        out=out,
        tracking_uri=store["uri"],
        bootstrap=50,
        optuna_storage=storage,
        dataset_loader=lambda name: {"train": [sent], "dev": [sent], "test": [sent]},
        page=tmp_path / "pages" / "results-quick.md",
        command="crener report --page pages/results-quick.md",
    )
    assert index_path == out / "index.md"
    # The committed page: stamped with its command, commit, date and the runs' machines; every
    # table with its notes; the run ids behind every cell.
    page = (tmp_path / "pages" / "results-quick.md").read_text(encoding="utf-8")
    assert page.startswith(
        "# Results: profile `quick`\n\nGenerated by `crener report --page pages/results-quick.md`"
    )
    assert "machines not recorded" in page and "do not edit: rerun it" in page
    for title in ("## Table 1:", "## Table 2: Weibo", "## Table 5: MSRA", "## Table 6: ablation"):
        assert title in page
    assert "Encoder regime: frozen in every row that runs the pretrained encoder" in page
    assert rid(store, "crener", "no_region", "weibo", SEEDS[0]) in page
    assert "## Missing runs" in page and "bert_crf/full on weibo" in page
    text = index_path.read_text(encoding="utf-8")
    assert "profile `quick`" in text and "## Missing runs" in text and "bert_crf/full on weibo" in text
    for name in ("table1_datasets", "table2_weibo", "table5_msra", "table6_ablation", "bootstrap"):
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0
            assert f"tables/{name}.{ext}" in text
    figures = [
        "time_to_accuracy",
        "ablation_delta_f1",
        "learning_curves_variants",
        "learning_curves_systems",
        "f1_by_type",
        "f1_by_length",
        "optuna_crener-tune-quick_history",
        "optuna_crener-tune-quick_importance",
    ]
    for name in figures:
        png, pdf = out / "figures" / f"{name}.png", out / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 500
        assert pdf.read_bytes()[:4] == b"%PDF" and pdf.stat().st_size > 1000
        assert f"figures/{name}.png" in text
    footnotes = (out / "footnotes.md").read_text(encoding="utf-8")
    for seed in SEEDS:
        assert rid(store, "crener", "no_region", "weibo", seed) in footnotes
    failed = store["ids"][("crener", "full", "weibo", 0, "main", "quick", "failed")]
    assert failed not in footnotes and failed in (out / "runs.csv").read_text()
    tune = store["ids"][("crener", "full", "weibo", 7, "tune", "quick", "finished")]
    assert tune not in footnotes
    by_type = (out / "tables" / "breakdown_type.csv").read_text(encoding="utf-8")
    assert "CRENER,weibo,LOC" in by_type


def test_cjk_font_is_found():
    from reports import plots

    font = plots.setup_cjk_font()
    if font is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk)")
    assert "CJK" in font or "Hei" in font or "Han" in font


def test_report_cli(tmp_path):
    from crener.cli import build_parser

    args = build_parser("report").parse_args(
        ["report", "--profile", "full", "--bootstrap", "10", "--out", "x"]
    )
    assert (args.profile, args.bootstrap, args.out, args.tracking_uri) == ("full", 10, "x", None)
    assert args.sweeps == "main,ablation" and args.msra_protocol == "lineage"
    assert callable(args.func)


def test_without_a_cjk_font_figures_fall_back_to_english(index, tmp_path, monkeypatch):
    """No CJK font: one warning from setup_cjk_font, then English labels, no glyph warnings."""
    import re
    import warnings

    import matplotlib.pyplot as plt

    from reports import plots

    monkeypatch.setattr(plots, "CJK_FAMILIES", ())
    monkeypatch.setattr(plots, "_CJK_FILE_HINTS", ())
    monkeypatch.setattr(plots, "_CJK", True)
    monkeypatch.setitem(plt.rcParams, "font.sans-serif", ["DejaVu Sans"])
    assert plots.setup_cjk_font() is None
    assert plots.dataset_title("weibo") == "Weibo" and plots.bilingual("消融", "Ablation") == "Ablation"
    texts: list[str] = []
    real_save = plots.save

    def save(fig, stem):  # the figure's texts, read before save closes it
        texts.extend(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        return real_save(fig, stem)

    monkeypatch.setattr(plots, "save", save)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plots.ablation_chart(tables.ablation_table(index, "quick").data, tmp_path / "ablation")
    assert paths and all(p.stat().st_size > 1000 for p in paths)
    assert [w for w in caught if "Glyph" in str(w.message)] == []
    assert any("Ablation" in t for t in texts) and any("Weibo" in t for t in texts)
    assert not any(re.search("[\u4e00-\u9fff]", t) for t in texts)


def test_optuna_figure_titles_name_the_study_once():
    import optuna

    from reports import plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="crener-crener-no_mlp-resume-quick")
    for k, v in {"model": "crener", "variant": "no_mlp", "dataset": "resume", "profile": "quick"}.items():
        study.set_user_attr(k, v)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert plots.study_title(study) == "Tuning CRENER w/o MLP on Resume (quick), 2 trials"
    other = optuna.create_study(study_name="mine")
    assert plots.study_title(other) == "Optuna study mine, 0 trials"


def test_global_state_does_not_leak_between_tests_a():
    import matplotlib.pyplot as plt

    plt.rcParams["font.sans-serif"] = ["Leaky Sans"]
    torch.set_num_threads(2)


def test_global_state_does_not_leak_between_tests_b():
    import matplotlib.pyplot as plt

    assert plt.rcParams["font.sans-serif"] != ["Leaky Sans"] and torch.get_num_threads() == 1


@pytest.mark.parametrize("shared", [False, True])
def test_ablation_chart_can_share_one_delta_scale(index, tmp_path, monkeypatch, shared):
    from reports import plots

    limits: list[tuple[float, float]] = []
    real_save = plots.save

    def save(fig, stem):  # the panels' x ranges, read before save closes the figure
        limits.extend(tuple(round(v, 6) for v in ax.get_xlim()) for ax in fig.axes)
        return real_save(fig, stem)

    monkeypatch.setattr(plots, "save", save)
    data = tables.ablation_table(index, "quick").data.copy()
    data.loc[data["dataset"] == "weibo", "paper_delta_full"] = -40.0  # one panel with a far wider range
    plots.ablation_chart(data, tmp_path / "ablation", shared_x=shared)
    assert len(limits) == 4
    assert (len(set(limits)) == 1) == shared


def test_planned_seeds_follow_the_sweep_configs():
    """quick plans three seeds of Table 6 on Resume and Weibo and one elsewhere; main plans one."""
    from reports.make_report import planned_seeds

    quick = planned_seeds("quick", tables.TABLE_SWEEPS)
    assert quick("crener", "no_mlp", "resume") == (0, 1, 2)
    assert quick("crener", "no_mlp", "msra") == (0,)
    assert quick("crener", "full", "weibo") == (0, 1, 2)  # main (seed 0) and ablation (0-2) share it
    assert quick("w2ner", "full", "resume") == (0,)
    assert quick("w2ner", "no_mlp", "resume") is None  # no sweep plans a baseline's ablation
    assert planned_seeds("full", tables.TABLE_SWEEPS)("bert_crf", "full", "msra") == (0, 1, 2, 3, 4)
    assert planned_seeds("quick", ("adhoc",))("crener", "full", "resume") is None  # no config file


def test_a_cell_is_missing_only_the_seeds_its_plan_names(store):
    from reports import collect

    runs = collect.collect_runs(store["uri"], profile="quick")

    def plan(model, variant, dataset):  # W2NER planned with seeds 0-1 on Resume only
        return (0, 1) if (model, dataset) == ("w2ner", "resume") else None

    index = tables.RunIndex(runs, planned=plan)
    t = tables.main_table(index, 3, "quick")
    assert not any(m.startswith("w2ner/full on resume") for m in t.missing)  # seed 2 was not planned
    shown = labelled(t.display.set_index("System"), "W²NER")["F1 ours"]
    assert shown == _expected("w2ner", "full", "resume", "f1", seeds=(0, 1)).removesuffix(" (n=2)")
    assert "(n=" not in shown  # the cell has every seed of its plan
    assert "bert_crf/full on resume: all seeds (0, 1, 2)" in t.missing  # unplanned: every seed seen
    # Without a plan the same store reads seed 2 as missing (the behaviour the plan corrects).
    assert "w2ner/full on resume: seeds 2" in tables.main_table(tables.RunIndex(runs), 3, "quick").missing


def params_cell(params: dict[str, list[str]]) -> tables.Cell:
    """A table cell of runs with seeds 0, 1, ... that logged ``params`` (name -> a value a run)."""
    import pandas as pd

    n = len(next(iter(params.values()), []))
    columns = {"run_id": [f"r{i}" for i in range(n)], "seed": list(range(n))}
    return tables.Cell(
        pd.DataFrame({**columns, **{f"params.{k}": v for k, v in params.items()}}), tuple(range(n))
    )


def test_main_tables_name_the_encoder_regime_and_flag_rows_that_differ(index):

    regime = [n for n in tables.main_table(index, 2, "quick").notes if n.startswith("Encoder")]
    assert regime == ["Encoder regime: frozen in every row that runs the pretrained encoder."]
    tuned = params_cell({"train.encoder_lr": ["0.0001", "1e-4"]})
    frozen = params_cell({"train.encoder_lr": ["0.0"]})
    top = params_cell({"train.encoder_lr": ["0.0001", "0.0001"], "train.encoder_top_layers": ["1", "1"]})
    assert tables.encoder_regimes(tuned) == {"fine-tuned at 0.0001"}
    assert tables.encoder_regimes(top) == {"top 1 layer fine-tuned at 0.0001 (lower layers frozen)"}
    note = tables._encoder_note(
        {"BERT-CRF": tables.encoder_regimes(tuned), "CRENER": tables.encoder_regimes(frozen)}
    )
    assert note == (
        "Encoder regime DIFFERS between rows, so they compare training regimes as well as models "
        "(train.encoder_lr / train.encoder_top_layers of the runs): "
        "fine-tuned at 0.0001: BERT-CRF; frozen: CRENER."
    )
    assert tables._encoder_note({"CRENER": {"frozen"}, "W²NER": {"frozen"}}) == (
        "Encoder regime: frozen in every row that runs the pretrained encoder."
    )
    # A row without a pretrained encoder (TENER) is named, not counted as a difference.
    one = tables._encoder_note(
        {
            "CRENER": tables.encoder_regimes(top),
            "TENER": {"no pretrained encoder, model.char_vectors=default"},
        }
    )
    assert one == (
        "Encoder regime: top 1 layer fine-tuned at 0.0001 (lower layers frozen) in every row that runs "
        "the pretrained encoder; no pretrained encoder, model.char_vectors=default: TENER."
    )
    assert tables._encoder_note({}) is None
    assert tables.encoder_regimes(frozen, "tener") == {"no pretrained encoder"}  # logged before char_vectors
    tener = params_cell({"model.char_vectors": ["default", "none"]})
    assert tables.encoder_regimes(tener, "tener") == {
        "no pretrained encoder, model.char_vectors=default",
        "no pretrained encoder",
    }
    assert tables.encoder_regimes(frozen, "crener") == {"frozen"}
    # Table 6 names its regime too.
    assert "Encoder regime: frozen in every row that runs the pretrained encoder." in (
        tables.ablation_table(index, "quick").notes
    )


def test_tables_name_how_long_rows_trained_and_flag_rows_that_differ(index):

    # The fake store's runs log no train.epochs: no claim is made about them.
    assert not [n for n in tables.main_table(index, 2, "quick").notes if n.startswith("Training length")]
    budgeted = params_cell(
        {
            "train.epochs": ["10", "10"],
            "train.max_steps": ["67", "67"],
            "runtime.time_budget": ["19.55900356075489", "19.55900356075489"],
        }
    )
    plain = params_cell({"train.epochs": ["10"], "train.max_steps": ["0"]})
    assert tables.training_lengths(budgeted) == {"10 epochs of at most 67 steps (--time-budget 19.6 min)"}
    assert tables.training_lengths(plain) == {"10 epochs of every batch"}
    assert tables.training_lengths(params_cell({})) == set()
    assert tables._length_note(
        {"CRENER": {"10 epochs of every batch"}, "W²NER": {"10 epochs of every batch"}}
    ) == ("Training length: 10 epochs of every batch in every row.")
    assert tables._length_note(
        {"CRENER": tables.training_lengths(budgeted), "W²NER": tables.training_lengths(plain)}
    ) == (
        "Training length DIFFERS between rows (train.epochs / train.max_steps / runtime.time_budget of the "
        "runs): 10 epochs of at most 67 steps (--time-budget 19.6 min): CRENER; 10 epochs of every batch: W²NER."
    )
    assert tables._length_note({}) is None
    # Rows alike over several datasets' budgets (a Table 6 row spans four) are alike, not flagged;
    # a row without runs says nothing.
    both = {"10 epochs of every batch", "10 epochs of at most 67 steps"}
    assert tables._length_note({"full": both, "w/o region": set(both), "w/o MLP": set()}) == (
        "Training length: 10 epochs of at most 67 steps; 10 epochs of every batch in every row."
    )
    # Outside a table (the claim page): both notes of the rows given; no encoder logged, no regime note.
    assert tables.training_notes({"CRENER": (budgeted, "crener"), "W²NER": (plain, "w2ner")}) == [
        tables._length_note(
            {"CRENER": tables.training_lengths(budgeted), "W²NER": tables.training_lengths(plain)}
        )
    ]


def test_header_names_each_build_of_a_shipped_encoder():
    """Runs of two builds of crener-char (one tagged with its weights, one from before the tag)
    are labelled apart, so a table mixing them says so."""
    import pandas as pd

    runs = pd.DataFrame({
        "run_id": ["a", "b", "c"], "start_time": [1, 2, 3], "model": ["crener", "w2ner", "tener"],
        "variant": ["full"] * 3, "dataset": ["resume"] * 3, "msra_protocol": ["lineage"] * 3,
        "seed": [0, 0, 0], "encoder": ["crener-char", "crener-char", "crener-char"],
        "encoder_weights": ["0123456789abcdef" * 4, None, None],
    })  # fmt: skip
    index = tables.RunIndex(runs, sweeps=None)  # TENER (run c) reads no encoder: not listed
    assert index.encoders() == ["crener-char", "crener-char (weights 0123456789ab)"]
    assert "encoder: crener-char, crener-char (weights 0123456789ab)" in index.header("quick")
    # A store collected before the tag existed has no such column.
    assert tables.RunIndex(runs.drop(columns="encoder_weights"), sweeps=None).encoders() == ["crener-char"]
    only_tener = tables.RunIndex(runs[runs["model"] == "tener"], sweeps=None)
    assert only_tener.encoders() == [] and "encoder: none read" in only_tener.header("quick")


def test_time_to_accuracy_puts_each_epoch_at_its_runs_cumulative_minutes(tmp_path):
    import pandas as pd

    from reports.plots import learning_curves, with_minutes

    history = pd.DataFrame({
        "run_id": ["b", "a", "a", "b"], "epoch": [2, 2, 1, 1], "epoch_seconds": [90.0, 30.0, 60.0, 30.0],
        "model": "crener", "variant": "full", "dataset": "weibo", "seed": [1, 0, 0, 1],
        "dev/f1": [0.5, 0.4, 0.2, 0.3],
    })  # fmt: skip
    out = with_minutes(history)
    assert list(zip(out["run_id"], out["epoch"], out["minutes"])) == [
        ("a", 1, 1.0), ("a", 2, 1.5), ("b", 1, 0.5), ("b", 2, 2.0),
    ]  # fmt: skip
    paths = learning_curves(history, tmp_path / "tta", x="minutes")
    assert {p.suffix for p in paths} == {".png", ".pdf"} and all(p.stat().st_size > 500 for p in paths)
