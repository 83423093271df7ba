"""`crener curves`: the learning-start report from step-level dev curves."""

from __future__ import annotations

import pandas as pd

from experiments.curves import BEFORE_QUICK, write_curves


def _result(first, f1s):
    curve = [
        {"step": 25 * (i + 1), "train/loss": 1.0 / (i + 1), "dev/f1": f, "dev/f1_best_shift": f + 0.1,
         "dev/best_shift": 2.0}
        for i, f in enumerate(f1s)
    ]  # fmt: skip
    summary = {
        "encoder": "crener-char", "first_step_dev_f1_positive": first, "best_epoch": 2,
        "dev": {"f1": max(f1s)}, "test": {"f1": 0.5}, "dev_best_shift": {"shift": 2.0, "f1": 0.6},
        "seconds": 12.0,
    }  # fmt: skip
    return {"summary": summary, "curve": curve, "run_id": "abc123"}


def test_write_curves_tables_every_step_and_the_first_positive(tmp_path):
    results = {"main-before-13": _result(None, [0.0, 0.0]), "new": _result(50, [0.0, 0.2, 0.4])}
    write_curves(results, tmp_path / "crener-weibo")
    md = (tmp_path / "crener-weibo.md").read_text()
    assert "first step with dev F1 > 0: never" in md and "first step with dev F1 > 0: 50" in md
    assert "| new | 75 | 0.3333 | 0.4000 | 0.5000 (+2.0) |" in md
    frame = pd.read_csv(tmp_path / "crener-weibo.csv")
    assert len(frame) == 5 and list(frame["setting"].unique()) == ["main-before-13", "new"]
    assert (tmp_path / "crener-weibo.png").stat().st_size > 1000


def test_before_setting_is_the_old_quick_encoder_and_start():
    assert BEFORE_QUICK["model.encoder"] == "embedded" and BEFORE_QUICK["model.prior_bias"] is False
