"""``crener report``: regenerate tables and figures from the MLflow store (never trains)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from crener.commands import check_folder
from crener.data.datasets import resolve_data_root
from crener.errors import CrenerError
from crener.options import add_data_root, add_profile, non_negative_int, positive_int
from crener.workspace import OPTUNA_STORAGE

# Sweeps whose runs can make the tables: the two of `crener reproduce`, and those of `crener train`
# (adhoc), `crener tune`, `crener encoders` and `crener reproduce --only claim`.
REPORTABLE_SWEEPS = ("main", "ablation", "adhoc", "tune", "encoders", "claim")

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="tables (Markdown, LaTeX, CSV) and figures from the MLflow runs of a profile",
        description="Read the finished runs of one profile from MLflow and write paper-style tables, "
        "figures, run-id footnotes and index.md. Nothing is trained; absent runs are listed as missing.",
    )
    add_profile(p)
    p.add_argument("--out", default="reports/out", help="output directory (default: reports/out)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)",
    )
    p.add_argument(
        "--bootstrap",
        type=positive_int,
        default=1000,
        metavar="N",
        help="bootstrap resamples (default: 1000)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the bootstrap resampling (default: 0)"
    )
    p.add_argument(
        "--msra-protocol",
        default="lineage",
        choices=("lineage", "clean"),
        help="MSRA protocol of Tables 5-6 (the other one gets extra rows in Table 5)",
    )
    p.add_argument("--optuna-storage", default=OPTUNA_STORAGE, help="Optuna storage for the tuning figures")
    p.add_argument(
        "--sweeps",
        default="main,ablation",
        help="comma-separated sweeps whose runs make the tables (default: main,ablation; "
        "add adhoc to include runs of `crener train`)",
    )
    add_data_root(p)  # Table 1's statistics are measured from the data
    p.add_argument(
        "--ablation-shared-x",
        action="store_true",
        help="one Δ F1 scale for all datasets in the ablation chart (default: each panel its own)",
    )
    p.add_argument(
        "--page",
        metavar="FILE",
        help="also write the tables, notes and run ids as one Markdown page stamped with the command, "
        "commit, date and the runs' machines (a committed page, e.g. reports/results-quick.md)",
    )
    p.add_argument(
        "--claim",
        metavar="DATASET",
        help="instead of the report, write the test of the paper's claim that CRENER beats W²NER on DATASET "
        "by its Tables 2-5 margin to --page FILE: the runs of both systems at --profile from --sweeps and the claim "
        "sweep (crener reproduce --only claim), a paired bootstrap over test sentences (--bootstrap, --seed), "
        "tests over seeds, the verdict and every run id (e.g. --claim weibo --profile full --page "
        "reports/claim-weibo.md)",
    )
    p.add_argument(
        "--time-to-accuracy",
        action="store_true",
        help="instead of the report, write to --page FILE what each run of the full variant at --profile from "
        "--sweeps reached on dev in how many minutes of its machine, with the dev-F1-against-minutes figure "
        "beside the page (e.g. --time-to-accuracy --profile full --sweeps adhoc --page "
        "reports/time-to-accuracy.md, for the runs of crener train --time-budget)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    sweeps = tuple(s.strip() for s in args.sweeps.split(",") if s.strip())
    unknown = [s for s in sweeps if s not in REPORTABLE_SWEEPS]
    if unknown or not sweeps:
        raise CrenerError(
            f"--sweeps {args.sweeps!r}: {', '.join(map(repr, unknown)) or 'none given'}; "
            f"choose from {', '.join(REPORTABLE_SWEEPS)}"
        )
    if args.claim is not None:
        from reports.paper import TABLE_DATASET

        if args.claim not in TABLE_DATASET.values():
            raise CrenerError(
                f"--claim {args.claim!r}: the paper compares CRENER and W²NER on "
                f"{', '.join(TABLE_DATASET.values())}; choose one"
            )
        if not args.page:
            raise CrenerError(
                f"--claim writes the page named by --page FILE: add it, e.g. reports/claim-{args.claim}.md"
            )
    if args.time_to_accuracy:
        if args.claim is not None:
            raise CrenerError("--time-to-accuracy and --claim each write their own page: give one")
        if not args.page:
            raise CrenerError(
                "--time-to-accuracy writes the page named by --page FILE: add it, e.g. reports/time-to-accuracy.md"
            )
    # What the report reads and writes, before any of it is made.
    if args.claim is None and not args.time_to_accuracy:  # the claim's page is all it writes
        check_folder(args.out, "--out")
    if args.page:  # its folder is made if missing, as --out's is
        if Path(args.page).is_dir():
            raise CrenerError(f"--page {args.page} is a folder: name a file in it, e.g. results.md")
        check_folder(Path(args.page).parent, f"--page {args.page}: folder")
    if args.data_root:
        resolve_data_root(args.data_root)
    from crener.tracking import check_store
    from crener.workspace import tracking_uri

    check_store(tracking_uri(args.tracking_uri))
    if args.claim is not None:
        from reports.claim import write_claim_page

        path = write_claim_page(
            args.claim,
            args.profile,
            args.page,
            tracking_uri=args.tracking_uri,
            resamples=args.bootstrap,
            seed=args.seed,
            sweeps=sweeps,
            command="crener " + shlex.join(sys.argv[1:]),
        )
        log.info("claim page: %s", path)
        return 0
    if args.time_to_accuracy:
        from reports.timing import write_timing_page

        path = write_timing_page(
            args.profile,
            args.page,
            tracking_uri=args.tracking_uri,
            sweeps=sweeps,
            command="crener " + shlex.join(sys.argv[1:]),
        )
        log.info("time-to-accuracy page: %s", path)
        return 0
    _check_optuna_server(args.optuna_storage)
    from reports.make_report import main  # (loads pandas and matplotlib)

    path = main(
        profile=args.profile,
        out=args.out,
        tracking_uri=args.tracking_uri,
        bootstrap=args.bootstrap,
        seed=args.seed,
        msra_protocol=args.msra_protocol,
        optuna_storage=args.optuna_storage,
        data_root=args.data_root,
        sweeps=sweeps,
        ablation_shared_x=args.ablation_shared_x,
        page=args.page,
        command="crener " + shlex.join(sys.argv[1:]) if args.page else "",
    )
    log.info("report index: %s", path)
    return 0


def _check_optuna_server(storage: str | None) -> None:
    """A ``--optuna-storage`` on a database server answers within seconds, or the report stops
    before it starts (Optuna would wait on a silent port for as long as it stays open). A SQLite
    one is read only when it exists (reports.make_report)."""
    from crener.probe import check_driver, check_server
    from crener.workspace import sqlite_path

    if not storage or sqlite_path(storage) is not None:
        return
    how = "pass --optuna-storage sqlite:///PATH.db or a reachable postgresql+psycopg://USER@HOST/DB URL"
    check_driver(storage, "--optuna-storage", how)
    check_server(storage, "the Optuna storage", how)
