"""Run identity: which experiment a config is, as the key that makes sweeps run-once.

A run's key hashes a schema version, the model family, the fields that tell the experiment apart
(:func:`run_identity`), the data's digest, the seed and, where they were rebuilt, a shipped
encoder's weights. Golden keys in tests/test_identity.py pin it: adding a field with a default
must never change an existing key. :mod:`crener.config` holds the schema; this module decides
what of it counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from crener import registry
from crener.config import RunConfig
from crener.data.digest import dataset_digest

# What run_key hashes. Bump KEY_SCHEMA only to retire every key on purpose (and give
# `crener migrate` a way to map the old ones).
KEY_SCHEMA = 1

# The sections of a RunConfig that can change a result. The runtime section (where and how fast a
# run runs, crener.config.RuntimeConfig) is skipped as a whole.
IDENTITY_SECTIONS = ("model", "data", "train")

# Groups of ModelConfig fields that several families read, from which each family's ``fields``
# (crener.registry.ModelFamily) is made: its encoder, its model and its task (labels, loss,
# decoding); data and train fields are read by every family. Only these enter a family's key, so
# a baseline's key ignores CRENER's grid flags. A model field no family lists enters every key
# (tests/test_identity.py asks for it to be listed).
# The character encoder (crener.train builds one for every family) and the dropout on its output:
ENCODER_FIELDS = (
    "encoder", "embedded_hidden", "embedded_layers", "embedded_heads", "embedded_ff", "last4_mean",
    "emb_dropout",
)  # fmt: skip
# crener.layers' grid convolution module and co-predictor, as CRENER and W2NER build them:
GRID_FIELDS = (
    "cln_orientation", "use_distance_embedding", "use_region_embedding", "dist_dim",
    "region_dim", "conv_channels", "conv_dropout", "use_dilated_conv", "dilations", "dconv_chain",
    "use_biaffine", "use_grid_mlp", "biaffine_dim", "ffn_dim", "out_dropout", "fast_dropout",
)  # fmt: skip
# crener.tasks.GridTask, the task of both grid models: label scheme, loss, decoder:
GRID_TASK_FIELDS = (
    "tag_scheme", "ht_typed", "loss", "ht_mode", "link_mode", "contiguous_only", "max_paths", "prior_bias",
    "calibrate",
)  # fmt: skip
# The adapted Transformer (CRENER's context layer, TENER's encoder):
TRANSFORMER_FIELDS = (
    "hidden", "tf_layers", "tf_heads", "tf_ff", "tf_dropout", "key_proj", "attn_out_proj", "attn_scale",
    "rel_pos",
)  # fmt: skip

# Identity defaults that differ from today's dataclass defaults. When a default changes, record
# the old one here ("model.fast_dropout": True): runs that kept the old value keep their keys,
# and runs with the new value get new ones, because theirs is another experiment.
KEY_DEFAULTS: dict[str, Any] = {}
# The weights (SHA-256 of model.safetensors) each shipped encoder had when its runs were first
# keyed by name alone (crener-char: commit 59fdf58; crener-char-18k: 9973460). Other weights
# under the name are hashed.
KEY_ENCODER_WEIGHTS: dict[str, str] = {
    "crener-char": "62742e7277e48192c649dc33280c97229aaca764236765ef58ec949d3464863c",
    "crener-char-18k": "7d7e4ea271daceb959e7fc11648504238bc331b1f36f4002f932a640255542ab",
}


def identity_defaults(cfg: RunConfig) -> dict[str, Any]:
    """``{flat name: identity default}`` for the classes of ``cfg`` (see :data:`KEY_DEFAULTS`)."""
    out = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in ("profile", "variant")}
    for section in IDENTITY_SECTIONS:
        out.update({f"{section}.{f.name}": f.default for f in dataclasses.fields(getattr(cfg, section))})
    out.update({k: v for k, v in KEY_DEFAULTS.items() if k in out})
    return out


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """The fields that tell this run's experiment apart, ``{"model.hidden": 64, ...}``.

    Only fields its model family reads (``fields`` of its :class:`crener.registry.ModelFamily`;
    data and train fields are read by every family; the runtime section never counts), whose
    value differs from its identity default (the dataclass default, or the value recorded in
    :data:`KEY_DEFAULTS`). The ``profile`` and ``variant`` labels count too: run folders and
    reports address runs by them. ``model.name`` and ``train.seed`` are left out here:
    :func:`run_key` names them itself.
    """
    reads = registry.get(cfg.model.name).fields  # None: a family that declares nothing reads all
    declared = registry.declared_fields()
    defaults = identity_defaults(cfg)
    out: dict[str, Any] = {}
    for name, value in cfg.flatten().items():
        section, _, field_name = name.partition(".")
        if name in ("model.name", "train.seed") or section == "runtime":
            continue
        # A model field no family declares yet counts for every family: it can only split
        # keys (when set away from its default), never make two experiments share one.
        unread = reads is not None and field_name in declared and field_name not in reads
        if section == "model" and unread:
            continue
        if value != defaults[name]:
            out[name] = value
    return out


def encoder_weights(cfg: RunConfig) -> str | None:
    """SHA-256 of the weights of a shipped encoder (``model.encoder`` names one and the family
    reads an encoder), else None.

    A shipped encoder keeps its name when it is rebuilt with other weights: without this in the
    key, a sweep would take the finished runs of the old weights for runs of the new ones."""
    if not registry.get(cfg.model.name).uses_encoder:
        return None
    from crener.encoder import shipped_weights_digest  # imports torch: only when a key needs it

    return shipped_weights_digest(cfg.model.encoder)


def run_key(cfg: RunConfig, data_digest: str | None = None) -> str:
    """Stable identity of the run (16 hex characters): what makes sweeps run-once.

    A hash of :data:`KEY_SCHEMA`, the model family, :func:`run_identity`, the data's digest, the
    seed, and the weights' digest of a shipped encoder (:func:`encoder_weights`). Adding a field
    with a default, or a field the family does not read, changes no key. ``data_digest``
    defaults to :func:`crener.data.digest.dataset_digest` of ``cfg.data`` under
    ``cfg.runtime.data_root`` (reads the dataset's files once per process; they must exist).
    """
    if data_digest is None:
        data_digest = dataset_digest(cfg.data, cfg.runtime.data_root)
    payload = {
        "schema": KEY_SCHEMA,
        "model": cfg.model.name,
        "fields": run_identity(cfg),
        "data": data_digest,
        "seed": cfg.train.seed,
    }
    weights = encoder_weights(cfg)
    # Hashed only when they differ from the weights the name was first shipped with, so the
    # runs keyed before this entered the key keep their keys (as KEY_DEFAULTS does for fields).
    if weights is not None and weights != KEY_ENCODER_WEIGHTS.get(cfg.model.encoder):
        payload["encoder_weights"] = weights
    blob = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
