"""crener.registry: model families found through entry points, and dependencies that point one way."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from crener import registry
from crener.config import ModelConfig
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
    # quick freezes the encoder for the grid models; the fine-tuned baselines of the paper fine-tune it
    assert (
        build_run_config(model="crener", profile="quick").train.encoder_lr == quick["train.encoder_lr"] == 0.0
    )
    for tagger in ("bert_softmax", "bert_crf"):
        assert build_run_config(model=tagger, profile="quick").train.encoder_lr == 1e-4
        assert build_run_config(model=tagger, profile="quick").train.lr == quick["train.lr"]
    assert build_run_config(model="tener", profile="quick").train.lr == 3e-3
    # only in the profile named: full keeps its own rates
    assert build_run_config(model="tener", profile="full").train.lr == PROFILES["full"]["train.lr"]
    # the user's override wins
    cfg = build_run_config(model="bert_crf", profile="quick", overrides={"train.encoder_lr": 0.0})
    assert cfg.train.encoder_lr == 0.0
    for name, family in registry.families().items():
        assert set(family.profile_defaults) <= set(PROFILES), name
        for profile in family.profile_defaults:
            build_run_config(model=name, profile=profile)  # its keys are real config fields


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
        installed = {(ep.name, ep.value) for ep in entry_points(group=group)}
        declared = {(ep.name, ep.value) for ep in registry._source_tree_entry_points(group).values()}
        assert declared == installed and installed
