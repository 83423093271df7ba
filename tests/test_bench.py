"""The benchmark's own logic: budgets, the lever table, one real speed point (no timings asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import crener.bench as bench
from crener.bench import (
    LEVERS,
    _levers_table,
    budget_overrides,
    cell_budget_like,
    measure_speed,
    memory_probe,
    probe_command,
)
from crener.cli import main as cli_main
from crener.data.batching import make_batches
from crener.data.datasets import load_dataset
from crener.data.split import split_all
from crener.profiles import build_run_config


def test_cell_budget_keeps_the_step_count_of_fixed_batches():
    budget = cell_budget_like(12, 256, 240)
    cfg = build_run_config(dataset="resume", profile="paper")
    data = load_dataset(cfg.data, seed=0)
    pick = np.random.default_rng(0).choice(len(data.train), size=240, replace=False)
    lengths = [len(c.sentence) for c in split_all([data.train[i] for i in sorted(pick)], 256)]
    assert budget == int(12 * np.mean(np.square(np.array(lengths, dtype=float))))
    by_budget = make_batches(lengths, max_cells=budget, batch_size=12, shuffle=False)
    fixed = -(-len(lengths) // 12)
    # About as many optimiser steps (bucket edges and lone long sentences add some), each
    # sentence exactly once.
    assert fixed <= len(by_budget) <= 1.4 * fixed
    assert sorted(i for b in by_budget for i in b) == list(range(len(lengths)))


def test_lever_table_reports_ratios_against_the_default_row():
    default, slow = next(iter(LEVERS)), "fixed batch of 12 sentences"
    row = {"width": "paper", "model": "w2ner", "eval_sent_per_s": 40.0, "peak_rss_bytes": 2**30,
           "sentences_per_batch": 12.0}  # fmt: skip
    rows = [
        {**row, "lever": default, "train_sent_per_s": 12.0, "train_ms_per_sentence": 1000 / 12},
        {**row, "lever": slow, "train_sent_per_s": 4.0, "train_ms_per_sentence": 250.0},
        {"width": "paper", "model": "w2ner", "lever": "bf16 autocast", "error": "RuntimeError: boom"},
    ]
    table = _levers_table(rows)
    lines = table.splitlines()
    assert "1.00x" in lines[2] and "0.33x" in lines[3] and "1.00" in lines[3]  # 1 GiB peak
    assert "error: RuntimeError: boom" in lines[4]


def test_measure_speed_runs_with_and_without_space_to_batch(tmp_path):
    for fast in (True, False):
        cfg = build_run_config(
            profile="smoke", overrides={"runtime.space_to_batch": fast, "train.max_cells": 2000}
        )
        r = measure_speed(cfg, 6)
        assert r["train_sent_per_s"] > 0 and r["eval_sent_per_s"] > 0
        assert r["batches"] >= 1 and r["sentences_per_batch"] * r["batches"] >= 6


def test_speed_suites_train_with_a_cell_budget():
    """`paper` is the fixed-batch recipe; the speed suites measure it with the default lever on."""
    assert budget_overrides("quick", 48, {}) == {}  # the quick profile has its own budget
    paper = budget_overrides("paper", 48, {"model.hidden": 64})
    assert paper["train.max_cells"] == cell_budget_like(12, 256, 48) and paper["model.hidden"] == 64
    assert budget_overrides("paper", 48, {"train.max_cells": 500})["train.max_cells"] == 500


def test_memory_probe_reports_train_and_eval_peaks():
    cfg = build_run_config(profile="smoke")
    r = memory_probe(cfg, 24, batch=2)
    assert (r["length"], r["batch"]) == (24, 2)
    assert set(r) >= {"peak_bytes", "eval_peak_bytes", "bytes_per_cell", "process_peak_bytes"}
    assert r["process_peak_bytes"] >= r["peak_bytes"]
    with pytest.raises(ValueError, match="at most 510 characters"):
        memory_probe(build_run_config(profile="smoke"), 512)


def test_a_probe_is_a_crener_bench_command(monkeypatch, capsys):
    """Each point of the memory and levers suites runs `crener bench --probe` in a fresh process."""
    cmd = probe_command("memory", "quick", "w2ner", "full", ["model.hidden=32"], length=24, batch=2)
    assert cmd[1:5] == ["-m", "crener.cli", "bench", "--probe"]
    seen = {}

    def fake_probe(cfg, length, batch=1):
        seen.update(cfg=cfg, length=length, batch=batch)
        return {"length": length, "batch": batch}

    monkeypatch.setattr(bench, "memory_probe", fake_probe)
    assert cli_main(cmd[3:]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"length": 24, "batch": 2}
    assert (seen["cfg"].model.name, seen["cfg"].model.hidden, seen["length"]) == ("w2ner", 32, 24)
    speed = probe_command("speed", "paper", "crener", "no_mlp", [], sentences=8)
    assert speed[speed.index("--sentences") + 1] == "8" and "--lengths" not in speed


def test_memory_points_measure_the_grid_in_a_fresh_process():
    """In a fresh process (as the memory suite runs each point) the training peak covers at least
    the grid activations a step must hold, and grows with the sentence length: a probe that
    measured nothing (the peak of an already larger heap, clamped at 0) fails here."""
    from crener.bench import _memory_point

    short = _memory_point("quick", "w2ner", "full", 64, 2, [])
    long = _memory_point("quick", "w2ner", "full", 192, 2, [])
    assert "error" not in short and "error" not in long, (short, long)
    cfg = bench.bench_config("quick", "w2ner", "full", {})
    for r, n in ((short, 64), (long, 192)):
        assert r["bytes_per_cell"] == pytest.approx(r["peak_bytes"] / (2 * n * n))
        # The conv input (d_c channels) and output of one grid: a floor well below the real peak.
        # (With the lifetime peak-RSS mark, the step hid under the mark left by loading the model
        # and read 0, even at 192 characters; the probe now resets the mark first.)
        assert r["peak_bytes"] >= 2 * n * n * cfg.model.conv_channels * 4 * 2, r
        assert r["process_peak_bytes"] >= r["peak_bytes"]
    assert long["peak_bytes"] > 3 * short["peak_bytes"]  # 9x the cells; fixed costs blur the rest
