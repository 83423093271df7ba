"""Shared fixtures: a few hand-written sentences and a tiny embedded encoder.

Every test runs offline from model hubs and with a fixed thread count, so timings and
floating-point reductions do not depend on the machine's core count.
"""

from __future__ import annotations

import os

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
