"""reports.timing: the time-to-accuracy page (crener report --time-to-accuracy) reads each run's
curve into the minutes it took to its best dev F1 and to the dataset's target, keeps two encoders
of one model and seed apart, and writes a stamped page with its figure and every run id."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from reports import timing


def curve(f1s, seconds, order=None):
    df = pd.DataFrame({"epoch": range(1, len(f1s) + 1), "dev/f1": f1s, "epoch_seconds": seconds})
    return df.iloc[order] if order is not None else df


def test_curve_row_times_the_best_and_the_target_from_the_cumulative_epoch_seconds():
    # Stored out of order on purpose: the minutes are cumulative in epoch order.
    hist = curve([0.50, 0.93, 0.95, 0.95], [60, 60, 120, 60], order=[2, 0, 3, 1])
    row = timing.curve_row(hist, 0.93)
    assert row == {"best": 0.95, "at": 4.0, "reached": 2.0}  # the first epoch with the best value
    assert timing.curve_row(hist, 0.96)["reached"] != timing.curve_row(hist, 0.96)["reached"]  # NaN: never
    assert math.isnan(timing.curve_row(hist, None)["reached"])
    # An epoch without a dev score has no F1, but its seconds passed.
    gap = curve([0.4, float("nan"), 0.6], [30, 30, 30])
    assert timing.curve_row(gap, 0.5) == {"best": 0.6, "at": 1.5, "reached": 1.5}
    empty = timing.curve_row(pd.DataFrame(columns=["epoch", "dev/f1", "epoch_seconds"]), 0.5)
    assert all(math.isnan(v) for v in empty.values())


def run(
    run_id, key, start, *, encoder="crener-char", state="finished", sweep="adhoc", variant="full", **extra
):
    return {
        "run_id": run_id, "key": key, "start_time": start, "state": state, "sweep": sweep,
        "model": extra.pop("model", "crener"), "variant": variant, "dataset": extra.pop("dataset", "resume"),
        "seed": 0, "encoder": encoder, "seconds": 600.0, "best/test_f1": 0.9,
        "params.train.encoder_lr": "0.0001", "params.runtime.time_budget": "20.0",
        "params.train.max_steps": "122", **extra,
    }  # fmt: skip


def test_latest_runs_keeps_two_encoders_of_one_seed_and_the_latest_run_of_a_key():
    runs = pd.DataFrame(
        [
            run("old", "k1", 1),
            run("new", "k1", 2),  # the same key run again: supersedes "old"
            run("cont", "k2", 3, encoder="/x/.crener/encoders/cont-splits-2400"),  # same model and seed
            run("failed", "k3", 4, state="failed"),
            run("tuned", "k4", 5, sweep="tune"),
            run("ablated", "k5", 6, variant="no_region"),
            run("untagged-1", None, 7),  # logged before run keys: each its own row
            run("untagged-2", None, 8),
        ]
    )
    assert list(timing.latest_runs(runs, ("adhoc",))["run_id"]) == ["new", "cont", "untagged-1", "untagged-2"]
    assert list(timing.latest_runs(runs, ("tune",))["run_id"]) == ["tuned"]


def test_the_page_shows_each_run_with_its_minutes_targets_and_ids():
    runs = pd.DataFrame(
        [
            run("aaaaaaaa-1", "k1", 1, encoder="/x/.crener/encoders/cont-splits-2400"),
            run("bbbbbbbb-2", "k2", 2, dataset="weibo", **{"params.runtime.time_budget": "0.0"}),
            run(
                "cccccccc-3",
                "k3",
                3,
                model="tener",
                dataset="msra",
                **{"params.runtime.time_budget": "10.6914"},
            ),
        ]
    )
    history = {
        "aaaaaaaa-1": curve([0.90, 0.94], [300, 300]),
        "bbbbbbbb-2": curve([0.40, 0.50], [120, 120]),
        "cccccccc-3": curve([0.80], [60]),
    }
    rows = timing.timing_rows(runs, history)
    first = rows.iloc[0]
    assert first["encoder"] == "cont-splits-2400"
    assert first["encoder regime"] == "fine-tuned at 0.0001"
    assert (first["budget min"], first["steps an epoch"], first["run min"]) == ("20", "122", 10.0)
    assert (first["best dev F1"], first["at min"], first["reached at min"]) == (0.94, 10.0, 10.0)
    assert rows.iloc[1]["budget min"] == "—" and math.isnan(rows.iloc[1]["reached at min"])  # 0.50 < 0.55
    assert rows.iloc[2]["encoder"] == "—" and rows.iloc[2]["encoder regime"] == "no pretrained encoder"
    assert rows.iloc[2]["budget min"] == "10.7"  # a plan's share of its minutes, to a tenth
    assert math.isnan(rows.iloc[2]["target"])  # MSRA has no target
    page = timing.timing_page(rows, "STAMP", "fig.png", list(runs["run_id"]))
    lines = page.splitlines()
    assert lines[:3] == ["# Time to accuracy", "", "STAMP"]
    runs_part = lines[: lines.index("## Over seeds")]
    table = [ln for ln in runs_part if ln.startswith("| crener") or ln.startswith("| tener")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table]
    assert cells[0] == [
        "crener", "resume", "cont-splits-2400", "fine-tuned at 0.0001", "0", "20", "122", "10.0",
        "94.00", "10.0", "93.00", "10.0", "90.00", "aaaaaaaa",
    ]  # fmt: skip
    assert cells[1][5] == "—" and cells[1][11] == "never" and cells[1][10] == "55.00"
    assert cells[2][10] == "—" and cells[2][11] == "never"
    assert "![dev F1 against minutes](fig.png)" in lines
    assert all(f"- {r}" in lines for r in runs["run_id"])
    empty = timing.timing_page(rows.iloc[:0], "STAMP", None, []).splitlines()
    assert "No finished runs." in empty and "- none" in empty and not any(ln.startswith("![") for ln in empty)


def test_the_summary_gives_each_setting_its_mean_and_spread_over_seeds():
    runs = pd.DataFrame(
        [
            run("a", "k1", 1, seed=0, **{"best/test_f1": 0.50}),
            run("b", "k2", 2, seed=1, **{"best/test_f1": 0.54, "params.train.max_steps": "99"}),
            run("c", "k3", 3, seed=2, **{"best/test_f1": 0.58}),
            run("d", "k4", 4, seed=0, encoder="other"),  # another setting: its own row
            run("e", "k5", 5, seed=0, dataset="msra"),  # no target
            # Without a budget the step cap sets the run: two caps, two rows.
            run("f", "k6", 6, seed=0, dataset="msra", **{"params.runtime.time_budget": "0"}),
            run(
                "g",
                "k7",
                7,
                seed=1,
                dataset="msra",
                **{"params.runtime.time_budget": "0", "params.train.max_steps": "9"},
            ),
        ]
    )
    history = {
        "a": curve([0.90, 0.94], [300, 300]),  # reaches 0.93 at 10 min
        "b": curve([0.93, 0.92], [360, 300]),  # at 6 min
        "c": curve([0.91, 0.92], [300, 300]),  # never
        "d": curve([0.80], [60]),
        "e": curve([0.70], [60]),
        "f": curve([0.70], [60]),
        "g": curve([0.70], [60]),
    }
    summary = timing.summary_rows(timing.timing_rows(runs, history))
    assert len(summary) == 5
    first = summary.iloc[0]
    assert first["steps an epoch"] == "99, 122"  # a budget's seeds may get different caps: one setting
    assert (first["encoder"], first["seeds"], first["reached target"]) == ("crener-char", "0, 1, 2", "2/3")
    assert first["best dev F1"] == pytest.approx((0.93, 0.01))  # 0.94, 0.93, 0.92
    assert first["test F1"] == pytest.approx((0.54, 0.04))
    assert first["reached at min"] == pytest.approx((8.0, math.sqrt(8)))  # of the two that reached it
    assert summary.iloc[1]["encoder"] == "other" and summary.iloc[1]["seeds"] == "0"
    assert math.isnan(summary.iloc[1]["test F1"][1])  # one seed: no spread
    assert summary.iloc[2]["reached target"] == "—"
    assert list(summary.iloc[3:]["steps an epoch"]) == ["122", "9"] and list(summary.iloc[3:]["seeds"]) == [
        "0",
        "1",
    ]
    lines = timing.timing_page(
        timing.timing_rows(runs, history), "STAMP", None, list(runs["run_id"])
    ).splitlines()
    over = lines[lines.index("## Over seeds") :]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in over if ln.startswith("| crener")]
    assert cells[0][6:] == ["0, 1, 2", "10.0", "93.00 ± 1.00", "2/3", "8.0 ± 2.8", "54.00 ± 4.00"]
    assert cells[1][6:] == ["0", "10.0", "80.00 ± –", "0/1", "never", "90.00 ± –"]
    assert cells[2][9:11] == ["—", "never"]


@pytest.fixture
def store(tmp_path):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("crener-adhoc-full", artifact_location=(tmp_path / "art").as_uri())
    for i, (model, encoder) in enumerate(
        (("crener", "crener-char"), ("crener", "/e/cont"), ("w2ner", "crener-char"))
    ):
        tags = {
            "crener.key": f"key{i}", "crener.sweep": "adhoc", "crener.model": model, "crener.variant": "full",
            "crener.dataset": "weibo", "crener.profile": "full", "crener.seed": "0", "crener.encoder": encoder,
            "crener.state": "finished", "crener.git_commit": "abc1234", "crener.machine": "a CPU, 2 cores",
        }  # fmt: skip
        rid = client.create_run(exp, tags=tags).info.run_id
        curve_points = [
            Metric(k, v, 0, epoch)
            for epoch in (1, 2)
            for k, v in (("dev/f1", 0.3 * epoch + 0.01 * i), ("epoch_seconds", 90.0))
        ]
        client.log_batch(
            rid,
            metrics=[Metric("best/test_f1", 0.5, 0, 0), Metric("seconds", 200.0, 0, 0), *curve_points],
            params=[Param("train.encoder_lr", "0.0001"), Param("runtime.time_budget", "15.0")],
        )
        client.set_terminated(rid, "FINISHED")
    return uri


def test_write_timing_page_reads_the_store_and_writes_the_page_and_its_figure(store, tmp_path):
    page = timing.write_timing_page(
        "full", tmp_path / "out" / "tta.md", tracking_uri=store, sweeps=("adhoc",)
    )
    text = page.read_text(encoding="utf-8")
    assert "Runs: 3 finished of 3 logged for profile `full`" in text and "a CPU, 2 cores" in text
    per_run, over_seeds = text.split("## Over seeds")
    rows = [ln for ln in per_run.splitlines() if ln.startswith("| crener") or ln.startswith("| w2ner")]
    assert len(rows) == 3
    # One seed a setting here, so the summary has a row for each run, without a spread.
    summary = [ln for ln in over_seeds.splitlines() if ln.startswith("| crener") or ln.startswith("| w2ner")]
    best_dev = sorted(ln.split("|")[9].strip() for ln in summary)
    assert best_dev == ["60.00 ± –", "61.00 ± –", "62.00 ± –"]
    # Weibo's target 0.55: reached at the second evaluation (0.60 + 0.01 i), after 3.0 minutes.
    assert all(ln.split("|")[12].strip() == "3.0" for ln in rows)
    assert "| cont " in rows[1] or "| cont |" in rows[1].replace("  ", " ")
    assert (tmp_path / "out" / "tta.png").stat().st_size > 0
    assert "![dev F1 against minutes](tta.png)" in text
    # One line per (model, encoder, setting): the three runs are three lines, none averaged; each
    # is labelled by its budget (a budgeted run's step cap is the probe's, not the setting).
    with pytest.MonkeyPatch.context() as mp:
        drawn = lines_drawn(mp)
        timing.write_timing_page("full", tmp_path / "again.md", tracking_uri=store, sweeps=("adhoc",))
    assert sorted(label for label, _, _ in drawn) == [
        "crener cont (15 min budget)", "crener crener-char (15 min budget)", "w2ner crener-char (15 min budget)",
    ]  # fmt: skip
    assert [ys for label, ys, _ in drawn if label.startswith("crener cont")] == [[31.0, 61.0]]


def lines_drawn(monkeypatch) -> list[tuple[str, list[float], object]]:
    """Every line the figures draw from now on, as (label, y values, colour)."""
    from matplotlib import pyplot as plt

    drawn = []
    original = plt.Axes.plot

    def spy(ax, xs, ys, *args, label=None, color=None, **kwargs):
        drawn.append((label, list(ys), color))
        return original(ax, xs, ys, *args, label=label, color=color, **kwargs)

    monkeypatch.setattr(plt.Axes, "plot", spy)
    return drawn


def test_the_seed_band_stays_within_0_and_100(tmp_path, monkeypatch):
    from matplotlib import pyplot as plt

    from reports import plots

    bands = []
    original = plt.Axes.fill_between

    def spy(ax, xs, low, high, **kwargs):
        bands.append((list(low), list(high)))
        return original(ax, xs, low, high, **kwargs)

    monkeypatch.setattr(plt.Axes, "fill_between", spy)
    # Two seeds: 0.0 and 0.6 at epoch 1 (mean 30, std 42.4), 0.9 and 1.0 at epoch 2 (std 7.1).
    history = pd.DataFrame(
        {
            "model": "crener", "variant": "full", "dataset": "weibo", "seed": [0, 1, 0, 1],
            "epoch": [1, 1, 2, 2], "dev/f1": [0.0, 0.6, 0.9, 1.0],
        }
    )  # fmt: skip
    plots.learning_curves(history, tmp_path / "curves")
    [(low, high)] = bands
    assert low == pytest.approx([0.0, 95 - 50 * math.sqrt(0.02)])
    assert high == pytest.approx([30 + 30 * math.sqrt(2), 100.0])


def test_a_line_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """Weibo has lines A and B, Resume only B: B is drawn in one colour in both panels."""
    from reports import plots

    drawn = lines_drawn(monkeypatch)
    rows = [
        {
            "model": m,
            "encoder": "e",
            "dataset": ds,
            "seed": 0,
            "run_id": f"{m}{ds}",
            "epoch": 1,
            "dev/f1": 0.5,
        }
        for m, ds in (("a", "weibo"), ("b", "weibo"), ("b", "resume"))
    ]
    plots.learning_curves(pd.DataFrame(rows), tmp_path / "c", by=("model", "encoder"))
    colours = {}
    for label, _, colour in drawn:
        colours.setdefault(label, set()).add(colour)
    assert sorted(colours) == ["a e", "b e"]
    assert all(len(c) == 1 for c in colours.values()) and colours["a e"] != colours["b e"]
    assert len([1 for label, _, _ in drawn if label == "b e"]) == 2


def test_a_figure_line_is_labelled_by_its_budget_else_its_step_cap():
    assert timing._setting_label("15", "227") == "(15 min budget)"
    assert timing._setting_label("—", "122") == "(122 steps an epoch)"
    assert timing._setting_label("—", "—") == "(every batch an epoch)"
