"""The dataset registry and :func:`load_dataset`: which files make up a dataset, and how its
splits are cut (MSRA dev protocols, train/eval budgets).

The four benchmarks live under one data root (``shared/data`` of this project; see its
README for sources and statistics). Users add their own with :func:`register_dataset`.
Parsed files are cached in-process, keyed on path and modification time, because sweeps load
the same files many times.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from crener.config import DataConfig
from crener.data.readers import FORMATS, ReadResult, read_conll
from crener.data.schema import Sentence
from crener.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
DATA_ENV = "CRENER_DATA"  # environment variable naming the data root
# MSRA's "clean" dev split: the last 4,365 training sentences, the FLAT-style dev file
# (shared/data/README.md: sentences 41,999-46,363 of train), the same size as MSRA test.
MSRA_CLEAN_DEV_SIZE = 4_365
# For a registered dataset without dev, the clean protocol holds out this share of train.
CLEAN_DEV_FRACTION = 0.1


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset's files are and how to read them."""

    name: str
    dir: str  # relative to the data root, or absolute
    files: dict[str, str]  # split -> file name inside ``dir``; "dev" may be missing
    fmt: str = "auto"  # tag format: auto | bmes | bio | bioes
    clean_dev_size: int | None = None  # no dev file, clean protocol: last N train sentences

    def path(self, split: str, root: Path) -> Path:
        if split not in self.files:
            raise DataError(f"dataset {self.name!r} has no {split} split (it has {', '.join(self.files)})")
        return (root / self.dir if not Path(self.dir).is_absolute() else Path(self.dir)) / self.files[split]


DATASETS: dict[str, DatasetSpec] = {
    "weibo": DatasetSpec("weibo", "weibo", {s: f"{s}.all.bmes" for s in SPLITS}, "bmes"),
    "resume": DatasetSpec("resume", "resume", {s: f"{s}.char.bmes" for s in SPLITS}, "bmes"),
    "ontonotes4": DatasetSpec("ontonotes4", "ontonotes4", {s: f"{s}.char.bmes" for s in SPLITS}, "bmes"),
    "msra": DatasetSpec(
        "msra",
        "msra",
        {"train": "train.char.bmes", "test": "test.char.bmes"},
        "bmes",
        clean_dev_size=MSRA_CLEAN_DEV_SIZE,
    ),
}


def register_dataset(
    name: str, dir: str | Path, files: dict[str, str], fmt: str = "auto", clean_dev_size: int | None = None
) -> DatasetSpec:
    """Add (or replace) a dataset: ``files`` maps ``train``/``test`` (and optionally ``dev``)
    to file names inside ``dir`` (absolute, or relative to the data root)."""
    missing = {"train", "test"} - set(files)
    if missing:
        raise ValueError(f"dataset {name!r} needs train and test files; missing {', '.join(sorted(missing))}")
    unknown = set(files) - set(SPLITS)
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown split(s) {', '.join(sorted(unknown))}")
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    spec = DatasetSpec(name, str(dir), dict(files), fmt, clean_dev_size)
    DATASETS[name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def resolve_data_root(cli_value: str | Path | None = None) -> Path:
    """The data root: ``cli_value`` (``--data-root``), then ``$CRENER_DATA``, then the first
    ``shared/data`` found walking up from this package and from the current directory."""
    how = f"pass --data-root DIR or set {DATA_ENV}=DIR"
    if cli_value is not None and str(cli_value) != "":
        root = Path(cli_value).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data root given by --data-root / runtime.data_root is not a directory; {how}", str(root)
            )
        return root
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"data root given by ${DATA_ENV} is not a directory; {how}", str(root))
        return root
    tried: list[str] = []
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
            tried.append(str(candidate))
    raise DataError(
        f"no data root found: {DATA_ENV} is unset and no shared/data directory exists above the package "
        f"or the current directory (tried {', '.join(dict.fromkeys(tried))}); {how}"
    )


def read_split(path: Path, fmt: str = "auto", coarse_types: bool = False) -> ReadResult:
    """:func:`read_conll` with an in-process cache keyed on path, mtime and size."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError("file not found", str(path)) from None
    cached = _read_cached(str(path), stat.st_mtime_ns, stat.st_size, fmt, coarse_types)
    # Fresh lists for every caller, so nobody can change the cached copy in place.
    return dataclasses.replace(
        cached, sentences=list(cached.sentences), repairs=list(cached.repairs), problems=list(cached.problems)
    )


@functools.lru_cache(maxsize=32)
def _read_cached(path: str, mtime_ns: int, size: int, fmt: str, coarse: bool) -> ReadResult:
    del mtime_ns, size  # only part of the cache key: an edited file is read again
    return read_conll(path, fmt=fmt, coarse_types=coarse)


@dataclass
class DatasetSplits:
    """The three splits of one dataset, ready for training and evaluation."""

    name: str
    train: list[Sentence]
    dev: list[Sentence]
    test: list[Sentence]
    types: tuple[str, ...]  # sorted entity types of train + dev, never test (before any budget)
    repaired: dict[str, int]  # split -> malformed spans repaired while reading (kept sentences)
    dev_is_test: bool = False  # MSRA lineage protocol: dev is the test set
    notes: list[str] = field(default_factory=list)  # human-readable record of what was done
    files: dict[str, str] = field(default_factory=dict)  # split -> file it came from


def load_dataset(cfg: DataConfig, seed: int = 0, data_root: str | Path | None = None) -> DatasetSplits:
    """Load ``cfg.dataset`` from ``data_root`` (``runtime.data_root``; see :func:`resolve_data_root`)
    and cut its splits (see :class:`DataConfig`)."""
    spec = get_spec(cfg.dataset)
    root = resolve_data_root(data_root)
    coarse = cfg.weibo_coarse
    results = {split: read_split(spec.path(split, root), spec.fmt, coarse) for split in spec.files}
    files = {split: str(spec.path(split, root)) for split in spec.files}
    # Keep (sentence, repairs in it) pairs so cutting a split keeps its repair count right.
    pools = {split: _with_repairs(result) for split, result in results.items()}
    notes: list[str] = []
    dev_is_test = False
    if "dev" not in pools:
        if cfg.msra_protocol == "lineage":
            pools["dev"] = pools["test"]
            files["dev"] = files["test"]
            dev_is_test = True
            notes.append(f"{spec.name} has no dev split: dev = test (lineage protocol)")
        else:
            train = pools["train"]
            size = spec.clean_dev_size or max(1, int(len(train) * CLEAN_DEV_FRACTION))
            if size >= len(train):
                raise DataError(
                    f"clean protocol needs more than {size} training sentences to hold out a dev split, "
                    f"found {len(train)}",
                    files["train"],
                )
            pools["dev"], pools["train"] = train[-size:], train[:-size]
            files["dev"] = files["train"]
            notes.append(
                f"{spec.name} has no dev split: dev = last {size:,} training sentences (clean protocol)"
            )
    for split in SPLITS:
        if not pools[split]:
            raise DataError(f"{split} split is empty", files[split])
    # The label set comes from train and dev only: test labels are never read to build it (nor
    # dev's when dev is the test set). A test entity of a type outside it cannot be predicted,
    # so it is scored as a miss.
    labelled = ("train",) if dev_is_test else ("train", "dev")
    types = tuple(sorted({e.type for split in labelled for s, _ in pools[split] for e in s.entities}))
    if cfg.train_limit > 0 and cfg.train_limit < len(pools["train"]):
        train = list(pools["train"])
        random.Random(seed).shuffle(train)
        pools["train"] = train[: cfg.train_limit]
        notes.append(
            f"train limited to {cfg.train_limit:,} of {len(train):,} sentences (shuffle seed {seed})"
        )
    if cfg.test_limit > 0 and cfg.test_limit < len(pools["test"]):
        # A fixed sample (seed 0, whatever the run's seed) in file order, so every run of a
        # profile is scored on the same sentences and paired comparisons stay valid.
        keep = sorted(random.Random(0).sample(range(len(pools["test"])), cfg.test_limit))
        notes.append(
            f"test limited to a fixed sample of {cfg.test_limit:,} of {len(pools['test']):,} sentences"
        )
        sample = [pools["test"][i] for i in keep]
        if dev_is_test:
            pools["dev"] = sample
        pools["test"] = sample
    if cfg.eval_limit > 0 and cfg.eval_limit < len(pools["dev"]):
        notes.append(f"dev limited to its first {cfg.eval_limit:,} of {len(pools['dev']):,} sentences")
        pools["dev"] = pools["dev"][: cfg.eval_limit]
    for note in notes:
        log.info("%s", note)
    return DatasetSplits(
        name=spec.name,
        train=[s for s, _ in pools["train"]],
        dev=[s for s, _ in pools["dev"]],
        test=[s for s, _ in pools["test"]],
        types=types,
        repaired={split: sum(n for _, n in pools[split]) for split in SPLITS},
        dev_is_test=dev_is_test,
        notes=notes,
        files=files,
    )


def _with_repairs(result: ReadResult) -> list[tuple[Sentence, int]]:
    per_sentence = [0] * len(result.sentences)
    for repair in result.repairs:
        per_sentence[repair.sentence] += 1
    return list(zip(result.sentences, per_sentence))
