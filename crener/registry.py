"""Model families: for each ``model.name``, everything the rest of crener needs to know about it.

A family is one :class:`ModelFamily`: how to build its model and its task, the overrides its
faithful settings start from, the config fields it reads (only these enter its runs' keys), its
tuning search space, and the row reports show it under. It is declared once, as ``FAMILY`` at the
end of the module that builds the model (:mod:`crener.model` for CRENER, one file of
``baselines/`` per baseline), and registered as a Python entry point of the group
``crener.models`` in ``pyproject.toml``::

    [project.entry-points."crener.models"]
    w2ner = "baselines.w2ner:FAMILY"

Entry points are the packaging standard for plugins: the registry reads their names from the
installed metadata without importing anything (``crener train --help`` lists the choices without
loading torch) and imports a family's module the first time that family is asked for. So
crener/ never names baselines/, and another installed distribution adds a family the same way.
Entry points are install metadata: after editing them, run ``pip install -e .`` again.

What building a run's config needs to know about a family (:class:`FamilySettings`: its faithful
settings, its settings within a profile, whether it takes the variants, which combinations it
refuses, whether it reads ``model.char_vectors`` and runs the encoder) may be declared as data, a
``[families.NAME]`` table of ``crener/families.toml``, instead of in its ``ModelFamily``. The
built-in families do so, so that :func:`crener.profiles.build_run_config` imports no model module
and no torch; :func:`get` merges the table into the family it loads. A family without a table
declares all of it in its ``ModelFamily``, and building its config imports its module.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crener.config import SECTIONS, RuntimeConfig, check_grid_fields
from crener.errors import ConfigError, CrenerError

if TYPE_CHECKING:  # annotations only: importing these here would load torch with the registry
    from torch import nn

    from crener.config import ModelConfig, RunConfig
    from crener.encoder import CharEncoder
    from crener.tasks import Task

GROUP = "crener.models"
# The built-in families' config-level settings as data (see the module docstring).
FAMILIES_FILE = Path(__file__).with_name("families.toml")
# The checks a table may name (its ``check``): functions of crener.config, which imports no torch.
CHECKS: dict[str, Callable[[ModelConfig], None]] = {"grid": check_grid_fields}


@dataclass(frozen=True)
class ModelFamily:
    """One model family, as its module declares it (see the module docstring). The settings named
    in :data:`FAMILY_SETTINGS` may come from its ``[families.NAME]`` table instead (:func:`get`)."""

    name: str  # the value of model.name, of the crener.model tag and of --model
    # (cfg, its task, the encoder, the runtime section: exact rewrites such as grid_input)
    build_model: Callable[[ModelConfig, Task, CharEncoder, RuntimeConfig], nn.Module]
    build_task: Callable[[ModelConfig, Sequence[str]], Task]  # (cfg, entity types): labels, loss, decoding
    # The ModelConfig fields its model and task read. Only these enter its runs' keys
    # (crener.identity.run_identity), so a baseline's key ignores CRENER's grid flags; None: every field.
    fields: frozenset[str] | None
    defaults: Mapping[str, Any] = field(default_factory=dict)  # its faithful settings, before the profile
    # Its own settings within a profile, applied after the profile (before the variant): where a
    # profile's shared budget would leave this family unable to learn, e.g. a learning rate.
    profile_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Optuna search space: (trial, base config) -> {config key: value}; see crener.search.
    search_space: Callable[[Any, RunConfig], dict[str, Any]] | None = None
    label: str = ""  # its row in the report tables; a paper row's label is spelled as in the paper
    order: int = 100  # its place in sweeps and report tables (ties: by name)
    paper_row: bool = False  # a system of the paper's Tables 2-5 that we rerun (else an extra baseline)
    check: Callable[[ModelConfig], None] | None = None  # raises ValueError for combinations it cannot build
    # Whether its forward runs the pretrained character encoder (TENER's does not: it trains its
    # own embeddings, started from model.char_vectors); reports say so instead of calling a
    # never-used encoder frozen.
    uses_encoder: bool = True
    # Whether the variants (crener/profiles.toml) are ablations of it, so it takes every one;
    # otherwise it takes only variant=full.
    ablations: bool = False


@dataclass(frozen=True)
class FamilySettings:
    """What building a run's config needs to know about a family: the ``ModelFamily`` fields of
    the same names (:func:`settings`), and whether it reads ``model.char_vectors``."""

    defaults: Mapping[str, Any]
    profile_defaults: Mapping[str, Mapping[str, Any]]
    ablations: bool
    check: Callable[[ModelConfig], None] | None
    uses_encoder: bool
    reads_char_vectors: bool  # it has character embeddings of its own, started from model.char_vectors


# The settings a ModelFamily shares with FamilySettings, and what it holds where it leaves them to
# its table (its dataclass defaults).
_LEFT_TO_TABLE = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(ModelFamily)
    if f.name in {g.name for g in dataclasses.fields(FamilySettings)}
}
FAMILY_SETTINGS = tuple(_LEFT_TO_TABLE)  # the ModelFamily fields a [families.NAME] table may set


@functools.cache
def plugins(group: str) -> dict[str, EntryPoint]:
    """The installed entry points of ``group`` by name (metadata only: nothing is imported).

    Used for the model families (:data:`GROUP`) and for the subcommands of the ``crener``
    command line (``crener.commands``, see :mod:`crener.cli`)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise CrenerError(
                f"{group}: {ep.name!r} is registered twice: {found[ep.name].value} and {ep.value}"
            )
        found[ep.name] = ep
    if not found:
        found = _source_tree_entry_points(group)
    if not found:
        raise CrenerError(
            f"nothing is registered in the entry-point group {group!r}: install the package "
            "(pip install -e .) so its entry points exist"
        )
    return found


def _source_tree_entry_points(group: str) -> dict[str, EntryPoint]:
    """The entry points ``pyproject.toml`` declares, for a source checkout used uninstalled.

    The GPU check (:mod:`crener.tools.gpucheck`) runs from a copied working tree with a Python that has
    torch and transformers but not this package installed, so there is no install metadata; the
    checkout's own ``pyproject.toml`` says the same thing. An installed package never gets here.
    """
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    with pyproject.open("rb") as f:
        declared = tomllib.load(f).get("project", {}).get("entry-points", {}).get(group, {})
    return {name: EntryPoint(name=name, value=value, group=group) for name, value in declared.items()}


def _entry_points() -> dict[str, EntryPoint]:
    return plugins(GROUP)


def _entry_point(name: str) -> EntryPoint:
    eps = _entry_points()
    if name not in eps:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(eps)}")
    return eps[name]


def names() -> tuple[str, ...]:
    """Registered family names, sorted; imports nothing."""
    return tuple(sorted(_entry_points()))


@functools.cache
def get(name: str) -> ModelFamily:
    """The family ``name``, with its ``[families.NAME]`` settings if it has a table; the first
    call imports the module that declares it."""
    ep = _entry_point(name)
    family = ep.load()
    if not isinstance(family, ModelFamily) or family.name != name:
        raise CrenerError(f"entry point {name} = {ep.value} is not the ModelFamily {name!r}")
    table = _tables().get(name)
    return family if table is None else _with_table(family, table)


@functools.cache
def settings(name: str) -> FamilySettings:
    """What building a config of family ``name`` needs: read from its ``[families.NAME]`` table
    without importing its module (nor torch), or from the family itself where it has none."""
    _entry_point(name)  # an unknown name is the KeyError that names the choices
    table = _tables().get(name)
    if table is not None:
        return table
    family = get(name)
    return FamilySettings(
        defaults=family.defaults,
        profile_defaults=family.profile_defaults,
        ablations=family.ablations,
        check=family.check,
        uses_encoder=family.uses_encoder,
        reads_char_vectors=family.fields is None or "char_vectors" in family.fields,
    )


@functools.cache
def _tables() -> dict[str, FamilySettings]:
    """The ``[families.NAME]`` tables of :data:`FAMILIES_FILE`, by family name."""
    with FAMILIES_FILE.open("rb") as f:
        tables = tomllib.load(f).get("families", {})
    return {name: _read_table(name, table) for name, table in tables.items()}


def _read_table(name: str, table: dict[str, Any]) -> FamilySettings:
    where = f"{FAMILIES_FILE}: families.{name}"
    scalars = {"ablations": False, "check": None, "uses_encoder": True, "reads_char_vectors": False}
    unknown = set(table) - set(scalars) - set(SECTIONS) - {"profiles"}
    if unknown:
        raise CrenerError(
            f"{where} has keys {sorted(unknown)}; use {sorted(scalars)}, {SECTIONS} or profiles"
        )
    values = {key: table.get(key, default) for key, default in scalars.items()}
    if values["check"] is not None and values["check"] not in CHECKS:
        raise CrenerError(f"{where}.check = {values['check']!r}; choose from {', '.join(CHECKS)}")
    return FamilySettings(
        defaults=_flat(table),
        profile_defaults={p: _flat(sections) for p, sections in table.get("profiles", {}).items()},
        ablations=bool(values["ablations"]),
        check=CHECKS.get(values["check"]) if values["check"] is not None else None,
        uses_encoder=bool(values["uses_encoder"]),
        reads_char_vectors=bool(values["reads_char_vectors"]),
    )


def _flat(sections: dict[str, Any]) -> dict[str, Any]:
    """``{section: {field: value}}`` -> ``{"section.field": value}``, for the config's sections only."""
    return {f"{s}.{k}": v for s in SECTIONS for k, v in sections.get(s, {}).items()}


def _with_table(family: ModelFamily, table: FamilySettings) -> ModelFamily:
    """``family`` with its table's settings; each is declared in one place, never in both."""
    declared = sorted(k for k, v in _LEFT_TO_TABLE.items() if getattr(family, k) != v)
    if declared:
        raise CrenerError(
            f"model family {family.name!r} declares {declared} both in its ModelFamily and in "
            f"[families.{family.name}] of {FAMILIES_FILE.name}; keep one"
        )
    if table.reads_char_vectors != (family.fields is None or "char_vectors" in family.fields):
        raise CrenerError(
            f"[families.{family.name}] of {FAMILIES_FILE.name}: reads_char_vectors = "
            f"{str(table.reads_char_vectors).lower()}, but its ModelFamily's fields say the opposite"
        )
    return dataclasses.replace(family, **{k: getattr(table, k) for k in _LEFT_TO_TABLE})


def families() -> dict[str, ModelFamily]:
    """Every registered family by name, in their ``order`` (imports each family's module)."""
    loaded = [get(name) for name in names()]
    return {f.name: f for f in sorted(loaded, key=lambda f: (f.order, f.name))}


def reads(name: str, field: str) -> bool:
    """Whether family ``name`` reads ModelConfig ``field`` (a family that declares no fields reads all)."""
    fields = get(name).fields
    return fields is None or field in fields


@functools.cache
def declared_fields() -> frozenset[str]:
    """The model fields some family says it reads (a field no family lists counts for all)."""
    return frozenset().union(*(f.fields for f in families().values() if f.fields is not None))


def check_model(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` for a model config its family cannot build: an unknown family,
    a field only other families read (``char_vectors``), or a combination its ``check`` rejects.

    The one home of the family-aware checks: :class:`crener.config.ModelConfig` checks only what
    needs no family, and this reads the family's :func:`settings`, so that building the config of
    a family with a ``[families.NAME]`` table imports no model module (nor torch)."""
    if cfg.name not in names():
        raise ConfigError(f"model.name={cfg.name!r} is not one of {', '.join(names())}")
    family = settings(cfg.name)
    if cfg.char_vectors.lower() not in ("none", "") and not family.reads_char_vectors:
        raise ConfigError(
            f"model.char_vectors={cfg.char_vectors!r}: {cfg.name} has no character embeddings of its "
            "own to initialise (only tener reads it); leave it at none"
        )
    check = family.check
    if check is None:
        return
    try:
        check(cfg)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as exc:  # a family may raise plain errors
        raise ConfigError(str(exc.args[0]) if exc.args else repr(exc)) from exc


def build_model(
    cfg: ModelConfig, task: Task, encoder: CharEncoder, runtime: RuntimeConfig | None = None
) -> nn.Module:
    """The model of family ``cfg.name`` (checked first: a config made without
    :func:`crener.profiles.build_run_config` is refused here, before any weight is made)."""
    check_model(cfg)
    return get(cfg.name).build_model(cfg, task, encoder, runtime or RuntimeConfig())


def build_task(cfg: ModelConfig, types: Sequence[str]) -> Task:
    """The task (label scheme, loss, decoding) of family ``cfg.name`` over entity ``types``."""
    return get(cfg.name).build_task(cfg, types)
