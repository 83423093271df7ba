"""``crener migrate``: bring a tracking store made under an older run identity up to today's
:func:`crener.identity.run_key`, so its finished cells are found again instead of retrained.

For every crener run in the MLflow store (tune trials included):

1. rebuild its :class:`RunConfig` from its logged params (:meth:`RunConfig.from_flat`); params of
   fields that no longer exist are dropped and reported, and the fields added since take their
   defaults, exactly as the key treats them;
2. compute its key, with the data digest the run logged (``crener.data_digest``) or, for runs
   made before that tag, the digest of the dataset files as they are now;
3. rename its folder ``{runs}/{profile}/{old key}`` to ``{runs}/{profile}/{new key}`` and write
   the new key into its checkpoints and ``summary.json``;
4. only then retag it: ``crener.key`` (the old one kept as ``crener.legacy_key``),
   ``crener.key_schema`` and ``crener.data_digest``.

The folder moves before the tag, so an interrupted migration is completed by running it again,
and a run already migrated is left as it is: the command is idempotent. Two old runs that now
share a key (they differed only in a field that no longer counts, e.g. ``runtime.grid_input``) are
both retagged, and the second folder is left in place and reported. MLflow artifacts (the
``summary.json`` logged with the run) are immutable and keep the old key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crener.config import RUNTIME_ALIASES, RunConfig, run_label
from crener.errors import CrenerError
from crener.files import write_atomic
from crener.identity import KEY_SCHEMA, run_key
from crener.options import add_data_root, add_runs_dir
from crener.workspace import resolve_runs_dir

log = logging.getLogger(__name__)

LEGACY_KEY_TAG = "crener.legacy_key"
CHECKPOINT_GLOB = "checkpoints/*.pt"
SUMMARY_FILE = "summary.json"
TOP_LEVEL_PARAMS = ("profile", "variant")


@dataclass
class RunMigration:
    """What ``migrate_store`` did (or, with ``dry_run``, would do) to one run."""

    run_id: str
    label: str  # model:variant/dataset/sSEED
    old_key: str
    new_key: str = ""
    action: str = "unchanged"  # unchanged | retagged | skipped (see error)
    folder: str = ""  # what happened to the run folder
    rewritten: int = 0  # checkpoint and summary files whose key was rewritten
    dropped: list[str] = field(default_factory=list)  # params of fields that no longer exist
    error: str = ""


def rebuild_config(params: dict[str, str]) -> tuple[RunConfig, list[str]]:
    """The run's config from its MLflow params, and the config params it had to drop."""
    known = set(RunConfig().flatten()) | set(RUNTIME_ALIASES)  # old flat names map to runtime.*
    flat = {k: v for k, v in params.items() if "." in k or k in TOP_LEVEL_PARAMS}
    dropped = sorted(k for k in flat if k not in known)
    return RunConfig.from_flat({k: v for k, v in flat.items() if k in known}), dropped


def migrate_store(
    tracker: Any,
    runs_dir: str | Path | None = None,
    *,
    data_root: str | None = None,
    dry_run: bool = False,
) -> list[RunMigration]:
    """Migrate every crener run of ``tracker`` (a :class:`crener.tracking.Tracker`) and the run
    folders under ``runs_dir`` (default ``$CRENER_RUNS``, else ``runs``); see the module docstring.
    ``data_root`` overrides where each run's dataset is read for its digest."""
    from crener.data.digest import dataset_digest

    root = resolve_runs_dir(runs_dir)
    out: list[RunMigration] = []
    for run in tracker.crener_runs(include_tune=True):
        tags = run.tags
        label = run_label(*(tags.get(f"crener.{k}") for k in ("model", "variant", "dataset", "seed")))
        item = RunMigration(run.run_id, label, tags["crener.key"])
        out.append(item)
        try:
            if not any("." in k for k in run.params):
                raise CrenerError("no config params logged")
            cfg, item.dropped = rebuild_config(run.params)
            if data_root is not None:
                cfg = cfg.with_overrides({"runtime.data_root": data_root})
            digest = tags.get("crener.data_digest") or dataset_digest(cfg.data, cfg.runtime.data_root)
            item.new_key = run_key(cfg, data_digest=digest)
        except (CrenerError, KeyError, ValueError) as exc:
            item.action, item.error = "skipped", f"{type(exc).__name__}: {exc}"
            log.warning("run %s (%s): not migrated: %s", run.run_id, item.label, item.error)
            continue
        if item.dropped:
            log.warning("run %s (%s): params of removed fields ignored: %s", run.run_id, item.label,
                        ", ".join(item.dropped))  # fmt: skip
        # A retagged run remembers the key its folder was named by, so a rerun finishes the move.
        folder_key = item.old_key if item.old_key != item.new_key else tags.get(LEGACY_KEY_TAG, item.new_key)
        item.folder, item.rewritten = _move_folder(
            root / cfg.profile, folder_key, item.new_key, dry_run=dry_run
        )
        if item.old_key != item.new_key:
            item.action = "retagged"
            if not dry_run:
                tracker.set_tags(
                    run.run_id,
                    {
                        "crener.key": item.new_key,
                        LEGACY_KEY_TAG: item.old_key,
                        "crener.key_schema": str(KEY_SCHEMA),
                        "crener.data_digest": digest,
                    },
                )
    return out


def _move_folder(profile_dir: Path, old: str, new: str, *, dry_run: bool) -> tuple[str, int]:
    """Rename ``profile_dir/old`` to ``profile_dir/new`` and rewrite the keys inside; returns
    (what happened, files rewritten)."""
    src, dst = profile_dir / old, profile_dir / new
    if old != new and src.is_dir():
        if dst.exists():
            return f"left {src}: {dst} exists (another run has this key)", 0
        if dry_run:
            return f"would rename {src} -> {dst}", 0
        os.replace(src, dst)
        note = f"renamed {src} -> {dst}"
    elif dst.is_dir():
        note = f"{dst}"
    else:
        return "no folder", 0
    return note, 0 if dry_run else _rewrite_keys(dst, new)


def _rewrite_keys(workdir: Path, key: str) -> int:
    """Write ``key`` into the checkpoints and ``summary.json`` of ``workdir`` where it differs."""
    from crener.checkpoint import load_checkpoint, save_checkpoint  # (loads torch)

    changed = 0
    for path in sorted(workdir.glob(CHECKPOINT_GLOB)):
        state = load_checkpoint(path)  # torch.load(weights_only=True)
        if state.get("key") != key:
            save_checkpoint(path, {**state, "key": key})
            changed += 1
    summary = workdir / SUMMARY_FILE
    if summary.is_file():
        data = json.loads(summary.read_text(encoding="utf-8"))
        if data.get("key") != key:
            write_atomic(summary, json.dumps({**data, "key": key}, indent=2))
            changed += 1
    return changed


# --------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="rekey an MLflow store and its run folders made under an older run identity (idempotent)",
        description=__doc__.split("\n\n")[0],
    )
    add_runs_dir(p)
    add_data_root(p)  # for the data digests of runs that did not log one
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from crener.data.datasets import resolve_data_root
    from crener.files import check_existing_folder
    from crener.tracking import Tracker
    from crener.workspace import check_store_exists

    # A typo in a folder would find no run folder and report every run as having none.
    check_existing_folder(args.runs_dir, "--runs-dir")
    if args.data_root:
        resolve_data_root(args.data_root)
    check_store_exists("nothing to migrate")
    tracker = Tracker()
    results = migrate_store(tracker, args.runs_dir, data_root=args.data_root, dry_run=args.dry_run)
    for r in results:
        line = f"{r.action:9s} {r.run_id[:12]} {r.label:32s} {r.old_key} -> {r.new_key or '?'}"
        extra = r.error or r.folder
        if r.dropped:
            extra += f"; dropped params {', '.join(r.dropped)}"
        sys.stdout.write(f"{line}  {extra}\n")
    counts = {a: sum(r.action == a for r in results) for a in ("retagged", "unchanged", "skipped")}
    sys.stdout.write(
        f"{len(results)} run(s) in {tracker.uri}: "
        + ", ".join(f"{n} {a}" for a, n in counts.items())
        + (" (dry run: nothing written)" if args.dry_run else "")
        + "\n"
    )
    return 1 if counts["skipped"] else 0
