"""Shared fixtures: a few hand-written sentences and a tiny embedded encoder.

Every test runs offline from model hubs and with a fixed thread count, so timings and
floating-point reductions do not depend on the machine's core count.
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from crener.data.schema import Entity, Sentence  # noqa: E402

torch.set_num_threads(1)


def _sent(text: str, *spans: tuple[int, int, str]) -> Sentence:
    return Sentence(tuple(text), tuple(Entity.span(s, e, t) for s, e, t in spans))


# Nested-free, adjacent and single-character entities; types as in Resume.
SENTENCES = [
    _sent("张三是北京大学的教授", (0, 2, "NAME"), (3, 7, "ORG"), (8, 10, "TITLE")),
    _sent("李四任华为公司总经理", (0, 2, "NAME"), (3, 7, "ORG"), (7, 10, "TITLE")),
    _sent("王五，汉族，本科学历", (0, 2, "NAME"), (3, 4, "RACE"), (6, 8, "EDU")),
    _sent("他曾在上海工作", (3, 5, "LOC")),
    _sent("赵六现任董事长兼总裁", (0, 2, "NAME"), (4, 7, "TITLE"), (8, 10, "TITLE")),
    _sent("中国国籍，无境外居留权", (0, 2, "CONT")),
]
TYPES = ("CONT", "EDU", "LOC", "NAME", "ORG", "RACE", "TITLE")


@pytest.fixture(scope="session")
def sentences() -> list[Sentence]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 1-layer, 32-wide random BERT over the fixture characters (HF layout on disk)."""
    from crener.config import ModelConfig
    from crener.encoder import build_embedded_encoder

    chars = {c for s in SENTENCES for c in s.chars}
    cfg = ModelConfig(embedded_hidden=32, embedded_layers=1, embedded_heads=2, embedded_ff=64)
    return build_embedded_encoder(chars, cfg, tmp_path_factory.mktemp("enc") / "encoder", seed=0)


@pytest.fixture
def tiny_encoder(tiny_encoder_dir):
    """A fresh (CharEncoder, CharTokenizer) loaded through the standard from_pretrained path."""
    from crener.encoder import CharEncoder, load_pretrained

    bert, tok = load_pretrained(tiny_encoder_dir)
    return CharEncoder(bert, last4_mean=True), tok


# In CI (CRENER_STRICT_SKIPS=1, set by .ci/run) a skipped test is a failure: a missing font,
# LaTeX or dataset must be installed there, never silently leave a claim untested.
STRICT_SKIPS = os.environ.get("CRENER_STRICT_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CRENER_STRICT_SKIPS=1 (CI must run every test): {reason}"


# ------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets (``../shared/data`` or ``$CRENER_DATA``); skipped where they are missing,
    which CI turns into a failure (CRENER_STRICT_SKIPS)."""
    from crener.data.datasets import resolve_data_root
    from crener.errors import DataError

    try:
        return resolve_data_root()
    except DataError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A synthetic "resume" dataset whose three splits are the hand-written SENTENCES."""
    from tests.helpers import write_bmes

    root = tmp_path_factory.mktemp("data")
    (root / "resume").mkdir()
    for split in ("train", "dev", "test"):
        write_bmes(root / "resume" / f"{split}.char.bmes", SENTENCES)
    return root


@pytest.fixture
def fake_fit(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``crener.train`` replaced by the fake for this test (``.CALLS`` lists fitted keys)."""
    from tests.helpers import fake_train_module

    module = fake_train_module()
    monkeypatch.setitem(sys.modules, "crener.train", module)
    return module


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh store in ``tmp_path``; ``MLFLOW_TRACKING_URI`` and ``CRENER_RUNS`` point there."""
    from tests.helpers import mlflow_template

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template(), db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CRENER_RUNS", str(tmp_path / "runs"))
    return uri


@pytest.fixture(autouse=True)
def _no_global_state_leaks():
    """Each test starts from, and leaves behind, the same process-wide state: torch's thread
    count (1, set above) and RNG, numpy's and Python's RNGs, and matplotlib's rcParams (the CJK
    font setup changes them)."""
    import random

    import matplotlib
    import numpy as np

    threads = torch.get_num_threads()
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    with matplotlib.rc_context():
        yield
    torch.set_num_threads(threads)
    torch.set_rng_state(torch_rng)
    np.random.set_state(np_rng)
    random.setstate(py_rng)
