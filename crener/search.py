"""Building blocks of the tuning search spaces, and CRENER's own space.

A family's space (:attr:`crener.registry.ModelFamily.search_space`) is one function
``(trial, base) -> {config key: value}``: Optuna parameter names are config keys
(``train.lr``), so a trial's values are ``--set`` overrides. ``trial`` is anything with Optuna's
``suggest_float``/``suggest_int``/``suggest_categorical`` (nothing here imports Optuna), and
``base`` the resolved config of the study's profile: ranges are centred on its own values, so one
space serves the smoke (tiny) to paper (BERT-base) budgets.
"""

from __future__ import annotations

import math
from typing import Any

from crener.config import RunConfig

# Spaces are centred on the profile's defaults, which learn: learning rates within [base / span,
# base * span] (log scale), dropouts within base +- DROPOUT_SPAN. Wider spaces (10x, dropout 0-0.5)
# spent most trials on the all-negative plateau.
LR_SPAN = 4.0
DROPOUT_SPAN = 0.15
MAX_DROPOUT = 0.6


def learning_rate(trial: Any, key: str, base: float) -> dict[str, float]:
    """``{key: lr}`` around ``base``; nothing for 0 (a frozen encoder stays frozen)."""
    if base <= 0:
        return {}
    return {key: trial.suggest_float(key, base / LR_SPAN, base * LR_SPAN, log=True)}


def learning_rates(trial: Any, base: RunConfig) -> dict[str, float]:
    """The head's and the encoder's learning rates (every family trains both groups)."""
    return {
        **learning_rate(trial, "train.lr", base.train.lr),
        **learning_rate(trial, "train.encoder_lr", base.train.encoder_lr),
    }


def dropout(trial: Any, key: str, base: float) -> float:
    low, high = max(0.0, base - DROPOUT_SPAN), min(MAX_DROPOUT, base + DROPOUT_SPAN)
    return trial.suggest_float(key, low, max(high, low))


def widths(base: int, multiple: int = 1) -> list[int]:
    """Half, same and double the profile's width, each rounded to a multiple of ``multiple``."""
    return sorted({max(multiple, round(w / multiple) * multiple) for w in (base // 2, base, base * 2)})


def width(trial: Any, key: str, base: int, multiple: int = 1) -> int:
    return trial.suggest_categorical(key, widths(base, multiple))


def batch_budget(trial: Any, base: RunConfig) -> dict[str, Any]:
    """The cell budget (or, without one, the batch size) around the profile's."""
    if base.train.max_cells:
        return {"train.max_cells": width(trial, "train.max_cells", base.train.max_cells)}
    return {"train.batch_size": width(trial, "train.batch_size", base.train.batch_size)}


def space_crener(trial: Any, base: RunConfig) -> dict[str, Any]:
    """CRENER: learning rates, widths, dropouts, enhancement rounds, batch budget."""
    m = base.model
    values: dict[str, Any] = {
        **learning_rates(trial, base),
        "model.hidden": width(trial, "model.hidden", m.hidden, math.lcm(m.tf_heads, m.enh_heads)),
        "model.conv_channels": width(trial, "model.conv_channels", m.conv_channels),
        "model.biaffine_dim": width(trial, "model.biaffine_dim", m.biaffine_dim),
        "model.emb_dropout": dropout(trial, "model.emb_dropout", m.emb_dropout),
        "model.conv_dropout": dropout(trial, "model.conv_dropout", m.conv_dropout),
        "model.out_dropout": dropout(trial, "model.out_dropout", m.out_dropout),
        **batch_budget(trial, base),
    }
    if m.use_relation_enhancement:  # rounds is fixed at 1 without it
        values["model.rounds"] = trial.suggest_int("model.rounds", 2, 4)
    return values
