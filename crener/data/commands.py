"""``crener data``: look at the data before training on it.

* ``crener data stats DATASET`` - per split: sentences, characters, entities (per type),
  length percentiles, repaired spans, sentences over ``max_len``, and whether every sentence's
  gold entities survive a grid encode -> decode round trip under both tag schemes.
* ``crener data check FILE`` - every problem of one CoNLL file with ``file:line``; exit 1 if any.
* ``crener data batches DATASET --profile P`` - one training epoch's steps and batch sizes.
* ``crener data bench DATASET`` - seconds and sentences/s to read and grid-encode a split.

Results go to stdout (tables, or one JSON object with ``--json``); diagnostics go to logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crener.config import DataConfig
from crener.data.datasets import DATASETS, SPLITS, get_spec, read_split, resolve_data_root
from crener.data.readers import FORMATS, read_conll
from crener.data.schema import Sentence
from crener.errors import DataError
from crener.options import add_data_root, add_overrides, add_profile

log = logging.getLogger(__name__)

ROUNDTRIP_SCHEMES = ("crener", "w2ner")
# Length percentiles use numpy's "lower" method: always an observed length (an int).
PERCENTILE_METHOD = "lower"


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset statistics, file checks, reader benchmark")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    known = ", ".join(sorted(DATASETS))

    stats = sub.add_parser("stats", help="per-split statistics and grid round trip of a dataset")
    stats.add_argument("dataset", metavar="DATASET", help=f"registered dataset ({known})")
    stats.add_argument("--split", choices=SPLITS, help="only this split (default: all the dataset has)")
    stats.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    add_data_root(stats)
    stats.add_argument(
        "--max-len", type=int, default=DataConfig.max_len, help="count sentences longer than this"
    )
    stats.add_argument("--coarse", action="store_true", help="coarse Weibo types (PER.NAM -> PER)")
    stats.set_defaults(func=cmd_stats)

    check = sub.add_parser("check", help="report every problem of one CoNLL file (exit 1 if any)")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="tag format")
    check.set_defaults(func=cmd_check)

    batches = sub.add_parser("batches", help="one training epoch's batches under a profile: steps, sizes")
    batches.add_argument("dataset", metavar="DATASET", help=f"registered dataset ({known})")
    add_profile(batches)
    batches.add_argument(
        "--model", default="crener", help="model family whose defaults apply (default: crener)"
    )
    add_overrides(batches)
    add_data_root(batches)
    batches.add_argument("--json", action="store_true", help="one JSON object on stdout")
    batches.set_defaults(func=cmd_batches)

    bench = sub.add_parser("bench", help="time reading and grid-encoding one split")
    bench.add_argument("dataset", metavar="DATASET", help=f"registered dataset ({known})")
    bench.add_argument("--split", choices=SPLITS, default="train")
    add_data_root(bench)
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bench.set_defaults(func=cmd_bench)


# --- stats -------------------------------------------------------------------------------------


def split_stats(
    sentences: Sequence[Sentence], repaired: int, max_len: int, types: Sequence[str]
) -> dict[str, Any]:
    """The statistics of one split (the ``splits.SPLIT`` object of ``data stats --json``)."""
    import numpy as np

    from crener.data.grid import LabelSet

    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    type_counts = Counter(e.type for s in sentences for e in s.entities)
    roundtrip = {}
    for scheme in ROUNDTRIP_SCHEMES:
        labels = LabelSet.build(scheme, types)
        ok = sum(_roundtrips(labels, s) for s in sentences)
        roundtrip[scheme] = {"ok": ok, "total": len(sentences)}
    pct = {
        q: int(np.percentile(lengths, q, method=PERCENTILE_METHOD)) if lengths.size else 0 for q in (50, 95)
    }
    return {
        "sentences": len(sentences),
        "characters": int(lengths.sum()),
        "entities": sum(type_counts.values()),
        "types": dict(sorted(type_counts.items())),
        "repaired_spans": repaired,
        "over_max_len": int((lengths > max_len).sum()),
        "lengths": {
            "mean": round(float(lengths.mean()), 1) if lengths.size else 0.0,
            "p50": pct[50],
            "p95": pct[95],
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "roundtrip": roundtrip,
    }


def _roundtrips(labels, sentence: Sentence) -> bool:
    n = len(sentence)
    return labels.decode(n, labels.encode(sentence.entities, n)) == set(sentence.entities)


def dataset_stats(
    name: str,
    data_root: str | None = None,
    split: str | None = None,
    max_len: int = DataConfig.max_len,
    coarse: bool = False,
) -> dict[str, Any]:
    """``{"dataset": name, "splits": {split: split_stats(...)}}`` over the dataset's own files.

    The files are read as they are (MSRA: train and test only); dev protocols and budgets of
    :func:`~crener.data.datasets.load_dataset` do not apply here.
    """
    spec = get_spec(name)
    wanted = [split] if split else [s for s in SPLITS if s in spec.files]
    for s in wanted:
        spec.path(s, Path())  # an unknown split is an error before the data root is looked for
    root = resolve_data_root(data_root)
    results = {s: read_split(spec.path(s, root), spec.fmt, coarse) for s in wanted}
    # One label set over the types of the splits read, so every gold type is encodable.
    types = sorted({e.type for r in results.values() for s in r.sentences for e in s.entities}) or ["_"]
    return {
        "dataset": name,
        "splits": {s: split_stats(r.sentences, r.repaired, max_len, types) for s, r in results.items()},
    }


def cmd_stats(args: argparse.Namespace) -> int:
    if args.max_len < 1:
        raise DataError(f"--max-len must be positive, got {args.max_len}")
    stats = dataset_stats(args.dataset, args.data_root, args.split, args.max_len, args.coarse)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False))
    else:
        print(format_stats(stats, args.max_len))
    bad = {
        (split, scheme): rt
        for split, st in stats["splits"].items()
        for scheme, rt in st["roundtrip"].items()
        if rt["ok"] != rt["total"]
    }
    for (split, scheme), rt in bad.items():
        log.warning("%s %s: %d sentences do not round-trip under %s", args.dataset, split,
                    rt["total"] - rt["ok"], scheme)  # fmt: skip
    return 0


def format_stats(stats: dict[str, Any], max_len: int) -> str:
    from tabulate import tabulate

    splits = stats["splits"]
    rows = []
    for split, st in splits.items():
        ln, rt = st["lengths"], st["roundtrip"]
        rows.append(
            [
                split,
                st["sentences"],
                st["characters"],
                st["entities"],
                st["repaired_spans"],
                ln["mean"],
                ln["p50"],
                ln["p95"],
                ln["max"],
                st["over_max_len"],
                *(f"{rt[s]['ok']}/{rt[s]['total']}" for s in ROUNDTRIP_SCHEMES),
            ]
        )
    headers = [
        "split",
        "sentences",
        "chars",
        "entities",
        "repaired",
        "mean len",
        "p50",
        "p95",
        "max",
        f"> {max_len}",
        *(f"round trip {s}" for s in ROUNDTRIP_SCHEMES),
    ]
    types = sorted({t for st in splits.values() for t in st["types"]})
    type_rows = [[t, *(st["types"].get(t, 0) for st in splits.values())] for t in types]
    return "\n".join(
        [
            f"dataset: {stats['dataset']}",
            tabulate(rows, headers=headers, intfmt=",", floatfmt=".1f"),
            "",
            "entities by type",
            tabulate(type_rows, headers=["type", *splits], intfmt=","),
        ]
    )


# --- check -------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():  # a wrong path is the command's mistake, not a finding about a file
        what = "is a folder, not a CoNLL file" if path.is_dir() else "no such file; check the path"
        raise DataError(what, args.file)
    try:
        result = read_conll(args.file, fmt=args.format, errors="collect")
    except DataError as exc:  # unreadable as a whole (missing, empty): still a finding of check
        print(exc)
        return 1
    for repair in result.repairs:
        log.warning("%s:%d: repaired: %s", args.file, repair.line, repair.message)
    for problem in result.problems:
        print(problem)
    n_entities = sum(len(s.entities) for s in result.sentences)
    summary = (
        f"{args.file}: {len(result.sentences):,} sentences, {n_entities:,} entities, format "
        f"{result.fmt.upper()}, {result.repaired} repaired spans, {len(result.problems)} problems"
    )
    print(summary)
    return 1 if result.problems else 0


# --- bench -------------------------------------------------------------------------------------


def epoch_batches(dataset: str, profile: str, model: str = "crener", overrides: Sequence[str] = (),
                  data_root: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Steps and batch sizes of one training epoch (seed 0) as ``profile`` batches ``dataset``."""
    import numpy as np

    from crener.config import parse_set
    from crener.data.batching import batch_cells, training_batches
    from crener.data.datasets import load_dataset
    from crener.data.split import split_all
    from crener.profiles import build_run_config

    flat = parse_set(list(overrides))
    if data_root:
        flat["runtime.data_root"] = data_root
    cfg = build_run_config(model=model, profile=profile, dataset=dataset, overrides=flat)
    data = load_dataset(cfg.data, seed=0, data_root=cfg.runtime.data_root)
    lengths = [len(c.sentence) for c in split_all(data.train, cfg.data.max_len)]
    batches = training_batches(lengths, cfg.train, np.random.default_rng(0))
    sizes = Counter(len(b) for b in batches)
    cells = sorted(batch_cells(b, lengths) for b in batches)
    t = cfg.train
    rule = (f"{t.batch_size} sentences from length-sorted buckets" + (f", guard {t.max_cells:,} cells" if t.max_cells else "")
            if t.sorted_batches else f"cell budget {t.max_cells:,}" if t.max_cells else f"{t.batch_size} sentences, random order")  # fmt: skip
    steps = len(batches) if not t.max_steps else min(len(batches), t.max_steps)
    return {
        "dataset": dataset, "profile": profile, "rule": rule, "chunks": len(lengths), "batches": len(batches),
        "steps_per_epoch": steps, "median_batch": int(np.median([len(b) for b in batches])),
        "sizes": {int(k): v for k, v in sorted(sizes.items())}, "median_cells": cells[len(cells) // 2],
        "max_cells": cells[-1],
    }  # fmt: skip


def cmd_batches(args: argparse.Namespace) -> int:
    out = epoch_batches(args.dataset, args.profile, args.model, args.overrides or (), args.data_root)
    if args.json:
        print(json.dumps(out))
        return 0
    from tabulate import tabulate

    print(
        f"{out['dataset']} train, profile {out['profile']} ({out['rule']}): {out['chunks']:,} chunks in "
        f"{out['batches']:,} batches, {out['steps_per_epoch']:,} steps an epoch; median batch "
        f"{out['median_batch']} sentences, {out['median_cells']:,} cells (largest {out['max_cells']:,})\n"
        + tabulate(list(out["sizes"].items()), headers=["sentences a batch", "batches"])
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from crener.data.grid import LabelSet

    spec = get_spec(args.dataset)
    spec.path(args.split, Path())  # an unknown split is an error before the data root is looked for
    path = spec.path(args.split, resolve_data_root(args.data_root))
    t0 = time.perf_counter()
    result = read_conll(path, fmt=spec.fmt)  # uncached on purpose: this times the reader
    read_s = time.perf_counter() - t0
    sentences = result.sentences
    types = sorted({e.type for s in sentences for e in s.entities}) or ["_"]
    n, chars = len(sentences), sum(len(s) for s in sentences)
    timings: dict[str, float] = {"read": read_s}
    for scheme in ROUNDTRIP_SCHEMES:
        labels = LabelSet.build(scheme, types)
        t0 = time.perf_counter()
        for s in sentences:
            labels.encode(s.entities, len(s))
        timings[f"encode_{scheme}"] = time.perf_counter() - t0
    out = {
        "dataset": args.dataset,
        "split": args.split,
        "file": str(path),
        "megabytes": round(Path(path).stat().st_size / 1e6, 1),
        "sentences": n,
        "characters": chars,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "sentences_per_s": {k: round(n / v) if v > 0 else None for k, v in timings.items()},
    }
    if args.json:
        print(json.dumps(out))
        return 0
    from tabulate import tabulate

    rows = [[k, v, out["sentences_per_s"][k]] for k, v in out["seconds"].items()]
    total = read_s + timings["encode_crener"]
    rows.append(["read + encode_crener", round(total, 3), round(n / total) if total > 0 else None])
    print(
        f"{args.dataset} {args.split}: {out['megabytes']} MB, {n:,} sentences, {chars:,} characters\n"
        + tabulate(rows, headers=["stage", "seconds", "sentences/s"], intfmt=",", floatfmt=".3f")
    )
    return 0
