"""Run identity (``crener.identity.run_key``): golden keys that must not move, what enters a key and what
does not, and the dataset digests it is built on.

A golden key changing means every finished sweep cell is retrained: if the change is meant,
bump ``KEY_SCHEMA`` and ship a ``crener migrate`` for it; never just paste the new values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import crener.identity as identity
import crener.profiles as profiles
from crener import registry
from crener.config import DataConfig, ModelConfig, RunConfig, RuntimeConfig
from crener.data.datasets import DATASETS, register_dataset, resolve_data_root
from crener.data.digest import dataset_digest, file_digest
from crener.identity import QUICK_V1, encoder_weights, run_key
from crener.profiles import build_run_config
from crener.tracking import param_value

# (build_run_config arguments, key, key over ZERO_DIGEST). Written once; they must never move. The
# second key moves only if the key function does, the first also if the shared data files do.
GOLDEN = {
    "crener-full": (dict(profile="quick", dataset="resume"), "3a29713007387d1b", "dfd97cf6cbe9632b"),
    "w2ner": (dict(model="w2ner", profile="quick", dataset="resume"), "1bd27bfe876e1abd", "2a04b9cba9c10e28"),
    "bert_crf-seed1": (
        dict(model="bert_crf", profile="quick", dataset="weibo", seed=1),
        "350093be3a4d6284",
        "c9cb3fb04090e21f",
    ),
    "crener-no_enhancement": (
        dict(variant="no_enhancement", profile="quick", dataset="ontonotes4"),
        "6b81ee0439cc1b75",
        "61179a9d3a50af35",
    ),
    "crener-set-seed2": (
        dict(
            profile="quick",
            dataset="resume",
            seed=2,
            overrides={"model.rounds": "3", "train.lr": "5e-3", "model.grid_input": "concat"},
        ),
        "67664e82fcd1dbab",
        "75a6164a7d6530b0",
    ),
}
ZERO_DIGEST = "0" * 64
# Digests of the shared benchmark files: these move only if the data does.
GOLDEN_DIGESTS = {
    "resume": "c8e003c9c3e4b0d0adb32be6d19c6882b86b916b6377b21e11c7c109ce9e305a",
    "weibo": "5da08f4dbed4004b0c500d5efa2c0a15a7fe7f00385f6b4f0e2c16b66e9d5c24",
    "ontonotes4": "de3ff18914cb5f97397b9228b554f70f940f9b99858292f73f81658a2af592af",
}
# Identity defaults as of KEY_SCHEMA 1. A field left at its default is not hashed, so changing a
# default would silently give the old key to a new experiment: record the old value in
# identity.KEY_DEFAULTS instead (then this table still holds).
IDENTITY_DEFAULTS_V1 = {
    "profile": "custom", "variant": "full",
    "model.encoder": "embedded", "model.embedded_hidden": 256, "model.embedded_layers": 2,
    "model.embedded_heads": 4, "model.embedded_ff": 1024, "model.last4_mean": True, "model.emb_dropout": 0.5,
    "model.hidden": 512, "model.context": "transformer", "model.tf_layers": 2, "model.tf_heads": 8,
    "model.tf_ff": 1024, "model.tf_dropout": 0.15, "model.key_proj": True, "model.attn_out_proj": False,
    "model.attn_scale": False, "model.rel_pos": "full", "model.concat_bert": False,
    "model.cln_orientation": "paper", "model.use_distance_embedding": True,
    "model.use_region_embedding": True, "model.attn_matrix": "transformer_probs", "model.dist_dim": 20,
    "model.region_dim": 20, "model.attn_dim": 20,
    "model.conv_channels": 96, "model.conv_dropout": 0.5, "model.use_dilated_conv": True,
    "model.dilations": (1, 2, 3), "model.dconv_chain": False, "model.use_relation_enhancement": True,
    "model.rounds": 3, "model.tag_dim": 96, "model.enh_heads": 8, "model.enh_dropout": 0.1,
    "model.enh_block": "paper", "model.fast_dropout": False, "model.use_biaffine": True,
    "model.use_grid_mlp": True, "model.biaffine_dim": 512, "model.ffn_dim": 288, "model.out_dropout": 0.33,
    "model.biaffine_input": "encoder", "model.tag_scheme": "crener", "model.ht_typed": "both",
    "model.loss": "zlpr", "model.ht_mode": "union", "model.link_mode": "and", "model.contiguous_only": False,
    "model.max_paths": 1000, "model.lstm_hidden": 512,
    "data.dataset": "resume", "data.weibo_coarse": False, "data.msra_protocol": "lineage",
    "data.max_len": 256,
    "data.train_limit": 0, "data.eval_limit": 0, "data.test_limit": 0,
    "train.epochs": 10, "train.batch_size": 12, "train.max_cells": 0, "train.lr": 0.001,
    "train.encoder_lr": 5e-06, "train.weight_decay": 0.0, "train.warmup": 0.1, "train.clip": 5.0,
    "train.bf16": False, "train.max_steps": 0,
}  # fmt: skip
# A non-default value of each runtime field (data_root is tested on a copy of the files), by the
# old flat names that old MLflow params and sweep files still use (crener.config.RUNTIME_ALIASES).
IGNORED_VALUES = {
    "train.progress": False,
    "train.device": "cpu",
    "train.threads": 2,
    "train.heap_tensors": True,
    "train.loader_workers": 1,
    "train.eval_max_cells": 1000,
    "model.grid_input": "concat",
    "model.space_to_batch": False,
    "runtime.fused_conv": True,
    "model.checkpoint_rounds": True,
    "model.checkpoint_above": 8,
    "train.eval_every": 5,
    "runtime.time_budget": 12.5,
}


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_keys(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs, key, zero_digest_key = GOLDEN[name]
    monkeypatch.setitem(profiles.PROFILES, "quick", QUICK_V1)
    # ...and the families as they were then, before any had settings of its own within a profile
    settings = registry.settings
    monkeypatch.setattr(
        registry, "settings", lambda model: dataclasses.replace(settings(model), profile_defaults={})
    )
    cfg = build_run_config(**kwargs)
    assert run_key(cfg, data_digest=ZERO_DIGEST) == zero_digest_key, "the key function moved"
    assert dataset_digest(cfg.data) == GOLDEN_DIGESTS[cfg.data.dataset], "the shared data files changed"
    assert run_key(cfg) == key


def test_identity_defaults_unchanged() -> None:
    defaults = identity.identity_defaults(RunConfig())
    moved = {k: (v, defaults[k]) for k, v in IDENTITY_DEFAULTS_V1.items() if defaults.get(k, v) != v}
    assert not moved, f"defaults changed; record the old ones in crener.identity.KEY_DEFAULTS: {moved}"
    missing = set(IDENTITY_DEFAULTS_V1) - set(defaults)
    assert not missing, f"fields removed (a run logged with them still migrates): {missing}"


def test_file_digests_match_the_published_sums() -> None:
    root = resolve_data_root()
    sums = dict(reversed(line.split()) for line in (root / "SHA256SUMS").read_text().splitlines() if line)
    for rel in ("resume/train.char.bmes", "weibo/dev.all.bmes"):
        assert file_digest(root / rel) == sums[rel]


# --------------------------------------------------------------------------- what enters a key


def _with_extra_field(cfg: RunConfig, section: str, value: object, default: object) -> RunConfig:
    """``cfg`` with one more field in ``section``: a new option added with a default."""
    base = type(getattr(cfg, section))
    extended = dataclass(frozen=True)(type(f"{base.__name__}Plus", (base,), {
        "__annotations__": {"brand_new_option": type(default)}, "brand_new_option": default,
    }))  # fmt: skip
    old = getattr(cfg, section)
    values = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
    return dataclasses.replace(cfg, **{section: extended(**values, brand_new_option=value)})


@pytest.mark.parametrize("model", registry.names())
@pytest.mark.parametrize("section", ["model", "data", "train"])
def test_adding_a_field_with_a_default_changes_no_key(model: str, section: str) -> None:
    cfg = build_run_config(model=model, profile="quick", dataset="resume")
    same = _with_extra_field(cfg, section, value=7, default=7)
    assert f"{section}.brand_new_option" in same.flatten()
    assert run_key(same, ZERO_DIGEST) == run_key(cfg, ZERO_DIGEST)
    # Set away from its default it counts, for every family until one says it reads it (registry).
    assert run_key(_with_extra_field(cfg, section, value=8, default=7), ZERO_DIGEST) != run_key(
        cfg, ZERO_DIGEST
    )


def test_every_model_field_is_declared() -> None:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    declared = registry.declared_fields()
    assert declared <= fields, f"families name fields that do not exist: {declared - fields}"
    undeclared = fields - declared - {"name"}
    assert not undeclared, f"say which families read these (ModelFamily.fields): {undeclared}"
    assert all(f.fields is not None for f in registry.families().values())


@pytest.mark.parametrize("model", ["bert_softmax", "bert_crf", "tener"])
def test_sequence_baselines_ignore_grid_fields(model: str) -> None:
    cfg = build_run_config(model=model, profile="quick", dataset="resume")
    grid_only = {
        "model.rounds": 1, "model.use_relation_enhancement": False, "model.use_region_embedding": False,
        "model.conv_channels": 8, "model.dilations": "1,2", "model.tag_scheme": "w2ner", "model.loss": "ce",
        "model.attn_matrix": "none", "model.context": "none", "model.biaffine_dim": 16,
        "model.lstm_hidden": 8,
    }  # fmt: skip
    assert run_key(cfg.with_overrides(grid_only), ZERO_DIGEST) == run_key(cfg, ZERO_DIGEST)
    assert run_key(cfg.with_overrides({"model.emb_dropout": 0.2}), ZERO_DIGEST) != run_key(cfg, ZERO_DIGEST)
    assert run_key(cfg.with_overrides({"model.embedded_layers": 3}), ZERO_DIGEST) != run_key(cfg, ZERO_DIGEST)


def test_each_family_keys_what_it_reads() -> None:
    w2ner = build_run_config(model="w2ner", profile="quick", dataset="resume")
    tener = build_run_config(model="tener", profile="quick", dataset="resume")
    crener = build_run_config(profile="quick", dataset="resume")
    for cfg, read, unread in (
        (w2ner, {"model.conv_channels": 8, "model.lstm_hidden": 8},
         {"model.tf_layers": 3, "model.hidden": 32}),
        (tener, {"model.tf_layers": 3, "model.key_proj": True},
         {"model.conv_channels": 8, "model.ffn_dim": 8}),
        (crener, {"model.tf_layers": 3, "model.conv_channels": 8}, {"model.lstm_hidden": 8}),
    ):  # fmt: skip
        for name, value in read.items():
            assert run_key(cfg.with_overrides({name: value}), ZERO_DIGEST) != run_key(cfg, ZERO_DIGEST), name
        assert run_key(cfg.with_overrides(unread), ZERO_DIGEST) == run_key(cfg, ZERO_DIGEST)


@pytest.mark.parametrize("model", registry.names())
def test_ignored_fields_change_no_key(model: str) -> None:
    cfg = build_run_config(model=model, profile="smoke", dataset="resume")
    moved = cfg.with_overrides(IGNORED_VALUES)
    assert moved.runtime != cfg.runtime
    assert run_key(moved) == run_key(cfg)
    assert {f.name for f in dataclasses.fields(RuntimeConfig)} == {
        k.partition(".")[2] for k in IGNORED_VALUES
    } | {"data_root"}, "give each runtime field a value above"


def test_data_root_is_not_identity_but_the_files_are(tmp_path: Path) -> None:
    cfg = build_run_config(profile="smoke", dataset="resume")
    shutil.copytree(resolve_data_root() / "resume", tmp_path / "resume")
    copy = cfg.with_overrides({"runtime.data_root": str(tmp_path)})
    assert run_key(copy) == run_key(cfg)
    with open(tmp_path / "resume" / "dev.char.bmes", "a", encoding="utf-8") as fh:
        fh.write("\n")  # one more byte: other data, another run
    assert dataset_digest(copy.data, copy.runtime.data_root) != dataset_digest(cfg.data)
    assert run_key(copy) != run_key(cfg)


def test_seed_digest_labels_and_values_change_the_key() -> None:
    cfg = build_run_config(profile="smoke", dataset="resume")
    keys = {
        run_key(cfg, ZERO_DIGEST),
        run_key(cfg, "1" * 64),
        run_key(cfg.with_overrides({"train.seed": 1}), ZERO_DIGEST),
        run_key(cfg.with_overrides({"profile": "custom"}), ZERO_DIGEST),
        run_key(cfg.with_overrides({"variant": "no_region"}), ZERO_DIGEST),
        run_key(cfg.with_overrides({"train.lr": 1e-4}), ZERO_DIGEST),
        run_key(
            cfg.with_overrides(
                {"model.name": "w2ner", "model.context": "bilstm", "model.attn_matrix": "none"}
            ),
            ZERO_DIGEST,
        ),
        run_key(cfg.with_overrides({"data.dataset": "weibo"}), ZERO_DIGEST),
    }
    assert len(keys) == 8
    assert all(re.fullmatch("[0-9a-f]{16}", k) for k in keys)


def test_key_depends_on_values_not_on_how_they_were_set() -> None:
    cfg = build_run_config(model="w2ner", profile="quick", dataset="weibo", seed=3)
    logged = {k: param_value(v) for k, v in cfg.flatten().items()}  # as MLflow returns params
    assert run_key(RunConfig.from_flat(logged)) == run_key(cfg)
    variant = build_run_config(variant="no_region", profile="smoke")
    by_hand = build_run_config(
        profile="smoke", overrides={"model.use_region_embedding": "false", "variant": "no_region"}
    )
    assert run_key(by_hand) == run_key(variant)


def test_a_recorded_default_change_keeps_old_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend model.fast_dropout used to default to True: runs that kept True keep their keys,
    # runs with today's default (False) are another experiment.
    before = run_key(RunConfig(model=ModelConfig(fast_dropout=False)), ZERO_DIGEST)  # today's default
    monkeypatch.setattr(identity, "KEY_DEFAULTS", {"model.fast_dropout": True})
    assert run_key(RunConfig(model=ModelConfig(fast_dropout=True)), ZERO_DIGEST) == before
    assert run_key(RunConfig(model=ModelConfig(fast_dropout=False)), ZERO_DIGEST) != before


def test_digest_follows_file_edits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DATASETS, "toy", DATASETS["msra"])  # restored after the test

    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "train.txt").write_text("张 S-PER\n\n", encoding="utf-8")
    (tmp_path / "toy" / "test.txt").write_text("李 S-PER\n\n", encoding="utf-8")
    register_dataset("toy", "toy", {"train": "train.txt", "test": "test.txt"}, "bmes")
    data = DataConfig(dataset="toy")
    first = dataset_digest(data, tmp_path)
    assert dataset_digest(data, tmp_path) == first
    (tmp_path / "toy" / "test.txt").write_text("王 S-PER\n\n", encoding="utf-8")  # same size
    os.utime(tmp_path / "toy" / "test.txt", ns=(1, 1))  # and a different mtime
    assert dataset_digest(data, tmp_path) != first


def test_bf16_auto_is_resolved_before_the_key_from_the_measured_peaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`train.bf16=auto` (the full profile's) becomes True or False by what this machine's matmul
    peaks favour, before the key is made: the run records, and is keyed by, the precision it got."""
    import crener.device as device

    assert profiles.PROFILES["full"]["train.bf16"] == "auto"
    asked = []
    for pays in (True, False):
        monkeypatch.setattr(device, "bf16_pays", lambda name, pays=pays: asked.append(name) or pays)
        cfg = build_run_config(profile="full")
        assert cfg.train.bf16 is pays
        assert run_key(cfg) == run_key(build_run_config(profile="full", overrides={"train.bf16": pays}))
        assert build_run_config(profile="quick", overrides={"train.bf16": "auto"}).train.bf16 is pays
    assert asked == ["auto"] * 4
    assert run_key(build_run_config(profile="full", overrides={"train.bf16": True})) != run_key(cfg)
    assert build_run_config(profile="quick").train.bf16 is False  # quick stays fp32: nothing measured
    assert len(asked) == 4


def test_bf16_pays_compares_measured_matmul_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import crener.device as device

    # (fp32, bf16 at its first look, bf16 measured in full, answer, bf16 measurements taken): a first
    # look far under the bar (emulated bf16) settles it without the seconds the full one takes.
    cases = ((100.0, 450.0, 450.0, True, 2), (100.0, 199.0, 199.0, False, 2), (100.0, 60.0, 30.0, False, 2),
             (100.0, 49.0, 450.0, False, 1), (100.0, 3.0, 3.0, False, 1))  # fmt: skip
    for fp32, first, full, want, looks in cases:
        asked = []

        def rate(dtype, shapes=(), reps=5, warmup=2, fp32=fp32, first=first, full=full, asked=asked):
            asked.append((dtype, reps, warmup))
            return fp32 if dtype == torch.float32 else (first if reps == 1 else full)

        monkeypatch.setattr(device, "matmul_gflops", rate)
        device.bf16_pays.cache_clear()
        assert device.bf16_pays("cpu") is want
        assert [a for a in asked if a[0] == torch.bfloat16] == [
            (torch.bfloat16, 1, 1),
            (torch.bfloat16, 3, 2),
        ][:looks]
    device.bf16_pays.cache_clear()


@pytest.mark.parametrize("name", ["crener-char", "crener-char-18k"])
def test_shipped_encoder_weights_enter_the_key_only_when_they_changed(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import crener.encoder as encoder

    cfg = build_run_config(profile="quick", dataset="resume", overrides={"model.encoder": name})
    first = identity.KEY_ENCODER_WEIGHTS[name]
    monkeypatch.setattr(encoder, "shipped_weights_digest", lambda name: first)
    assert encoder_weights(cfg) == first
    as_first = run_key(cfg, ZERO_DIGEST)
    monkeypatch.setattr(encoder, "shipped_weights_digest", lambda name: None)  # keyed by name alone
    assert run_key(cfg, ZERO_DIGEST) == as_first
    rebuilt = "ab" * 32
    monkeypatch.setattr(encoder, "shipped_weights_digest", lambda name: rebuilt)
    assert run_key(cfg, ZERO_DIGEST) != as_first
    # A family that reads no encoder keeps its key whatever the weights.
    tener = build_run_config(model="tener", profile="quick", dataset="resume")
    assert encoder_weights(tener) is None
    tener_key = run_key(tener, ZERO_DIGEST)
    monkeypatch.setattr(encoder, "shipped_weights_digest", lambda name: first)
    assert run_key(tener, ZERO_DIGEST) == tener_key


def test_shipped_weights_digest_is_the_file_hash_and_none_elsewhere(tmp_path: Path) -> None:
    from crener.encoder import SHIPPED_ENCODERS, shipped_weights_digest

    weights = SHIPPED_ENCODERS["crener-char"] / "model.safetensors"
    assert shipped_weights_digest("crener-char") == file_digest(weights)
    assert shipped_weights_digest(str(SHIPPED_ENCODERS["crener-char"])) is None  # a path: the user's
    assert shipped_weights_digest("bert-base-chinese") is None
    assert shipped_weights_digest("embedded") is None


def test_the_default_encoder_is_keyed_by_its_name_alone() -> None:
    # quick's encoder is crener-char-18k (its weights as shipped), so its runs carry no weights
    # hash; a run on crener-char (rebuilt since its first runs) still carries its own.
    cfg = build_run_config(profile="quick", dataset="resume")
    assert cfg.model.encoder == "crener-char-18k"
    assert encoder_weights(cfg) == identity.KEY_ENCODER_WEIGHTS["crener-char-18k"]
    old = build_run_config(profile="quick", dataset="resume", overrides={"model.encoder": "crener-char"})
    assert encoder_weights(old) != identity.KEY_ENCODER_WEIGHTS["crener-char"]
    assert run_key(cfg, ZERO_DIGEST) != run_key(old, ZERO_DIGEST)


def test_run_tags_name_the_shipped_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from crener.tracking import run_tags

    cfg = build_run_config(profile="quick", dataset="resume")
    tags = run_tags(cfg, "main")
    assert tags["crener.encoder_weights"] == encoder_weights(cfg)
    assert "crener.encoder_weights" not in run_tags(
        build_run_config(profile="smoke", dataset="resume"), "main"
    )
