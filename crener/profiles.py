"""Profiles and variants, and the one function that resolves them into a run's config.

A profile is a named budget (widths, data limits, steps); a variant is a row of Table 6 (one
component of CRENER removed). :func:`build_run_config` applies them over the model family's own
settings, checks the result against the family (:func:`crener.registry.check_model`), and
resolves ``train.bf16 = "auto"`` on this machine, before the run's key is made. This is where a
run is built, so it may import the registry; :mod:`crener.config` stays a leaf. The family's
settings are read as data (crener/families.toml), so building a built-in family's config imports
no model module and no torch: ``train.bf16 = "auto"`` is measured in a child process
(:func:`bf16_auto`) unless torch is loaded here already.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from crener import registry
from crener.config import SECTIONS, RunConfig, canonical_key
from crener.errors import ConfigError, CrenerError

log = logging.getLogger(__name__)

# The overrides as data (crener/profiles.toml): {name: {"section.field": value}}, in file order.
PROFILES_FILE = Path(__file__).with_name("profiles.toml")


def _flat_tables(tables: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``{name: {section: {field: value}}}`` -> ``{name: {"section.field": value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, sections in tables.items():
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"{PROFILES_FILE}: {where}.{name} has sections {sorted(unknown)}; use {SECTIONS}"
            )
        out[name] = {
            f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
        }
    return out


def _load(path: Path) -> dict[str, dict[str, Any]]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    out = {kind: _flat_tables(data[kind], kind) for kind in ("variants", "profiles")}
    out["datasets"] = {p: _flat_tables(t, f"datasets.{p}") for p, t in data.get("datasets", {}).items()}
    return out


_TABLES = _load(PROFILES_FILE)
# Table 6 rows (method.md §3): name -> overrides of the full model.
VARIANTS: dict[str, dict[str, Any]] = _TABLES["variants"]
# Named budgets: name -> overrides of the defaults.
PROFILES: dict[str, dict[str, Any]] = _TABLES["profiles"]
# Per-dataset rules within a profile: profile -> dataset -> overrides, applied after the variant.
DATASET_RULES: dict[str, dict[str, dict[str, Any]]] = _TABLES["datasets"]


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

    Order: defaults <- model family (its ``defaults``, :func:`crener.registry.settings`) <- profile
    <- the family's settings for that profile (its ``profile_defaults``) <- variant <- per-dataset
    rule <- overrides (profiles, variants and per-dataset rules: crener/profiles.toml; the built-in
    families' settings: crener/families.toml). The variant comes after the profile so a profile
    can never silently undo an ablation.
    """
    try:
        family = registry.settings(model)  # where it has a table, no model module is imported
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if variant != "full" and not family.ablations:
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
    flat.update(DATASET_RULES.get(profile, {}).get(dataset, {}))
    # Old flat names (train.progress, ...) are canonical here, so they override the profile's.
    flat.update({canonical_key(k): v for k, v in (overrides or {}).items()})
    if str(flat.get("train.bf16", "")).lower() == "auto":
        # Resolved here, before the run's key is made: a run's identity says which it got.
        flat["train.bf16"] = bf16_auto(str(flat.get("runtime.device", "auto")))
    cfg = RunConfig().with_overrides(flat)
    registry.check_model(cfg.model)
    return cfg


def bf16_auto(device: str) -> bool:
    """What ``train.bf16 = "auto"`` means on ``device`` here (:func:`crener.device.bf16_pays`).

    Measuring needs torch. Where this process has not loaded it (building configs, ``--dry-run``,
    planning a sweep), the measurement runs in a child process, so building a config never loads
    torch here; where it has, it runs here (the same function, cached for the process).
    """
    if "torch" in sys.modules:
        from crener.device import bf16_pays

        return bf16_pays(device)  # cached there
    return _bf16_pays_in_a_child(device)


@functools.cache
def _bf16_pays_in_a_child(device: str) -> bool:
    cmd = [sys.executable, "-m", "crener.device", "bf16-pays", device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        pays = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pays = None
    if done.returncode != 0 or not isinstance(pays, bool):
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise CrenerError(
            f"train.bf16=auto: measuring bf16 on runtime.device={device} failed (exit {done.returncode}): "
            f"{tail or done.stdout.strip() or 'no output'}; set train.bf16=true or false"
        )
    for line in done.stderr.strip().splitlines():  # the child's own report of what it measured
        log.info("%s", line)
    return pays
