"""crener.registry: model families found through entry points, and dependencies that point one way."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from crener import registry
from crener.config import ModelConfig
from crener.errors import ConfigError, CrenerError
from crener.profiles import build_run_config

PACKAGE = Path(registry.__file__).resolve().parent
FAMILIES = ("crener", "w2ner", "bert_softmax", "bert_crf", "tener")


def test_every_family_is_registered_with_what_the_suite_needs() -> None:
    assert set(registry.names()) == set(FAMILIES)
    assert list(registry.families()) == list(FAMILIES)  # their `order`: sweeps and report rows
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, family in registry.families().items():
        assert family.name == name and family.label and family.search_space is not None
        assert family.fields is not None and family.fields <= fields
        assert {k.partition(".")[0] for k in family.defaults} <= {"model"}
        flat = build_run_config(model=name, profile="smoke").flatten()
        assert {k: flat[k] for k in family.defaults} == dict(family.defaults)
    assert [f.label for f in registry.families().values() if f.paper_row] == ["CRENER", "W²NER"]


def test_a_familys_profile_settings_follow_the_profile_and_yield_to_variants_and_overrides() -> None:
    from crener.profiles import PROFILES

    quick = PROFILES["quick"]
    # quick reads the encoder frozen in every row (one regime); the taggers' probes learn faster
    for model in ("crener", "w2ner", "bert_softmax", "bert_crf"):
        assert (
            build_run_config(model=model, profile="quick").train.encoder_lr
            == quick["train.encoder_lr"]
            == 0.0
        )
    assert build_run_config(model="crener", profile="quick").train.lr == quick["train.lr"]
    for tagger in ("bert_softmax", "bert_crf"):
        assert build_run_config(model=tagger, profile="quick").train.lr == 1e-2
    # full fine-tunes it in every row
    for model in ("crener", "w2ner", "bert_softmax", "bert_crf"):
        assert (
            build_run_config(model=model, profile="full").train.encoder_lr
            == PROFILES["full"]["train.encoder_lr"]
        )
    assert build_run_config(model="tener", profile="quick").train.lr == 3e-3
    # only in the profile named: full keeps its own rates
    assert build_run_config(model="tener", profile="full").train.lr == PROFILES["full"]["train.lr"]
    # the user's override wins
    cfg = build_run_config(model="bert_crf", profile="quick", overrides={"train.encoder_lr": 1e-4})
    assert cfg.train.encoder_lr == 1e-4
    for name, family in registry.families().items():
        assert set(family.profile_defaults) <= set(PROFILES), name
        for profile in family.profile_defaults:
            build_run_config(model=name, profile=profile)  # its keys are real config fields


def test_every_built_in_familys_settings_are_data_that_agree_with_its_module() -> None:
    """crener/families.toml holds them, so building their configs loads no model module (the
    subprocess test of tests/test_config.py); the loaded family carries the same settings."""
    with registry.FAMILIES_FILE.open("rb") as f:
        assert set(tomllib.load(f)["families"]) == set(FAMILIES)
    for name in FAMILIES:
        settings, family = registry.settings(name), registry.get(name)
        assert {k: getattr(family, k) for k in registry.FAMILY_SETTINGS} == {
            k: getattr(settings, k) for k in registry.FAMILY_SETTINGS
        }
        assert settings.reads_char_vectors == registry.reads(name, "char_vectors")
    assert [n for n in FAMILIES if registry.settings(n).ablations] == ["crener"]


def test_a_setting_is_declared_in_the_table_or_the_module_never_both() -> None:
    table = registry.settings("w2ner")
    # w2ner as its module declares it: the settings left to its table
    bare = dataclasses.replace(registry.get("w2ner"), defaults={}, check=None)
    assert registry._with_table(bare, table) == registry.get("w2ner")
    with pytest.raises(CrenerError, match="both in its ModelFamily and in"):
        registry._with_table(dataclasses.replace(bare, defaults={"model.rounds": 1}), table)
    with pytest.raises(CrenerError, match="reads_char_vectors"):
        registry._with_table(bare, dataclasses.replace(table, reads_char_vectors=True))
    with pytest.raises(CrenerError, match="has keys"):
        registry._read_table("w2ner", {"modle": {"rounds": 1}})


def _check_extra(cfg: ModelConfig) -> None:
    if cfg.emb_dropout > 0.5:
        raise ValueError("extra: model.emb_dropout above 0.5")


# A family as another distribution adds one: everything in its ModelFamily, no table.
EXTRA = registry.ModelFamily(
    name="extra",
    build_model=lambda cfg, task, encoder, runtime: None,
    build_task=lambda cfg, types: None,
    fields=frozenset({"emb_dropout", "tf_dropout"}),
    defaults={"model.tf_dropout": 0.25},  # one that no profile sets
    profile_defaults={"quick": {"train.lr": 0.0042}},
    check=_check_extra,
)


def test_a_family_without_a_table_declares_its_settings_in_its_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eps = {
        **registry.plugins(registry.GROUP),
        "extra": EntryPoint("extra", f"{__name__}:EXTRA", registry.GROUP),
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    try:
        cfg = build_run_config(model="extra", profile="quick")
        assert (cfg.model.tf_dropout, cfg.train.lr) == (0.25, 0.0042)
        assert registry.get("extra") is EXTRA and not registry.settings("extra").reads_char_vectors
        with pytest.raises(ConfigError, match="takes variant=full"):
            build_run_config(model="extra", variant="no_mlp")
        with pytest.raises(ConfigError, match="above 0.5"):
            build_run_config(model="extra", overrides={"model.emb_dropout": 0.6})
        with pytest.raises(ConfigError, match="char_vectors"):
            build_run_config(model="extra", overrides={"model.char_vectors": "default"})
    finally:  # the cached family would outlive the patched entry points
        registry.get.cache_clear()
        registry.settings.cache_clear()


def test_an_unknown_model_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown model 'bilstm'"):
        build_run_config(model="bilstm")
    with pytest.raises(ValueError, match="model.name"):
        registry.check_model(ModelConfig(name="bilstm"))  # a config is checked where a run is built


def test_family_names_come_from_metadata_without_imports() -> None:
    code = (
        "import sys; from crener import registry; print(registry.names()); "
        "assert 'torch' not in sys.modules and 'baselines' not in sys.modules, sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.partition(".")[0])
    return out


def test_crener_imports_nothing_built_on_it() -> None:
    """crener/ is the base: baselines/, experiments/ and reports/ import it, never the reverse
    (they reach crener through the entry points of pyproject.toml)."""
    offenders = {
        str(p.relative_to(PACKAGE.parent)): sorted(
            _imported_packages(p) & {"baselines", "experiments", "reports"}
        )
        for p in PACKAGE.rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert not [p for p in PACKAGE.rglob("*.py") if "import_module" in p.read_text(encoding="utf-8")]


def test_every_subcommand_is_found_through_its_entry_point() -> None:
    from crener.cli import COMMANDS_GROUP, build_parser

    commands = registry.plugins(COMMANDS_GROUP)
    assert {"data", "train", "evaluate", "predict", "bench", "pretrain", "migrate", "reproduce", "tune",
            "ui", "curves", "report"} <= set(commands)  # fmt: skip
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(commands)


def test_a_source_checkout_declares_the_installed_entry_points() -> None:
    """Uninstalled (the GPU check's copied tree), pyproject.toml stands in for the metadata."""
    from importlib.metadata import entry_points

    for group in (registry.GROUP, "crener.commands"):
        installed = {ep.name: ep for ep in entry_points(group=group)}
        declared = registry._source_tree_entry_points(group)
        assert declared.keys() == installed.keys() and installed
        # A module that moved keeps a shim at its old path until the package is reinstalled
        # (crener.migrate): the two paths must load the same object.
        for name, ep in declared.items():
            assert ep.value == installed[name].value or ep.load() is installed[name].load(), name
