"""experiments.sweeps: TOML parsing, expansion counts and order, dedup, overrides, sharding."""

from __future__ import annotations

from pathlib import Path

import pytest

from crener.identity import run_key
from crener.profiles import VARIANTS, build_run_config
from experiments.sweeps import (
    Cell,
    SweepError,
    expand,
    format_toml_value,
    load_overrides,
    load_sweep,
    plan,
    shard,
    unused_overrides,
)

DATASETS = ("weibo", "resume", "ontonotes4", "msra")
BASELINES = ("w2ner", "bert_softmax", "bert_crf", "tener")


def test_shipped_sweeps_parse() -> None:
    main, ablation = load_sweep("main"), load_sweep("ablation")
    assert main.models == ("crener", *BASELINES) and main.variants == ("full",)
    assert ablation.variants == tuple(VARIANTS) and ablation.models == ("crener",)
    assert main.datasets == ablation.datasets == DATASETS
    assert main.tables == {
        "table2": ("weibo",),
        "table3": ("resume",),
        "table4": ("ontonotes4",),
        "table5": ("msra",),
    }
    assert set(ablation.tables) == {"table6"}
    for sw in (main, ablation):
        assert sw.default_profile == "quick"
        assert sw.seeds_for("smoke") == sw.seeds_for("quick", "msra") == (0,)
        assert sw.seeds_for("full") == sw.seeds_for("paper") == (0, 1, 2, 3, 4)
    # quick: Table 6 has three seeds on Resume and Weibo, the main tables one
    assert main.seeds_for("quick") == (0,)
    assert ablation.seeds_for("quick", "resume") == ablation.seeds_for("quick", "weibo") == (0, 1, 2)


@pytest.mark.parametrize(
    ("profile", "seeds", "datasets"), [("quick", 1, ("ontonotes4", "msra")), ("full", 5, ("msra",))]
)
def test_expand_counts_and_unique_keys(profile: str, seeds: int, datasets: tuple[str, ...]) -> None:
    n = len(datasets)
    main = expand("main", profile, datasets=datasets)
    ablation = expand("ablation", profile, datasets=datasets)
    assert len(main) == 5 * n * seeds and len(ablation) == 9 * n * seeds
    assert len({run_key(c) for c in main + ablation}) == len(main) + len(ablation) - n * seeds
    cells = plan(profile=profile, datasets=datasets)
    assert len(cells) == len({run_key(c.cfg) for c in cells}) == (5 + 9 - 1) * n * seeds
    # the shared `full` CRENER cells keep their first sweep (main)
    full = [c for c in cells if c.cfg.model.name == "crener" and c.cfg.variant == "full"]
    assert {c.sweep for c in full} == {"main"} and len(full) == n * seeds
    assert {c.cfg.profile for c in cells} == {profile}


def test_expand_is_ordered_and_matches_build_run_config() -> None:
    cells = expand("ablation", "smoke", datasets=["resume", "weibo"])
    assert [c.data.dataset for c in cells[:9]] == ["weibo"] * 9  # file order, not argument order
    assert [c.variant for c in cells[:9]] == list(VARIANTS)
    ref = build_run_config(model="crener", variant="no_dconv", profile="smoke", dataset="weibo", seed=0)
    assert run_key(cells[list(VARIANTS).index("no_dconv")]) == run_key(ref)
    seeds = expand("main", "full", datasets=["msra"], models=["crener"])
    assert [c.train.seed for c in seeds] == [0, 1, 2, 3, 4]


def test_only_tables_and_sweeps() -> None:
    t3 = expand("main", "smoke", only="table3")
    assert {c.data.dataset for c in t3} == {"resume"} and len(t3) == 5
    assert expand("ablation", "smoke", only="table3") == []
    assert len(expand("ablation", "smoke", only=["table3", "table6"])) == 36
    assert len(expand("main", "smoke", only="main")) == 20
    cells = plan(profile="smoke", only=["table2", "table6"])
    assert len(cells) == 5 + 36 - 1
    with pytest.raises(SweepError, match="table9"):
        expand("main", "smoke", only="table9")


def test_baselines_expand_without_their_code() -> None:
    # baselines/ may not exist yet: expansion only builds configs.
    cells = expand("main", "smoke", datasets=["weibo"])
    assert [c.model.name for c in cells] == ["crener", *BASELINES]
    assert all(c.variant == "full" for c in cells)


def test_filters_reject_unknown_names() -> None:
    with pytest.raises(SweepError, match="datasets"):
        expand("main", "smoke", datasets=["conll"])
    with pytest.raises(SweepError, match="models"):
        expand("main", "smoke", models=["bilstm"])
    with pytest.raises(SweepError, match="variants"):
        expand("ablation", "smoke", variants=["no_bert"])
    with pytest.raises(SweepError, match="profile"):
        expand("main", "tiny")


def _write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('models = ["crener"]\nvariants = ["full"]\ndatasets = ["resume"]\nextra = 1\n', "unknown key"),
        ('models = ["crener"]\nvariants = ["fulll"]\ndatasets = ["resume"]\n', "fulll"),
        ('models = ["crener"]\nvariants = ["full"]\ndatasets = ["resume"]\n[seeds]\nhuge = [0]\n', "huge"),
        (
            'models = ["crener"]\nvariants = ["full"]\ndatasets = ["resume"]\n[tables]\nt = ["weibo"]\n',
            "weibo",
        ),
        ('models = ["crener"]\nvariants = ["full"]\n', "datasets"),
        ('models = ["crener"\n', "x.toml"),
    ],
)
def test_bad_sweep_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(SweepError, match=match):
        load_sweep(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[[overrides]]\nmodels = ["crener"]\n[overrides.set]\n"model.hiden" = 3\n', "model.hiden"),
        ('[[overrides]]\n[overrides.set]\n"train.seed" = 3\n', "train.seed"),
        ('[[overrides]]\nwhere = 1\n[overrides.set]\n"train.lr" = 3\n', "where"),
        ('[[overrides]]\nmodels = ["crener"]\n', "set"),
        ('sweep = "main"\n', "sweep"),
    ],
)
def test_bad_overrides_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(SweepError, match=match):
        load_overrides(_write(tmp_path, text))


def test_overrides_file_applies_but_never_undoes_an_ablation(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'description = "tuned"\n[source]\nstudy = "s"\n[[overrides]]\nmodels = ["crener"]\ndatasets = ["resume"]\n'
        '[overrides.set]\n"train.lr" = 0.0042\n"model.rounds" = 4\n"model.dilations" = [1, 2]\n',
    )
    cells = plan(profile="smoke", datasets=["resume", "weibo"], configs=[path])
    by = {(c.cfg.model.name, c.cfg.variant, c.cfg.data.dataset): c.cfg for c in cells}
    full = by[("crener", "full", "resume")]
    assert full.train.lr == 0.0042 and full.model.rounds == 4 and full.model.dilations == (1, 2)
    assert by[("crener", "no_enhancement", "resume")].model.rounds == 1  # variant wins
    assert by[("crener", "no_enhancement", "resume")].train.lr == 0.0042
    assert by[("crener", "full", "weibo")].train.lr != 0.0042  # dataset filter
    assert by[("w2ner", "full", "resume")].train.lr != 0.0042  # model filter
    # --set is the last word
    cells = plan(
        profile="smoke", datasets=["resume"], models=["crener"], configs=[path], sets={"train.lr": "0.1"}
    )
    assert {c.cfg.train.lr for c in cells} == {0.1}
    assert unused_overrides(cells, load_overrides(path)) == []
    assert len(unused_overrides(plan(profile="smoke", datasets=["weibo"]), load_overrides(path))) == 1


def test_shard_partitions_in_order() -> None:
    cells = plan(profile="smoke", only="table3")
    parts = [shard(cells, i, 3) for i in range(3)]
    assert sorted(run_key(c.cfg) for p in parts for c in p) == sorted(run_key(c.cfg) for c in cells)
    assert parts[1] == [cells[1], cells[4]]
    with pytest.raises(SweepError):
        shard(cells, 3, 3)
    assert isinstance(cells[0], Cell) and cells[0].label == "crener:full/resume/s0"


def test_format_toml_value_round_trips() -> None:
    import tomllib

    values = {"a": 0.001, "b": 3, "c": True, "d": "paper", "e": (1, 2, 3), "f": 'q"uote'}
    text = "\n".join(f"{k} = {format_toml_value(v)}" for k, v in values.items())
    parsed = tomllib.loads(text)
    assert parsed == {**values, "e": [1, 2, 3]}


def test_seeds_by_dataset(tmp_path) -> None:
    from experiments.sweeps import SweepError, expand, load_sweep

    path = tmp_path / "s.toml"
    path.write_text(
        'models = ["crener"]\nvariants = ["full", "no_region"]\ndatasets = ["resume", "weibo", "msra"]\n'
        "[seeds]\ndefault = [0]\nsmoke = { default = [0], resume = [0, 1, 2] }\n"
    )
    sweep = load_sweep(path)
    assert sweep.seeds_for("smoke", "resume") == (0, 1, 2) and sweep.seeds_for("smoke", "msra") == (0,)
    assert sweep.seeds_for("smoke") == (0, 1, 2) and sweep.seeds_for("quick", "resume") == (0,)
    cells = expand(sweep, "smoke")
    got = [(c.data.dataset, c.train.seed) for c in cells]
    # seed-major order: every dataset's seed 0 first, then the extra seeds of resume
    assert (
        got
        == [(d, 0) for d in ("resume", "weibo", "msra") for _ in range(2)]
        + [("resume", 1)] * 2
        + [("resume", 2)] * 2
    )
    assert len(expand(sweep, "smoke", seeds=[0, 1])) == 12  # --seeds applies to every dataset
    path.write_text(
        'models = ["crener"]\nvariants = ["full"]\ndatasets = ["resume"]\n[seeds]\nquick = { ontonotes4 = [1] }\n'
    )
    with pytest.raises(SweepError, match="not a dataset of this sweep"):
        load_sweep(path)


def test_quick_plan_has_three_table6_seeds_on_resume_and_weibo() -> None:
    cells = plan(profile="quick")
    per = {}
    for c in cells:
        if c.cfg.model.name == "crener":
            per.setdefault((c.cfg.data.dataset, c.cfg.variant), set()).add(c.cfg.train.seed)
    for (dataset, _variant), seeds in per.items():
        assert seeds == ({0, 1, 2} if dataset in ("resume", "weibo") else {0})
    assert len(cells) == 52 + 2 * 9 * 2  # one seed everywhere, two more Table 6 seeds on two datasets
