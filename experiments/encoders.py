"""`crener encoders`: what each part of the shipped encoder's construction is worth.

Four encoders of one architecture and vocabulary, all built by ``crener pretrain`` with the shipped
encoder's settings (crener/assets/crener-char/card.json), so that only the weights differ:

- ``random``: no initialisation, no pretraining (``--vectors none --steps 0``);
- ``init``: the People's Daily vectors through the fixed projection, no pretraining (``--steps 0``);
- ``pretrained``: masked-LM pretraining from a random start (``--vectors none``);
- ``pretrained+init``: both, the shipped ``crener-char``.

Each is used as the profile uses the shipped one (``quick``: frozen, a fixed feature extractor), under
CRENER ``full`` on each dataset and seed. Runs go to MLflow as sweep ``encoders`` (never a table
cell: the reports select the table sweeps), and ``reports/out/<profile>/encoders.md`` gets test F1 as
mean ± std over the seeds, with the run ids.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from crener.config import PROFILES, build_run_config, parse_set
from crener.files import write_atomic

log = logging.getLogger(__name__)

SWEEP = "encoders"
SHIPPED = "crener-char"
# arm -> (initialise from the vectors, pretraining steps; None: the shipped card's)
ARMS: dict[str, tuple[bool, int | None]] = {
    "random": (False, 0),
    "init": (True, 0),
    "pretrained": (False, None),
    "pretrained+init": (True, None),
}
BUILD_DIR = Path(".crener") / "encoders"


def register(subparsers: Any) -> None:
    from crener.commands import count_int, non_negative_int

    p = subparsers.add_parser(
        "encoders",
        help="encoder ablation: random, vectors only, pretrained only, pretrained + vectors (issue 13)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--datasets", nargs="+", default=["resume", "weibo"])
    p.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0, 1, 2, 3, 4])
    p.add_argument("--profile", default="quick", choices=list(PROFILES))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every cell")
    p.add_argument("--build-dir", default=str(BUILD_DIR), help="where the non-shipped encoders are built")
    p.add_argument("--data-root", default=None)
    p.add_argument("--runs-dir", default=None, help="default: $CRENER_RUNS or runs")
    p.add_argument("--jobs", type=count_int, default=1, help="worker processes (as crener reproduce --jobs)")
    p.add_argument("--no-report", action="store_true")
    p.set_defaults(func=cmd_encoders)


def build_encoders(arms: list[str], build_dir: Path, data_root: str | None) -> dict[str, str]:
    """``{arm: encoder name or path}``; builds the missing ones (a killed build resumes)."""
    from crener.encoder import SHIPPED_ENCODERS
    from crener.pretrain import PretrainConfig, pretrain

    card = json.loads((SHIPPED_ENCODERS[SHIPPED] / "card.json").read_text(encoding="utf-8"))
    shipped = PretrainConfig.from_identity(card["config"], out="")
    out: dict[str, str] = {}
    for arm in arms:
        vectors, steps = ARMS[arm]
        if vectors and steps is None:
            out[arm] = SHIPPED
            continue
        path = build_dir / arm.replace("+", "-")
        cfg = replace(
            shipped, out=str(path), data_root=data_root, vectors=shipped.vectors if vectors else None,
            steps=shipped.steps if steps is None else steps,
        )  # fmt: skip
        if not (path / "config.json").is_file():
            log.info("building encoder %s in %s (%d pretraining steps)", arm, path, cfg.steps)
            pretrain(cfg, workdir=build_dir / "state" / path.name, progress=False)
        out[arm] = str(path.resolve())
    return out


def plan(args: argparse.Namespace, encoders: dict[str, str]) -> list[tuple[str, Any]]:
    """``[(arm, cell), ...]`` for every arm, dataset and seed, each config checked."""
    from crener.commands import check_run_config
    from experiments.sweeps import Cell

    sets = parse_set(args.set)
    if args.data_root:
        sets.setdefault("data.data_root", args.data_root)
    return [
        (arm, Cell(SWEEP, check_run_config(build_run_config(
            profile=args.profile, dataset=d, seed=s, overrides={**sets, "model.encoder": encoders[arm]}
        ))))
        for arm in args.arms for d in args.datasets for s in args.seeds
    ]  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before an encoder is built (thousands of pretraining steps): the datasets,
    the folders, and the cells' configs (planned with the encoders' names standing in)."""
    from crener.commands import check_folder, check_run_inputs
    from crener.data.datasets import get_spec

    for name in args.datasets:
        get_spec(name)
    check_folder(args.build_dir, "--build-dir")
    stand_in = {arm: SHIPPED for arm in args.arms}
    for _, cell in plan(args, stand_in)[:1]:
        check_run_inputs(cell.cfg, runs_dir=args.runs_dir)


def cmd_encoders(args: argparse.Namespace) -> int:
    from experiments.commands import run_cells, spawn_jobs

    check_args(args)
    encoders = build_encoders(args.arms, Path(args.build_dir), args.data_root)  # before any worker starts
    planned = plan(args, encoders)
    if args.jobs > 1:
        rc = spawn_jobs(args.argv, args.jobs, args.set)
    else:
        _, failed = run_cells([cell for _, cell in planned], runs_dir=args.runs_dir, data_root=args.data_root)
        rc = 1 if failed else 0
    if not args.no_report:
        write_report(args, encoders, planned)
    return rc


def write_report(args: argparse.Namespace, encoders: dict[str, str], planned: list[tuple[str, Any]]) -> Path:
    """Test F1 per arm and dataset, mean ± std over the seeds that finished, from MLflow."""
    from crener.tracking import Tracker
    from reports.stats import format_mean_std

    tracker = Tracker()
    rows: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for arm, cell in planned:
        done = next((r for r in tracker.find_runs(cell.cfg.key()) if r.finished), None)
        if done is None:
            continue
        f1 = done.metrics.get("best/test_f1")
        if f1 is not None:
            rows.setdefault((arm, cell.cfg.data.dataset), []).append((cell.cfg.train.seed, f1, done.run_id))
    lines = [
        f"# Encoder ablation ({args.profile}, CRENER full)",
        "",
        "Test F1 ×100, mean ± sample std over seeds; each encoder used as the profile uses the shipped one.",
        "",
        "| encoder | " + " | ".join(args.datasets) + " |",
        "|---|" + "---:|" * len(args.datasets),
    ]
    for arm in args.arms:
        row = [f"{arm} (`{Path(encoders[arm]).name}`)"]
        for d in args.datasets:
            vals = [f for _, f, _ in rows.get((arm, d), [])]
            row.append(f"{format_mean_std(vals)} (n={len(vals)})" if vals else format_mean_std(vals))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Runs (MLflow run id per arm, dataset, seed):", ""]
    for (arm, d), items in sorted(rows.items()):
        lines.append(
            f"- {arm} / {d}: " + ", ".join(f"s{s} `{rid}` {100 * f:.2f}" for s, f, rid in sorted(items))
        )
    out = write_atomic(Path("reports") / "out" / args.profile / "encoders.md", "\n".join(lines) + "\n")
    log.info("encoder ablation written to %s", out)
    return out
