"""What the measuring tools (``bench``, ``roofline``, ``gpucheck``) measure: the width presets and
their configs on Resume, and a fresh model over a seeded sample of Resume's training sentences."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crener.config import RunConfig
from crener.data.schema import Sentence
from crener.profiles import build_run_config

# width preset -> (profile whose model widths it uses, extra overrides)
WIDTHS: dict[str, tuple[str, dict[str, Any]]] = {
    "quick": ("quick", {}),
    "paper": (
        "paper",
        {
            "model.encoder": "embedded",
            "model.embedded_hidden": 256,
            "model.embedded_layers": 2,
            "model.embedded_heads": 4,
            "model.embedded_ff": 1024,
            "train.bf16": False,
            # The reference setting (the released code's fixed batches of 12); the speed
            # suites put the default cell budget on top (`budget_overrides`), the levers flip it.
            "train.batch_size": 12,
            "train.max_cells": 0,
            "train.sorted_batches": False,
        },
    ),
    # The `full` profile as trained on CPU: its widths over the shipped encoder (roofline suite).
    "full": ("full", {}),
}  # fmt: skip
# Width presets each suite measures unless --widths says otherwise.
DEFAULT_WIDTHS = ("quick", "paper")
ROOFLINE_WIDTHS = ("paper", "full")


def bench_config(width: str, model: str, variant: str, overrides: dict[str, Any]) -> RunConfig:
    profile, extra = WIDTHS[width]
    flat = {**extra, "runtime.progress": False, **overrides}
    return build_run_config(model=model, variant=variant, profile=profile, dataset="resume", overrides=flat)


def sample_sentences(sentences: list[Sentence], n: int) -> list[Sentence]:
    """``n`` of ``sentences`` (all if fewer), drawn with seed 0, in their order."""
    pick = np.random.default_rng(0).choice(len(sentences), size=min(n, len(sentences)), replace=False)
    return [sentences[i] for i in sorted(pick)]


def sample_parts(cfg: RunConfig, n_sentences: int, device: torch.device):  # -> crener.train.RunParts
    """A fresh model of ``cfg`` on ``device`` and the training examples of ``n_sentences`` of its
    training sentences (:func:`sample_sentences`)."""
    from crener.data.split import split_all
    from crener.train import build_parts

    def sample(train: list[Sentence]) -> list:
        return split_all(sample_sentences(train, n_sentences), cfg.data.max_len)

    with tempfile.TemporaryDirectory() as tmp:
        return build_parts(cfg, cfg.runtime.data_root, Path(tmp), device, sample=sample)
