"""crener.registry: model families found through entry points, and dependencies that point one way."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from crener import registry
from crener.config import ModelConfig, build_run_config

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


def test_an_unknown_model_is_an_error() -> None:
    with pytest.raises(KeyError, match="unknown model 'bilstm'"):
        build_run_config(model="bilstm")
    with pytest.raises(ValueError, match="model.name"):
        ModelConfig(name="bilstm")


def test_family_names_come_from_metadata_without_imports() -> None:
    code = (
        "import sys; from crener import registry; print(registry.names()); "
        "assert 'torch' not in sys.modules and 'baselines' not in sys.modules, sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
