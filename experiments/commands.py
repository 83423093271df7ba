"""``crener reproduce``, ``crener tune`` and ``crener ui``: argument parsing and progress logs only.

The work lives in :mod:`experiments.sweeps` (what to run), :mod:`crener.runner` (running one
cell once) and :mod:`experiments.tune` (Optuna); MLflow details stay in :mod:`crener.tracking`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from crener import registry
from crener.commands import check_output_file, check_run_config, check_run_inputs
from crener.config import canonical_key, parse_set
from crener.errors import CrenerError
from crener.files import check_page_file
from crener.identity import run_key
from crener.options import (
    add_run_options,
    add_seeds,
    add_time_budget,
    count_int,
    int_at_least,
    non_negative_int,
)
from crener.profiles import VARIANTS, build_run_config
from crener.workspace import OPTUNA_STORAGE

log = logging.getLogger(__name__)

DEFAULT_UI_PORT = 5000
LOOPBACK = "127.0.0.1"


def register(subparsers: Any) -> None:
    _register_reproduce(subparsers)
    _register_tune(subparsers)
    _register_ui(subparsers)


# --------------------------------------------------------------------------- reproduce


def _worker(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def _register_reproduce(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="train every cell of Tables 2-6 (skips finished runs, resumes killed ones), then report",
        description="Expand the main (Tables 2-5) and ablation (Table 6) sweeps and run each cell once. "
        "Finished cells are skipped and interrupted ones resume, so the command can be rerun at will.",
    )
    add_run_options(p, None, profile_text="each sweep's default_profile (quick)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="SEL",
        help="table2 .. table6, main or ablation; claim: the Weibo claim's sweep (CRENER vs W²NER, several "
        "seeds; run only when named; crener report --claim weibo tests it)",
    )
    p.add_argument("--datasets", nargs="+", metavar="D", help="restrict to these datasets")
    add_seeds(p, default_text="the sweep's seeds for the profile")
    p.add_argument("--models", nargs="+", choices=registry.names(), metavar="M", help="restrict models")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="V", help="restrict variants")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PATH",
        help="overrides file, e.g. from tune --export",
    )
    p.add_argument("--worker", type=_worker, metavar="I/N", help="take cells whose index %% N == I")
    p.add_argument(
        "--jobs",
        type=count_int,
        default=1,
        metavar="N",
        help="run N worker processes on this machine, each taking the next free cell, with the CPU "
        "threads split between them (default 1)",
    )
    p.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="local: this machine's processes (--jobs); dask: one task per cell on a Dask cluster, "
        "retried on another worker if its worker dies (pip install -e '.[cluster]')",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="dask: the scheduler (tcp://host:port, or a scheduler JSON file); default: a local cluster "
        "of --jobs worker processes on 127.0.0.1 with its dashboard on 127.0.0.1:8787",
    )
    p.add_argument(
        "--gpus-per-cell",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="dask: the GPU resource each cell asks for (workers started with --resources GPU=1)",
    )
    p.add_argument(
        "--gpus",
        metavar="IDS",
        help="local: one worker process per GPU id (comma-separated, e.g. 0,1,2,3), each seeing only its "
        "own (CUDA_VISIBLE_DEVICES); sets --jobs to their count",
    )
    add_time_budget(
        p,
        "the whole plan (each cell still to run gets MINUTES x jobs / cells to run, less the start-up "
        "and probing; the plan is saved under the runs dir and reused on rerun: experiments/README.md)",
    )
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.set_defaults(func=cmd_reproduce)


def _without_jobs(argv: list[str]) -> list[str]:
    return _without_option(argv, "--jobs")


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` and ``option=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sets_threads(sets: list[str]) -> bool:
    """Whether the user's ``--set`` items choose the thread count (by today's or the old name)."""
    return any(canonical_key(key) == "runtime.threads" for key in parse_set(sets))


def spawn_jobs(argv: list[str], jobs: int, sets: list[str], gpus: list[str] | None = None) -> int:
    """``--jobs N``: N copies of this command (``argv`` less ``--jobs``, plus ``--no-report``),
    each walking the whole cell list. A cell's lock (crener.runner) hands each cell to the first
    copy that reaches it; the others pass it by and find it finished at the end, so the cells
    spread over the copies as they free up, however uneven their costs. The CPU threads are split
    between them: small grid steps are bound by per-op overhead, which a second process hides
    better than a second thread (figures: reports/results-history.md). The worst exit status."""
    import subprocess

    threads = max(1, _cores() // jobs)
    child = [sys.executable, "-m", "crener.cli", *_without_jobs(argv), "--no-report"]
    if not _sets_threads(sets):  # a runtime field: keys unchanged
        child += ["--set", f"runtime.threads={threads}"]
    from crener.tracking import Tracker

    Tracker()  # create (migrate) the tracking store once, before the workers race to do it
    log.info("%d worker processes, %d CPU thread(s) each", jobs, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # With --gpus, job i sees only GPU gpus[i] (as cuda:0): one cell per GPU at a time.
    per_job = [{"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {} for i in range(jobs)]
    procs = [
        subprocess.Popen(child, env={**env, "CRENER_JOB": f"job {i}", **per_job[i]}) for i in range(jobs)
    ]
    try:
        rc = max(p.wait() for p in procs)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if rc:
        log.error("a worker process failed (exit status %d); finished cells are kept, rerun to retry", rc)
    return rc


def run_cells(cells: list[Any], *, runs_dir: str | None, data_root: str | None) -> tuple[int, list]:
    """Run each cell once (crener.runner.run_one), cells held by another worker last, after
    waiting for it. ``(trained count, [(label, error)] of failed cells)``; a failure never stops
    the others."""
    from crener.runner import CellBusy, run_one

    failed: list[tuple[str, str]] = []
    busy = []
    counts = {"ran": 0, "skipped": 0}

    def run(index: int, cell: Any, *, wait: bool) -> None:
        tag = f"[{index}/{len(cells)}] {cell.sweep} {cell.label} ({run_key(cell.cfg)})"
        log.info("%s: start", tag)
        t0 = time.monotonic()
        try:
            out = run_one(cell.cfg, sweep=cell.sweep, runs_dir=runs_dir, data_root=data_root, wait=wait)
        except CellBusy:
            log.info("%s: held by another worker, retried at the end", tag)
            busy.append((index, cell))
            return
        except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the sweep
            msg = f"{type(exc).__name__}: {exc}"
            log.error("%s: FAILED: %s", tag, msg, exc_info=log.isEnabledFor(logging.DEBUG))
            failed.append((cell.label, msg))
            return
        counts["skipped" if out.get("skipped") else "ran"] += 1
        log.info(
            "%s: %s dev F1 %.4f, test F1 %.4f (%.0f s)",
            tag,
            "already finished," if out.get("skipped") else "done,",
            out.get("dev", {}).get("f1", float("nan")),
            out.get("test", {}).get("f1", float("nan")),
            time.monotonic() - t0,
        )

    for index, cell in enumerate(cells, 1):
        run(index, cell, wait=False)
    # Cells another worker was running: wait for it, then they are usually just skipped.
    deferred, busy = busy, []
    for index, cell in deferred:
        run(index, cell, wait=True)
    log.info(
        "%d cell(s): %d trained, %d already finished, %d failed",
        len(cells), counts["ran"], counts["skipped"], len(failed),
    )  # fmt: skip
    for label, msg in failed:
        log.error("failed cell %s: %s", label, msg)
    return counts["ran"], failed


def _plan(args: argparse.Namespace) -> list[Any]:
    from experiments.sweeps import plan, sweeps_for

    sets = parse_set(args.overrides)
    if args.data_root:  # the cells' keys digest the files they will read
        sets.setdefault("runtime.data_root", args.data_root)
    check_run_config(build_run_config(overrides=sets))  # a bad --set fails even where no cell is chosen
    cells = plan(
        sweeps_for(args.only),
        args.profile,
        only=args.only,
        datasets=args.datasets,
        seeds=args.seeds,
        models=args.models,
        variants=args.variants,
        configs=args.config,
        sets=sets,
    )
    for cell in cells:
        check_run_config(cell.cfg)
    if not cells:
        raise CrenerError(
            "the selection (--only, --datasets, --models, --variants, --seeds) matches no cell; "
            "crener reproduce --dry-run lists them all"
        )
    return cells


def check_address_executor(args: argparse.Namespace) -> None:
    """``--address`` names a Dask scheduler: without ``--executor dask`` it would be ignored and the
    work would run here instead of on the cluster the user named."""
    if args.address and args.executor != "dask":
        raise CrenerError(
            f"--address {args.address} is a Dask scheduler's, but the executor is {args.executor}: "
            "add --executor dask to run there, or drop --address to run here"
        )


def cmd_reproduce(args: argparse.Namespace) -> int:
    check_address_executor(args)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    if gpus:
        if args.executor != "local":
            raise CrenerError(
                "--gpus is for the local executor; on Dask, start one worker per GPU (experiments/README.md)"
            )
        args.jobs = len(gpus)
        args.argv = _without_option(args.argv, "--gpus")
    if args.executor == "dask" and not args.dry_run:
        return _reproduce_on_dask(args)
    if (args.jobs > 1 or gpus) and not args.worker and not args.dry_run:
        if args.time_budget is not None:
            _plan_budget_before_jobs(args, side_by_side=args.jobs if gpus else min(args.jobs, _cores()))
        rc = spawn_jobs(args.argv, args.jobs, args.overrides, gpus)
        return rc if args.no_report else max(rc, _report(sorted({c.cfg.profile for c in _plan(args)})))
    from experiments.sweeps import load_overrides, shard, unused_overrides

    cells = _plan(args)
    if not args.dry_run:
        for cfg in {c.cfg.runtime.data_root: c.cfg for c in cells}.values():
            check_run_inputs(cfg, runs_dir=args.runs_dir)
    for ov in unused_overrides(cells, (o for path in args.config for o in load_overrides(path))):
        log.warning("an override in %s matches no cell: %s", ov.source, ov.values)
    total = len(cells)
    if args.worker:
        cells = shard(cells, *args.worker)
        log.info("worker %d/%d: %d of %d cells", args.worker[0], args.worker[1], len(cells), total)
    # A --jobs copy finds the plan its parent saved; a --worker shard plans its own cells.
    cells = _budget_cells(args, cells, jobs=1)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.sweep:9s} {cell.cfg.profile:6s} {run_key(cell.cfg)} {cell.label}")
        return 0

    _, failed = run_cells(cells, runs_dir=args.runs_dir, data_root=args.data_root)
    rc = 1 if failed else 0
    if not args.no_report:
        if args.worker and args.worker[1] > 1:
            log.info("several workers: run `crener report` once all of them are done")
        else:
            rc = max(rc, _report(sorted({c.cfg.profile for c in cells})))
    return rc


def _budget_cells(args: argparse.Namespace, cells: list[Any], jobs: int) -> list[Any]:
    """``--time-budget``: the cells with their steps fixed (experiments/budget_plan.py), saved
    plans reused; a dry run probes nothing."""
    if args.time_budget is None:
        return cells
    from experiments.budget_plan import resolve

    cells = resolve(cells, args.time_budget, jobs=jobs, runs_dir=args.runs_dir, probe=not args.dry_run,
                    started=getattr(args, "started", None))  # fmt: skip
    for cell in cells:
        check_run_config(cell.cfg)
    return cells


def _plan_budget_before_jobs(args: argparse.Namespace, *, side_by_side: int) -> None:
    """Probe and save the plan once, here, before the --jobs copies start: with the thread count
    each copy will run its cells with, and so that every copy finds the same steps saved.
    ``side_by_side``: the cells that run at once at the probed speed: one a GPU, else --jobs up to
    the CPU cores (copies past them share cores, each slower)."""
    threads = [] if _sets_threads(args.overrides) else [f"runtime.threads={max(1, _cores() // args.jobs)}"]
    planning = argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *threads]})
    cells = _plan(planning)
    for cfg in {c.cfg.runtime.data_root: c.cfg for c in cells}.values():
        check_run_inputs(cfg, runs_dir=args.runs_dir)
    _budget_cells(planning, cells, side_by_side)


def _dask_session(args: argparse.Namespace) -> Any:
    """The Dask session of ``--address`` / ``--jobs``, once the tracking store exists (created
    here, before the workers race to create it)."""
    from experiments.executor import dask_session

    try:
        import distributed  # noqa: F401 - experiments.executor imports it only when connecting
    except ImportError as exc:
        raise CrenerError(f"--executor dask needs Dask: pip install -e '.[cluster]' ({exc})") from None
    from crener.tracking import Tracker

    Tracker()
    return dask_session(args.address, args.jobs, max(1, _cores() // args.jobs))


def _reproduce_on_dask(args: argparse.Namespace) -> int:
    if args.worker:
        raise CrenerError("--worker I/N splits cells by hand; with --executor dask the scheduler does it")
    if args.time_budget is not None and args.address:
        raise CrenerError(
            "--time-budget times this machine, and with --address the cells run on the cluster's: "
            "run the budget on the local executor or a local cluster (no --address)"
        )
    if not args.address and not _sets_threads(args.overrides):  # a runtime field: keys unchanged
        args.overrides = [*args.overrides, f"runtime.threads={max(1, _cores() // args.jobs)}"]
    cells = _budget_cells(args, _plan(args), min(args.jobs, _cores()))  # a local cluster: this CPU's cores
    from experiments.executor import check_scheduler, run_cells_dask

    if args.address:  # before the tracking store is made for the workers
        check_scheduler(args.address)

    with _dask_session(args) as client:
        _, failed = run_cells_dask(cells, client, runs_dir=args.runs_dir, data_root=args.data_root,
                                   gpus_per_cell=args.gpus_per_cell)  # fmt: skip
    rc = 1 if failed else 0
    return rc if args.no_report else max(rc, _report(sorted({c.cfg.profile for c in cells})))


def _report(profiles: list[str]) -> int:
    from reports.make_report import main as make_report  # (loads pandas and matplotlib)

    rc = 0
    for profile in profiles:
        try:
            make_report(profile=profile)
        except Exception:  # noqa: BLE001 - the runs are safe in MLflow; say so and carry on
            log.exception(
                "report for profile %s failed (rerun `crener report --profile %s`)", profile, profile
            )
            rc = 1
    return rc


# --------------------------------------------------------------------------- tune


def _register_tune(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="Optuna search on one dataset (shared study: start it in several processes)",
        description="Run N trials of a shared Optuna study (TPE, median pruning on dev F1). Several "
        "processes with the same --storage and --study-name work on one study. --set applies to every "
        "trial; trial folders go to <runs-dir>/tune/<study>/trial-NNNN.",
    )
    p.add_argument("--dataset", required=True, help="dataset to tune on")
    p.add_argument("--model", default="crener", choices=registry.names())
    p.add_argument("--variant", default="full", choices=list(VARIANTS))
    add_run_options(p)
    p.add_argument(
        "--trials", type=count_int, help="trials run by this process (>= 1; required unless --page-only)"
    )
    p.add_argument(
        "--storage",
        help=f"Optuna storage URL (default {OPTUNA_STORAGE}; postgresql://... to scale out)",
    )
    p.add_argument("--study-name", help="default crener-{model}-{variant}-{dataset}-{profile}")
    p.add_argument(
        "--timeout", type=_positive_seconds, metavar="S", help="stop starting trials after S seconds (> 0)"
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="sampler seed >= 0 (give concurrent workers different ones)",
    )
    p.add_argument("--export", metavar="PATH", help="write the best params as a --config file for reproduce")
    add_time_budget(
        p,
        "the whole study in this process (each of --trials gets MINUTES / trials less the base probe, "
        "its steps timed on its own config: experiments/README.md)",
    )
    p.add_argument(
        "--page", metavar="FILE",
        help="also write the study, stamped with the command, commit, machine and date, to FILE "
        "(a committed page, e.g. reports/tuning-quick.md)",
    )  # fmt: skip
    p.add_argument(
        "--page-only", action="store_true",
        help="write --page from the study as it stands and run no trial (--trials is not needed)",
    )  # fmt: skip
    p.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="dask: --jobs tune workers of --trials each as Dask tasks on one study (seeds --seed, --seed+1, ...)",
    )
    p.add_argument("--jobs", type=count_int, default=1, metavar="N", help="dask: tune workers (default 1)")
    p.add_argument(
        "--address", metavar="ADDR", help="dask: the scheduler; default: a local cluster of --jobs"
    )
    p.set_defaults(func=cmd_tune)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also NaN; inf is allowed (no limit)
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def cmd_tune(args: argparse.Namespace) -> int:
    from crener.data.datasets import get_spec

    get_spec(args.dataset)  # an unknown dataset fails before the study or any run is created
    if args.page_only and not args.page:
        raise CrenerError("--page-only writes the page named by --page FILE: add it")
    if args.trials is None and not args.page_only:
        raise CrenerError("--trials N is required (the trials this process runs), unless --page-only")
    check_address_executor(args)
    sets = parse_set(args.overrides)
    # Every argument before the study, its storage or any run exists: the trials' base config, the
    # folders and files they read and write.
    root = {"runtime.data_root": args.data_root} if args.data_root else {}
    base = check_run_config(build_run_config(
        model=args.model, variant=args.variant, profile=args.profile, dataset=args.dataset,
        overrides={**sets, **root},
    ))  # fmt: skip
    if not args.page_only:  # a page from the study as it stands reads none of the trials' inputs
        check_run_inputs(base, runs_dir=args.runs_dir)
    if args.page:  # before any trial: a page that cannot be written would be lost after hours of them
        check_page_file(args.page, "tuning-quick.md")
    if args.export:
        check_output_file(Path(args.export), "--export")
    from experiments.tune import check_storage, export_best, tune

    check_storage(args.storage or OPTUNA_STORAGE)
    if args.page_only:
        return _tune_page_only(args, sets)
    if args.executor == "dask" and args.address:  # before the storage and the store are made
        from experiments.executor import check_scheduler

        check_scheduler(args.address)

    kwargs = dict(dataset=args.dataset, trials=args.trials, model=args.model, variant=args.variant,
                  profile=args.profile, storage=args.storage, study_name=args.study_name, timeout=args.timeout,
                  seed=args.seed, sets=sets, data_root=args.data_root, runs_dir=args.runs_dir,
                  time_budget=args.time_budget)  # fmt: skip
    if args.executor == "dask":
        study = _tune_on_dask(args, kwargs)
    else:  # in this process: its start-up counts against the minutes (Dask workers have their own)
        study = tune(**kwargs, started=getattr(args, "started", None))
    if args.export:
        export_best(study, args.export, sets=sets)
    if args.page:
        from experiments.tune_page import write_tune_page

        write_tune_page(args, study, sets=sets, storage=args.storage or OPTUNA_STORAGE)
    return 0


def _tune_page_only(args: argparse.Namespace, sets: dict[str, Any]) -> int:
    """The page (and --export) from the study as it stands: no trial runs, no study is created."""
    from experiments.tune import default_study_name, export_best
    from experiments.tune_page import load_study, write_tune_page

    name = args.study_name or default_study_name(args.model, args.variant, args.dataset, args.profile)
    storage = args.storage or OPTUNA_STORAGE
    study = load_study(name, storage)
    if args.export:
        export_best(study, args.export, sets=sets)
    write_tune_page(args, study, sets=sets, storage=storage)
    return 0


def _tune_on_dask(args: argparse.Namespace, kwargs: dict[str, Any]) -> Any:
    import optuna

    from crener.workspace import resolve_runs_dir
    from experiments.tune import default_study_name, open_storage_or_explain

    name = args.study_name or default_study_name(args.model, args.variant, args.dataset, args.profile)
    storage = args.storage or OPTUNA_STORAGE
    open_storage_or_explain(storage)  # a bad URL fails here, once, not in every worker
    kwargs = {**kwargs, "study_name": name, "storage": storage,
              "runs_dir": str(resolve_runs_dir(args.runs_dir).resolve())}  # fmt: skip
    with _dask_session(args) as client:
        from experiments.executor import tune_on_dask

        tune_on_dask(client, args.jobs, kwargs)
    return optuna.load_study(study_name=name, storage=storage)


# --------------------------------------------------------------------------- ui


# A TCP port for `crener ui`.
_port = int_at_least(1, 65535, label="a port number from 1 to 65535")


def _register_ui(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ui",
        help="MLflow UI on the tracking store (127.0.0.1, one worker)",
        description="Serve the MLflow UI on the tracking store. MLflow answers only browsers that "
        "address it as localhost or by a private IP address (10.*, 172.16-31.*, 192.168.*); to open "
        "it by another name (e.g. with --host 0.0.0.0 on a server), list that name in --allowed-hosts.",
    )
    p.add_argument(
        "--port", type=_port, default=DEFAULT_UI_PORT, help=f"port (default {DEFAULT_UI_PORT}); must be free"
    )
    p.add_argument("--host", default=LOOPBACK, help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--allowed-hosts",
        metavar="NAMES",
        help="comma-separated host names (host or host:port; wildcards like *.example.org) a browser "
        "may use to reach the UI besides localhost and private IPs; passed to `mlflow ui "
        "--allowed-hosts` (MLflow's guard against DNS rebinding)",
    )
    p.set_defaults(func=cmd_ui)


def ui_command(uri: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """The ``mlflow ui`` command line for store ``uri`` (artifacts beside a SQLite store)."""
    from crener.workspace import ARTIFACT_DIR_NAME, sqlite_path

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    db = sqlite_path(uri)
    if db is not None:
        cmd += ["--artifacts-destination", str(db.parent / ARTIFACT_DIR_NAME)]
    return cmd


def check_port_free(host: str, port: int) -> None:
    """Refuse (:class:`CrenerError`) a host that does not resolve or a port already in use there;
    MLflow itself logs the failure and exits 0."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CrenerError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise CrenerError(
                f"cannot serve on {host}:{port} ({exc.strerror or exc}): another program (an MLflow UI "
                "already running?) holds the port, or the address is not this machine's; pass --port N "
                "with a free port, or another --host"
            ) from None


def _crener_experiments(uri: str) -> list[tuple[str, str]]:
    """(name, id) of the crener experiments in a SQLite store; none if it does not exist yet."""
    from crener.tracking import Tracker
    from crener.workspace import sqlite_path

    db = sqlite_path(uri)
    if db is None or not db.exists():
        return []
    return Tracker(uri).crener_experiments(include_tune=True)


def cmd_ui(args: argparse.Namespace) -> int:
    from crener.workspace import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise CrenerError(f"MLFLOW_TRACKING_URI={uri} is already a server: open it in a browser")
    from crener.tracking import check_store

    check_store(uri)  # a store `crener train` would refuse is refused here too, before it is made
    check_port_free(args.host, args.port)
    try:
        exposed = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        exposed = args.host != "localhost"
    if exposed:
        log.warning("binding %s exposes the UI (no authentication) beyond this machine", args.host)
        if not args.allowed_hosts:
            log.warning(
                "MLflow answers only browsers that address it as localhost or by a private IP; "
                "to open it by another name, pass --allowed-hosts NAME[,NAME...]"
            )
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown}:{args.port}"
    log.info("MLflow UI at %s (store %s); Ctrl-C stops it", base, uri)
    # MLflow 3 opens an experiment on its GenAI overview; these links go straight to the runs.
    for name, exp_id in _crener_experiments(uri):
        log.info("  %-28s %s/#/experiments/%s/runs", name, base, exp_id)
    cmd = ui_command(uri, args.host, args.port, args.allowed_hosts)
    # Become the server (no wrapper process left behind): signals reach mlflow directly.
    os.execv(cmd[0], cmd)
    return 0  # not reached
