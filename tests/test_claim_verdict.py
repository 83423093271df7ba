"""The Weibo claim (issue 35): its sweep (experiments/configs/claim.toml)."""

from __future__ import annotations

import pytest

from crener.cli import main as cli_main
from crener.identity import run_key
from experiments.sweeps import SWEEP_NAMES, expand, load_sweep, plan, sweeps_for

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
