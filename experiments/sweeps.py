"""Sweeps as data: ``experiments/configs/*.toml`` -> ordered, de-duplicated lists of RunConfig.

A sweep file names models (or ``"all"``: every registered family), variants, datasets, the
default profile, seeds per profile, the paper tables it feeds, and optional ``[[overrides]]``. An overrides file (``--config PATH``, e.g.
written by ``crener tune --export``) holds only ``[[overrides]]``. Each override applies a
``set`` of config fields to the cells its optional filters match::

    [[overrides]]
    models = ["crener"]        # filters: models, variants, datasets, profiles (absent = any)
    datasets = ["resume"]
    [overrides.set]
    "train.lr" = 0.002

Precedence for one cell: defaults <- model family <- profile <- overrides <- variant <- ``--set``.
The variant is re-applied after the overrides so tuned values never undo an ablation; ``--set``
is the user's last word. Unknown keys anywhere are an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crener import registry
from crener.config import SECTIONS, RunConfig, canonical_key, run_label
from crener.errors import CrenerError, DataError
from crener.files import read_text
from crener.identity import run_key
from crener.profiles import PROFILES, VARIANTS, build_run_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SWEEP_NAMES = ("main", "ablation")  # the order `crener reproduce` runs them in
# Sweeps `crener reproduce` runs only when ``--only`` names them: their cells test one claim, and
# are not needed for the tables (those they share with a table sweep keep its key).
OPT_IN_SWEEPS = ("claim",)
DEFAULT_SEEDS_KEY = "default"  # [seeds] entry for profiles not listed
ALL_MODELS = "all"  # models = "all": every registered model family (crener.registry), in its order
# Fields that define which cell a config is; an override may not change them.
IDENTITY_KEYS = frozenset({"profile", "variant", "model.name", "data.dataset", "train.seed"})

_SWEEP_KEYS = frozenset(
    {"description", "models", "variants", "datasets", "default_profile", "seeds", "tables", "overrides"}
)
_OVERRIDES_FILE_KEYS = frozenset({"description", "source", "overrides"})
_OVERRIDE_KEYS = frozenset({"models", "variants", "datasets", "profiles", "set"})


class SweepError(CrenerError):
    """A sweep or overrides file that does not parse or names something unknown."""


@dataclass(frozen=True)
class Override:
    """Config fields to set on the cells matching every given filter (None = any)."""

    values: dict[str, Any]
    models: tuple[str, ...] | None = None
    variants: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    profiles: tuple[str, ...] | None = None
    source: str = ""  # file it came from, for messages

    def matches(self, *, model: str, variant: str, dataset: str, profile: str) -> bool:
        return all(
            allowed is None or value in allowed
            for allowed, value in (
                (self.models, model),
                (self.variants, variant),
                (self.datasets, dataset),
                (self.profiles, profile),
            )
        )


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    models: tuple[str, ...]
    variants: tuple[str, ...]
    datasets: tuple[str, ...]
    default_profile: str
    # profile (or "default") -> {dataset (or "default") -> seeds}; in TOML either a list for every
    # dataset (``quick = [0]``) or a table (``quick = {default = [0], resume = [0, 1, 2]}``)
    seeds: dict[str, dict[str, tuple[int, ...]]]
    tables: dict[str, tuple[str, ...]]  # "table3" -> datasets
    overrides: tuple[Override, ...] = ()

    def seeds_for(self, profile: str, dataset: str | None = None) -> tuple[int, ...]:
        """The seeds of ``dataset`` under ``profile``; without a dataset, the union in order."""
        table = self.seeds.get(profile, self.seeds.get(DEFAULT_SEEDS_KEY, {DEFAULT_SEEDS_KEY: (0,)}))
        if dataset is None:
            return tuple(sorted({s for seeds in table.values() for s in seeds}))
        return table.get(dataset, table.get(DEFAULT_SEEDS_KEY, (0,)))


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: the config and the sweep (hence MLflow experiment) it belongs to."""

    sweep: str
    cfg: RunConfig

    @property
    def label(self) -> str:
        return self.cfg.label


# --------------------------------------------------------------------------- parsing


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path, "a TOML file"))
    except DataError as exc:
        raise SweepError(str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: {exc}") from None


def _check_keys(where: str, table: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SweepError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def _str_list(where: str, value: Any, choices: Iterable[str] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise SweepError(f"{where}: expected a non-empty list of strings, got {value!r}")
    if choices is not None:
        choices = tuple(choices)
        bad = [v for v in value if v not in choices]
        if bad:
            raise SweepError(f"{where}: unknown {', '.join(bad)}; choose from {', '.join(choices)}")
    return tuple(value)


def _models(where: str, value: Any) -> tuple[str, ...]:
    """A sweep's ``models``: a list of family names, or ``"all"``: every registered family."""
    if value == ALL_MODELS:
        return tuple(registry.families())
    return _str_list(f"{where}: models", value, registry.names())


def _check_field(where: str, key: str) -> None:
    if key in IDENTITY_KEYS:
        raise SweepError(f"{where}: {key!r} names the cell itself and cannot be overridden")
    section, _, name = canonical_key(key).partition(".")  # old flat names still load
    base = RunConfig()
    if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(getattr(base, section))}:
        raise SweepError(f"{where}: unknown config key {key!r}")


def _parse_overrides(where: str, items: Any) -> tuple[Override, ...]:
    if not isinstance(items, list):
        raise SweepError(f"{where}: 'overrides' must be an array of tables ([[overrides]])")
    out = []
    for i, item in enumerate(items):
        at = f"{where}: overrides[{i}]"
        if not isinstance(item, dict):
            raise SweepError(f"{at}: expected a table")
        _check_keys(at, item, _OVERRIDE_KEYS)
        values = item.get("set")
        if not isinstance(values, dict) or not values:
            raise SweepError(f"{at}: needs a non-empty 'set' table of config keys")
        for key in values:
            _check_field(at, key)
        out.append(
            Override(
                values=dict(values),
                models=_str_list(f"{at}.models", item["models"], registry.names())
                if "models" in item
                else None,
                variants=_str_list(f"{at}.variants", item["variants"], VARIANTS)
                if "variants" in item
                else None,
                datasets=_str_list(f"{at}.datasets", item["datasets"]) if "datasets" in item else None,
                profiles=_str_list(f"{at}.profiles", item["profiles"], PROFILES)
                if "profiles" in item
                else None,
                source=where,
            )
        )
    return tuple(out)


def sweep_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.toml"


def load_sweep(name_or_path: str | Path) -> Sweep:
    """Parse a sweep by name (``main``, ``ablation``) or path; unknown keys are an error."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = sweep_path(str(name_or_path))
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
            raise SweepError(f"unknown sweep {name_or_path!r}; known: {known}")
    raw = _read_toml(path)
    where = str(path)
    _check_keys(where, raw, _SWEEP_KEYS)
    for required in ("models", "variants", "datasets"):
        if required not in raw:
            raise SweepError(f"{where}: missing {required!r}")
    default_profile = raw.get("default_profile", "quick")
    if default_profile not in PROFILES:
        raise SweepError(f"{where}: default_profile {default_profile!r} is not one of {', '.join(PROFILES)}")
    datasets = _str_list(f"{where}: datasets", raw["datasets"])
    seeds: dict[str, dict[str, tuple[int, ...]]] = {}
    for profile, values in raw.get("seeds", {}).items():
        if profile != DEFAULT_SEEDS_KEY and profile not in PROFILES:
            raise SweepError(f"{where}: seeds.{profile}: unknown profile")
        table = values if isinstance(values, dict) else {DEFAULT_SEEDS_KEY: values}
        for name, seed_list in table.items():
            if name != DEFAULT_SEEDS_KEY and name not in datasets:
                raise SweepError(f"{where}: seeds.{profile}.{name}: not a dataset of this sweep")
            if not isinstance(seed_list, list) or not seed_list or not all(type(v) is int for v in seed_list):
                raise SweepError(f"{where}: seeds.{profile}.{name}: expected a non-empty list of integers")
        seeds[profile] = {name: tuple(v) for name, v in table.items()}
    tables = {}
    for table, ds in raw.get("tables", {}).items():
        tables[table] = _str_list(f"{where}: tables.{table}", ds, datasets)
    return Sweep(
        name=path.stem,
        description=str(raw.get("description", "")),
        models=_models(where, raw["models"]),
        variants=_str_list(f"{where}: variants", raw["variants"], VARIANTS),
        datasets=datasets,
        default_profile=default_profile,
        seeds=seeds,
        tables=tables,
        overrides=_parse_overrides(where, raw.get("overrides", [])),
    )


def load_overrides(path: str | Path) -> tuple[Override, ...]:
    """The ``[[overrides]]`` of a file given to ``--config`` (e.g. from ``crener tune --export``)."""
    path = Path(path)
    raw = _read_toml(path)
    _check_keys(str(path), raw, _OVERRIDES_FILE_KEYS)
    return _parse_overrides(str(path), raw.get("overrides", []))


def selectors() -> dict[str, tuple[str, str | None]]:
    """Names ``--only`` accepts: sweep names -> (sweep, None), tables -> (sweep, table)."""
    out: dict[str, tuple[str, str | None]] = {}
    for name in (*SWEEP_NAMES, *OPT_IN_SWEEPS):
        out[name] = (name, None)
        for table in load_sweep(name).tables:
            out[table] = (name, table)
    return out


def sweeps_for(only: str | Iterable[str] | None) -> tuple[str, ...]:
    """The sweeps ``crener reproduce --only ...`` plans: the table sweeps, then each opt-in sweep
    ``only`` names (planned after them, so a cell both plan keeps the table sweep's tag)."""
    named = _as_tuple(only) or ()
    return (*SWEEP_NAMES, *(s for s in OPT_IN_SWEEPS if s in named))


# --------------------------------------------------------------------------- expansion


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def expand(
    sweep: str | Sweep,
    profile: str | None = None,
    datasets: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    only: str | Iterable[str] | None = None,
    *,
    models: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
    overrides: Iterable[Override] = (),
    sets: dict[str, Any] | None = None,
) -> list[RunConfig]:
    """The cells of one sweep, in run order (seed, dataset, model, variant), one per key.

    ``only`` (table or sweep names) restricts datasets to those tables; a selection naming
    only other sweeps gives an empty list. ``overrides`` (from ``--config`` files) apply after
    the sweep's own; ``sets`` (``--set``) win over everything.
    """
    sw = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    profile = profile or sw.default_profile
    if profile not in PROFILES:
        raise SweepError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    chosen = list(sw.datasets)
    only_t = _as_tuple(only)
    if only_t:
        known = selectors()
        bad = [o for o in only_t if o not in known]
        if bad:
            raise SweepError(f"--only: unknown {', '.join(bad)}; choose from {', '.join(known)}")
        if sw.name not in only_t:
            picked = {
                d for o in only_t if known[o][0] == sw.name and known[o][1] for d in sw.tables[known[o][1]]
            }
            chosen = [d for d in chosen if d in picked]
    if datasets is not None:
        datasets = tuple(datasets)
        if bad := [d for d in datasets if d not in _all_datasets()]:
            raise SweepError(
                f"--datasets: unknown {', '.join(bad)}; choose from {', '.join(_all_datasets())}"
            )
        chosen = [d for d in chosen if d in datasets]
    if models is not None:
        models = tuple(models)
        if bad := [m for m in models if m not in registry.names()]:
            raise SweepError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(registry.names())}")
    model_list = [m for m in sw.models if models is None or m in models]
    variants_t = tuple(variants) if variants is not None else None
    if variants_t is not None and (bad := [v for v in variants_t if v not in VARIANTS]):
        raise SweepError(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    seed_list = tuple(seeds) if seeds is not None else sw.seeds_for(profile)

    def seeded(seed: int, dataset: str) -> bool:  # --seeds overrides the sweep's per-dataset seeds
        return seeds is not None or seed in sw.seeds_for(profile, dataset)

    all_overrides = (*sw.overrides, *overrides)

    out: list[RunConfig] = []
    seen: set[str] = set()
    for seed in seed_list:
        for dataset in chosen:
            if not seeded(seed, dataset):
                continue
            for model in model_list:
                # Variants are ablations of CRENER; other families run their faithful setting only.
                for variant in sw.variants if model == "crener" else ("full",):
                    if variants_t is not None and variant not in variants_t:
                        continue
                    cfg = _build(
                        all_overrides,
                        sets,
                        model=model,
                        variant=variant,
                        profile=profile,
                        dataset=dataset,
                        seed=seed,
                    )
                    if run_key(cfg) not in seen:
                        seen.add(run_key(cfg))
                        out.append(cfg)
    return out


def _all_datasets() -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for s in SWEEP_NAMES for d in load_sweep(s).datasets))


def _build(
    overrides: Iterable[Override],
    sets: dict[str, Any] | None,
    *,
    model: str,
    variant: str,
    profile: str,
    dataset: str,
    seed: int,
) -> RunConfig:
    flat: dict[str, Any] = {}
    for ov in overrides:
        if ov.matches(model=model, variant=variant, dataset=dataset, profile=profile):
            flat.update(ov.values)
    flat.update(VARIANTS[variant] if model == "crener" else {})
    flat.update(sets or {})
    try:
        return _build_cached(
            model, variant, profile, dataset, seed, json.dumps(flat, sort_keys=True, default=list)
        )
    except (KeyError, ValueError) as exc:
        raise SweepError(f"{run_label(model, variant, dataset, seed)} ({profile}): {exc}") from exc


@functools.lru_cache(maxsize=4096)
def _build_cached(
    model: str, variant: str, profile: str, dataset: str, seed: int, flat_json: str
) -> RunConfig:
    # RunConfig is frozen, so sharing one instance is safe; resolving a config costs tens of
    # milliseconds (type hints per key), which adds up over hundreds of cells and repeated plans.
    overrides = json.loads(flat_json)
    return build_run_config(
        model=model, variant=variant, profile=profile, dataset=dataset, seed=seed, overrides=overrides
    )


def plan(
    sweeps: Iterable[str] = SWEEP_NAMES,
    profile: str | None = None,
    *,
    only: str | Iterable[str] | None = None,
    datasets: Iterable[str] | None = None,
    seeds: Iterable[int] | None = None,
    models: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
    configs: Iterable[str | Path] = (),
    sets: dict[str, Any] | None = None,
) -> list[Cell]:
    """Cells of several sweeps in order; a key already planned (CRENER ``full`` in both the main
    and ablation sweeps) keeps its first sweep and is not repeated."""
    extra = tuple(ov for path in configs for ov in load_overrides(path))
    cells: list[Cell] = []
    seen: set[str] = set()
    for name in sweeps:
        for cfg in expand(
            name,
            profile,
            datasets=None if datasets is None else tuple(datasets),
            seeds=None if seeds is None else tuple(seeds),
            only=only,
            models=None if models is None else tuple(models),
            variants=None if variants is None else tuple(variants),
            overrides=extra,
            sets=sets,
        ):
            if run_key(cfg) not in seen:
                seen.add(run_key(cfg))
                cells.append(Cell(name, cfg))
    return cells


def unused_overrides(cells: Iterable[Cell], overrides: Iterable[Override]) -> list[Override]:
    """Overrides that match no planned cell (a likely typo or a profile mismatch)."""
    cells = list(cells)
    return [
        ov
        for ov in overrides
        if not any(
            ov.matches(
                model=c.cfg.model.name,
                variant=c.cfg.variant,
                dataset=c.cfg.data.dataset,
                profile=c.cfg.profile,
            )
            for c in cells
        )
    ]


def shard(cells: list[Cell], worker: int, workers: int) -> list[Cell]:
    """Worker ``worker`` of ``workers`` takes cells whose index % workers == worker."""
    if workers < 1 or not 0 <= worker < workers:
        raise SweepError(f"--worker expects I/N with 0 <= I < N, got {worker}/{workers}")
    return [c for i, c in enumerate(cells) if i % workers == worker]


def format_toml_value(value: Any) -> str:
    """A TOML literal for a config value (strings, numbers, booleans, tuples of ints)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(format_toml_value(v) for v in value) + "]"
    if value is None:
        return '"None"'
    return json.dumps(str(value), ensure_ascii=False)
