"""Profiles and variants, and the one function that resolves them into a run's config.

A profile is a named budget (widths, data limits, steps); a variant is a row of Table 6 (one
component of CRENER removed). :func:`build_run_config` applies them over the model family's own
settings, checks the result against the family (:func:`crener.registry.check_model`), and
resolves ``train.bf16 = "auto"`` on this machine, before the run's key is made. This is where a
run is built, so it may import the registry; :mod:`crener.config` stays a leaf.
"""

from __future__ import annotations

from typing import Any

from crener import registry
from crener.config import RunConfig, canonical_key
from crener.errors import ConfigError

# Table 6 rows (method.md §3): name -> overrides of the full model.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_transformer": {"model.context": "none", "model.attn_matrix": "none"},
    "no_region": {"model.use_region_embedding": False},
    "no_distance": {"model.use_distance_embedding": False},
    "no_dconv": {"model.use_dilated_conv": False},
    "no_mlp": {"model.use_grid_mlp": False},
    "no_biaffine": {"model.use_biaffine": False},
    "no_enhancement": {"model.use_relation_enhancement": False, "model.rounds": 1},
    "no_relation": {"model.tag_scheme": "w2ner"},
}

# Profiles: named budgets. `quick` is the CPU default; `paper` is meant for a GPU.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "model.embedded_hidden": 32,
        "model.embedded_layers": 1,
        "model.embedded_heads": 2,
        "model.embedded_ff": 64,
        "model.hidden": 32,
        "model.tf_layers": 1,
        "model.tf_heads": 4,
        "model.tf_ff": 64,
        "model.conv_channels": 16,
        "model.tag_dim": 16,
        "model.enh_heads": 4,
        "model.biaffine_dim": 32,
        "model.ffn_dim": 32,
        "model.lstm_hidden": 32,
        "model.dist_dim": 8,
        "model.region_dim": 8,
        "model.attn_dim": 8,
        "data.max_len": 64,
        "data.train_limit": 64,
        "data.eval_limit": 64,
        "data.test_limit": 64,
        "train.epochs": 2,
        "train.max_cells": 20_000,
        "train.lr": 3e-3,
        "train.encoder_lr": 3e-3,
        "runtime.progress": False,
    },
    # The CPU default: Tables 2-6 on 2 cores, in the time the README measures. Small widths, a
    # 500-sentence training budget, sentences split at 64 characters, and test scored on a
    # fixed 500-sentence sample: a smoke-level reproduction whose numbers are not the paper's.
    "quick": {
        "model.embedded_hidden": 64,
        "model.embedded_layers": 1,
        "model.embedded_heads": 2,
        "model.embedded_ff": 128,
        "model.hidden": 64,
        "model.tf_layers": 1,
        "model.tf_heads": 4,
        "model.tf_ff": 128,
        "model.conv_channels": 16,
        "model.tag_dim": 16,
        "model.enh_heads": 4,
        "model.biaffine_dim": 64,
        "model.ffn_dim": 32,
        "model.lstm_hidden": 64,
        "model.dist_dim": 10,
        "model.region_dim": 10,
        "model.attn_dim": 10,
        "model.emb_dropout": 0.1,
        "model.conv_dropout": 0.1,
        "model.out_dropout": 0.1,
        "data.max_len": 64,
        # A step cap, not the training set, bounds the cost (below): 2,000 sentences (all of
        # Weibo's) give the same steps more distinct entities than 500 did (Weibo, seed 0, test F1
        # 0.283 -> 0.308 at equal cost; issue 13).
        "data.train_limit": 2000,
        "data.eval_limit": 200,
        "data.test_limit": 500,
        "model.rounds": 2,  # one feedback instead of two: a third less grid work per step
        # At these widths a step costs mostly per-op overhead, so doubling a batch costs far less
        # than doubling the steps: 8k-cell batches (about 2 long or 8 short sentences), capped at
        # 200 an epoch so the long-sentence datasets (Weibo, MSRA) cost what Resume does; each
        # capped epoch draws a fresh shuffle, so the cap samples rather than truncates. 4 epochs:
        # the whole plan must fit 45 minutes on the slowest 2-core machine this suite meets (an
        # AMD EPYC); the plan's cost grows about linearly with the steps, and 5 epochs of these
        # batches would run past it there (README, Profiles, has the measurements).
        "train.epochs": 4,
        # lr 1e-2 (before the pretrained encoder) kept CRENER at dev F1 0 on Weibo; 1e-3 learned,
        # 3e-3 less (`crener curves`, issue 13).
        "train.max_cells": 8_000,
        "train.max_steps": 200,
        "train.lr": 1e-3,
        "train.warmup": 0.1,
        # The encoder this project pretrains and ships (crener pretrain), frozen: a fixed feature
        # extractor whose features are computed once per sentence for a whole sweep. Output scores
        # start at the training label priors instead of on the all-negative plateau.
        "model.encoder": "crener-char",
        "train.encoder_lr": 0.0,
        "model.prior_bias": True,
        # After this budget's few hundred small steps a grid model ranks entity cells first but
        # its scores have not all crossed 0 yet: decode with the threshold shift that is best on
        # dev (Weibo, seed 0, test F1 0.206 -> 0.283).
        "model.calibrate": True,
    },
    "full": {
        "model.embedded_hidden": 256,
        "model.hidden": 256,
        "model.tf_heads": 8,
        "model.tf_ff": 512,
        "model.conv_channels": 64,
        "model.tag_dim": 64,
        "model.biaffine_dim": 256,
        "model.ffn_dim": 128,
        "model.lstm_hidden": 256,
        "model.emb_dropout": 0.3,
        "model.conv_dropout": 0.3,
        "model.out_dropout": 0.3,
        # The paper's recipe: 10 epochs of batches of 12 sentences; 20k cells is 12 times Resume's
        # mean squared length (`crener.bench.cell_budget_like`), so about the same step count.
        "train.epochs": 10,
        "train.max_cells": 20_000,
        # Halved from 1e-3 / 5e-4, with which CRENER on Resume reached dev F1 0.64 after two
        # epochs and then diverged in the third (loss 0.04 -> 0.07, dev F1 0.08).
        "train.lr": 5e-4,
        # The shipped pretrained encoder, fine-tuned at a fifth of the head's rate (a random encoder
        # needs the head's own rate; bert-base-chinese in `paper` keeps W2NER's 5e-6 default).
        "model.encoder": "crener-char",
        "train.encoder_lr": 1e-4,
        "train.unk_alpha": 0.25,
        "model.prior_bias": True,
        # bf16 autocast where this machine's bf16 matmuls are fast (AMX): the whole training step
        # then runs well above its fp32 speed (reports/performance.md); fp32 elsewhere.
        "train.bf16": "auto",
    },
    "paper": {
        "model.encoder": "bert-base-chinese",
        "train.bf16": True,
        # The paper's recipe: batches of exactly 12 sentences from length-sorted buckets. The cell
        # cap only guards memory: 12 chunks of data.max_len (256) characters, so at the default
        # max_len nothing is split; lower it on a GPU that cannot hold MSRA's worst batch of 12
        # (`python -m crener.gpucheck` measures it). On CPU, `full`'s cell budget is the deviation.
        "train.sorted_batches": True,
        "train.batch_size": 12,
        "train.max_cells": 12 * 256 * 256,
        "runtime.loader_workers": 2,  # collate on the host while the GPU runs the step
    },
}


# The quick profile as it was before the shipped encoder (commit 6d9c92e, run-key schema 1): the
# golden keys of tests/test_identity.py are built from it, and `crener curves` compares against it.
QUICK_V1: dict[str, Any] = {
    "model.embedded_hidden": 64, "model.embedded_layers": 1, "model.embedded_heads": 2, "model.embedded_ff": 128,
    "model.hidden": 64, "model.tf_layers": 1, "model.tf_heads": 4, "model.tf_ff": 128, "model.conv_channels": 16,
    "model.tag_dim": 16, "model.enh_heads": 4, "model.biaffine_dim": 64, "model.ffn_dim": 32,
    "model.lstm_hidden": 64, "model.dist_dim": 10, "model.region_dim": 10, "model.attn_dim": 10,
    "model.emb_dropout": 0.1, "model.conv_dropout": 0.1, "model.out_dropout": 0.1, "data.max_len": 64,
    "data.train_limit": 500, "data.eval_limit": 200, "data.test_limit": 500, "model.rounds": 2,
    "train.epochs": 4, "train.max_cells": 4000, "train.max_steps": 200, "train.lr": 0.01,
    "train.encoder_lr": 0.005, "train.warmup": 0.1,
}  # fmt: skip


def build_run_config(
    *,
    model: str = "crener",
    variant: str = "full",
    profile: str = "quick",
    dataset: str = "resume",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve model family, variant and profile into one config; ``overrides`` win last.

    Order: defaults <- model family (its ``defaults`` in crener.registry) <- profile <- the
    family's settings for that profile (its ``profile_defaults``) <- variant <- per-dataset rule
    <- overrides. The variant comes after the profile so a profile can never
    silently undo an ablation.
    """
    try:
        family = registry.get(model)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if model != "crener" and variant != "full":
        raise ConfigError(f"variants are ablations of CRENER; model {model!r} takes variant=full")
    flat: dict[str, Any] = {"model.name": model, **family.defaults}
    flat.update(PROFILES[profile])
    flat.update(family.profile_defaults.get(profile, {}))
    flat.update(VARIANTS[variant])
    # A profile's `rounds` sizes the enhancement loop; models and variants without one keep
    # their single convolution pass.
    if not flat.get("model.use_relation_enhancement", True):
        flat["model.rounds"] = 1
    flat.update({"data.dataset": dataset, "train.seed": seed, "profile": profile, "variant": variant})
    # TENER's depth pattern (method.md §4.2): one Transformer layer on Weibo at paper widths.
    if profile == "paper" and dataset == "weibo":
        flat.setdefault("model.tf_layers", 1)
        flat["model.tf_layers"] = 1
    # Old flat names (train.progress, ...) are canonical here, so they override the profile's.
    flat.update({canonical_key(k): v for k, v in (overrides or {}).items()})
    if str(flat.get("train.bf16", "")).lower() == "auto":
        # Resolved here, before the run's key is made: a run's identity says which it got.
        from crener.evaluation import bf16_pays  # imports torch: only when a profile asks for it

        flat["train.bf16"] = bf16_pays(str(flat.get("runtime.device", "auto")))
    cfg = RunConfig().with_overrides(flat)
    registry.check_model(cfg.model)
    return cfg
