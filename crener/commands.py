"""`crener train | evaluate | predict | bench`: argument parsing and printing only.

The work is done by :mod:`crener.train`, :mod:`crener.inference` and :mod:`crener.tools.bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path

from crener import registry
from crener.config import MAX_LEN, SECTIONS, RunConfig, parse_set
from crener.errors import ConfigError, CrenerError
from crener.files import (  # the path checks every subcommand applies before its work
    check_folder,
    check_input_file,
    check_output_file,
    write_atomic,
)
from crener.options import (
    add_data_root,
    add_overrides,
    add_run_options,
    add_seed,
    add_time_budget,
    int_at_least,
    positive_int,
)
from crener.profiles import PROFILES, VARIANTS, build_run_config
from crener.workspace import check_store_exists, workdir_for

log = logging.getLogger(__name__)

# Width presets of `crener bench` (crener.tools.workload.WIDTHS, which imports torch;
# tests/test_cli_errors.py checks the two agree).
BENCH_WIDTHS = ("quick", "paper", "full")


def register(sub: argparse._SubParsersAction) -> None:
    """The subcommands this module owns, one function each."""
    for add in (_add_train, _add_evaluate, _add_predict, _add_bench, _add_pretrain):
        add(sub)


def _profile_encoders() -> dict[str, str]:
    """``{profile: its model.encoder}`` from crener/profiles.toml (the dataclass default if unset)."""
    default = RunConfig().model.encoder
    return {name: values.get("model.encoder", default) for name, values in PROFILES.items()}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model/variant on one dataset; prints a JSON summary")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default="crener", choices=registry.names())
    p.add_argument("--variant", default="full", choices=list(VARIANTS))
    add_run_options(p)
    add_seed(p)
    p.add_argument(
        "--encoder",
        help="from_pretrained name or path (default: the profile's: "
        + ", ".join(f"{name} in {p}" for p, name in _profile_encoders().items())
        + ")",
    )
    p.add_argument("--workdir", help="run directory with --no-track (default: <runs-dir>/<profile>/<key>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    add_time_budget(
        p,
        "the whole command (from its process's start; the plan is saved under the runs dir, or the "
        "--workdir, and a rerun reuses it, so it resumes the same run; --no-resume plans again)",
    )
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a dataset split")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a best.pt / last.pt written by crener train")
    which.add_argument("--run-id", help="an MLflow run of a finished cell: its best checkpoint")
    p.add_argument("--dataset", help="default: the dataset the checkpoint was trained on")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"],
                   help="test is scored on the checkpoint profile's fixed sample (data.test_limit), as "
                        "training reported it, unless --whole-split; the JSON says how many sentences "
                        "were scored (sentences, split_sentences) and whether they are a sample")  # fmt: skip
    p.add_argument("--whole-split", action="store_true", help="score every sentence of the split")
    add_data_root(p)
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="tag raw text (one sentence a line) or a CoNLL file; JSON lines out")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("input", nargs="?", default="-", help="text file, CoNLL file, or - for stdin")
    p.add_argument("--format", default="auto", choices=["auto", "text", "conll"])
    p.add_argument(
        "--output", "-o", default="-", help="JSON lines file (its folder must exist), or - for stdout"
    )
    p.set_defaults(func=cmd_predict)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="training/inference speed and peak memory against sentence length")
    p.add_argument("--suite", nargs="+", default=["model"], choices=["model", "memory", "w2ner", "levers", "roofline", "all"],
                   help="model: every variant's speed; w2ner: W2NER's; levers: each speed lever on/off, "
                        "one process per point with its peak memory; memory: peak memory against length; "
                        "roofline: this machine's peaks and each op group's share of a profiled step")  # fmt: skip
    p.add_argument("--models", nargs="+", default=["w2ner", "crener"], choices=registry.names(),
                   metavar="MODEL", help="models of the levers and memory suites")  # fmt: skip
    p.add_argument("--widths", nargs="+", choices=BENCH_WIDTHS,
                   help="width presets to measure (default: quick paper; roofline alone: paper full)")  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--lengths", nargs="+", type=int_at_least(4, MAX_LEN), default=[32, 64, 128, 256, 510],
                   help=f"sentence lengths of the memory suite (4 to {MAX_LEN} characters)")  # fmt: skip
    p.add_argument(
        "--sentences", type=positive_int, default=96, help="Resume training sentences per measurement"
    )
    p.add_argument("--batch", type=positive_int, default=1, help="sentences of each length in a memory probe")
    add_overrides(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--page", metavar="FILE", help="also write a Markdown page of the results (and FILE's .json "
                   "beside it), e.g. reports/performance.md")  # fmt: skip
    p.add_argument(
        "--from-json", metavar="FILE", help="render --page from an earlier run's JSON; measure nothing"
    )
    # Internal: one point measured in a fresh process the suites start (crener.tools.bench.probe_command).
    p.add_argument("--probe", choices=["speed", "memory"], help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a character encoder (MLM) on the training splits; writes a Hugging Face folder + card",
    )
    p.add_argument("--out", required=True, help="output folder, e.g. crener/assets/crener-char")
    p.add_argument(
        "--datasets", nargs="+", help="datasets whose training splits are the text (default: all four)"
    )
    p.add_argument(
        "--text", nargs="+", metavar="FILE",
        help="extra unlabelled text, one sentence a line (UTF-8, plain or .xz); 'xwlb' names the broadcast-news "
        "corpus in ../shared/corpus/xwlb-news",
    )  # fmt: skip
    p.add_argument(
        "--text-fraction", type=float, help="share of each --text file's lines used, evenly spread"
    )
    p.add_argument(
        "--datasets-repeat", type=int,
        help="times each training split's pieces are read an epoch: the in-domain share of a mix with --text",
    )  # fmt: skip
    p.add_argument("--init-from", metavar="ENCODER",
                   help="continue pretraining this encoder (a shipped name such as crener-char, or a folder)")  # fmt: skip
    add_data_root(p)
    p.add_argument("--vectors", help="starting vectors of the character embeddings, sources joined by '+': "
                   "people (shared/pretrained People's Daily 2014, the default), wiki (simplechinese), lac "
                   "(jieba), a word2vec file; 'none' for random")  # fmt: skip
    for name, kind in (("hidden", int), ("layers", int), ("heads", int), ("ff", int), ("max-len", int),
                       ("batch-tokens", int), ("steps", int), ("lr", float), ("warmup", float),
                       ("weight-decay", float), ("mask-rate", float), ("unk-alpha", float), ("seed", int),
                       ("save-every", int), ("log-every", int)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind, help="see crener.tools.pretrain.PretrainConfig")
    p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                   help="bf16 autocast; auto (default): where this CPU's bf16 matmuls are fast, as "
                   "train.bf16=auto decides; the card records the answer")  # fmt: skip
    p.add_argument("--workdir", help="resumable state (default: .crener/pretrain/<out name>)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_pretrain)


def cmd_train(args: argparse.Namespace) -> int:
    from crener.data.datasets import get_spec

    get_spec(args.dataset)  # an unknown dataset fails here, before any run or workdir exists
    overrides = parse_set(args.overrides)
    if args.encoder:
        overrides["model.encoder"] = args.encoder
    if args.data_root:
        overrides["runtime.data_root"] = args.data_root
    cfg = check_run_config(build_run_config(
        model=args.model, variant=args.variant, profile=args.profile, dataset=args.dataset, seed=args.seed,
        overrides=overrides,
    ))  # fmt: skip
    check_run_inputs(cfg, runs_dir=args.runs_dir, workdir=args.workdir)
    if not args.no_track:
        from crener.tracking import check_store
        from crener.workspace import tracking_uri

        check_store(tracking_uri())  # before the budget's probe and the run's folders and locks
    if args.time_budget is not None:
        cfg = check_run_config(_budgeted(cfg, args))
    if args.no_track:
        from crener.train import fit

        workdir = Path(args.workdir) if args.workdir else workdir_for(cfg, args.runs_dir)
        summary = fit(cfg, workdir, resume=not args.no_resume)
    else:
        from crener.runner import run_one

        if args.workdir:
            log.warning(
                "--workdir applies to --no-track runs; tracked runs live in <runs-dir>/<profile>/<key>"
            )
        summary = run_one(cfg, sweep="adhoc", resume=not args.no_resume, runs_dir=args.runs_dir)
    log.info(
        "test P %.4f R %.4f F1 %.4f | dev F1 %.4f | best epoch %s | %.1f s",
        summary["test"]["precision"], summary["test"]["recall"], summary["test"]["f1"],
        summary["dev"]["f1"], summary["best_epoch"], summary["seconds"],
    )  # fmt: skip
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _budgeted(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """``--time-budget``: ``cfg`` with the steps that fit, the probe told where the run will log
    and write and when the command started (crener/budget.py).

    The plan is saved (:func:`crener.budget.plan_path`) and a rerun of the command reuses it, so it
    resumes the interrupted run, or finds it finished, under the same key instead of probing again
    and training afresh under another; ``--no-resume`` plans afresh."""
    import datetime

    from crener import budget
    from crener.device import machine_label
    from crener.files import write_atomic
    from crener.identity import run_key

    machine = machine_label()
    workdir = args.workdir if args.no_track else None  # a tracked run ignores --workdir
    path = budget.plan_path(cfg, args.time_budget, machine, args.runs_dir, command="train", workdir=workdir)
    saved = None if args.no_resume else budget.read_plan(path)
    if saved is not None:
        log.info(
            "--time-budget %g min: the plan saved by an earlier run of this command on this machine, %d epochs "
            "of at most %d steps (%s; delete it to plan again)", args.time_budget, saved["epochs"],
            saved["max_steps"], path,
        )  # fmt: skip
        return budget.with_plan(cfg, saved)
    out = _probed(cfg, args)
    write_atomic(path, json.dumps({
        "command": "train", "key_before_budget": run_key(cfg), "minutes": float(args.time_budget),
        "machine": machine, "share_minutes": float(args.time_budget), "epochs": out.train.epochs,
        "max_steps": out.train.max_steps,
        "planned": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }, indent=1) + "\n")  # fmt: skip
    return out


def _probed(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    from crener.budget import apply_budget
    from crener.workspace import resolve_runs_dir

    experiment, folder = None, Path(args.workdir) if args.workdir else resolve_runs_dir(args.runs_dir)
    if not args.no_track:
        from crener.runner import ADHOC_SWEEP
        from crener.tracking import experiment_name

        experiment, folder = experiment_name(ADHOC_SWEEP, cfg.profile), resolve_runs_dir(args.runs_dir)
    started = getattr(args, "started", None)  # set by crener.cli.main
    return apply_budget(cfg, args.time_budget, started=started, experiment=experiment, folder=folder)


def check_run_inputs(cfg: RunConfig, *, runs_dir: str | None = None, workdir: str | None = None) -> None:
    """What a run of ``cfg`` reads and writes, checked before any of it is made: the run folders,
    the dataset's folder and the encoder's."""
    from crener.data.datasets import resolve_data_root
    from crener.encoder import check_encoder_name
    from crener.workspace import RUNS_ENV

    check_folder(workdir, "--workdir")
    check_folder(runs_dir, "--runs-dir")
    if not runs_dir:
        check_folder(os.environ.get(RUNS_ENV), f"${RUNS_ENV}")
    resolve_data_root(cfg.runtime.data_root or None)
    check_encoder_name(cfg.model.encoder)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.run_id is not None and not args.run_id.strip():
        raise CrenerError("--run-id is empty: pass the id of a finished run (crener ui lists them)")
    if args.dataset:
        from crener.data.datasets import get_spec

        get_spec(args.dataset)  # before loading anything
    if args.data_root:
        from crener.data.datasets import resolve_data_root

        resolve_data_root(args.data_root)
    from crener.inference import evaluate_checkpoint

    checkpoint = args.checkpoint
    if args.run_id:
        check_store_exists(f"no run {args.run_id} to evaluate")
        from crener.tracking import Tracker

        checkpoint = Tracker().checkpoint_of(args.run_id)
    result = evaluate_checkpoint(
        checkpoint, dataset=args.dataset, split=args.split, data_root=args.data_root,
        whole_split=args.whole_split,
    )  # fmt: skip
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0


# Bounds no real run comes near; past them a value is a typo that would run for ever (such as
# train.epochs=1e30; reports/decisions.md). They belong with TrainConfig's own checks once crener.config
# can take them; here, every command applies them to the configs it built, before any work.
MAX_EPOCHS = 100_000
MAX_STEPS = 10**9


def check_run_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` if its budget is plausible and every number finite, else a :class:`ConfigError`."""
    train = cfg.train
    if train.epochs > MAX_EPOCHS:
        raise ConfigError(f"train.epochs={train.epochs}: must be at most {MAX_EPOCHS:,}")
    if train.max_steps > MAX_STEPS:
        raise ConfigError(f"train.max_steps={train.max_steps}: must be at most {MAX_STEPS:,}")
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name}={value}: must be a finite number")
    return cfg


def cmd_predict(args: argparse.Namespace) -> int:
    from crener.inference import Predictor, read_inputs

    out_path = None if args.output == "-" else Path(args.output)
    if out_path is not None:
        check_output_file(out_path)
    sentences = read_inputs(args.input, args.format)  # input mistakes before the checkpoint loads
    predictor = Predictor.from_checkpoint(args.checkpoint)
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in predictor.predict(sentences)]
    if out_path is None:
        try:
            for line in lines:
                sys.stdout.write(line)
            sys.stdout.flush()  # a closed pipe (| head) or a full device shows here, inside crener.cli
        except BrokenPipeError:
            raise
        except OSError as exc:  # name what was written to: crener.cli's one line says the path
            raise OSError(exc.errno, exc.strerror, "standard output") from exc
        return 0
    write_atomic(out_path, "".join(lines))  # a full disk leaves no half file (crener.cli reports it)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from crener.data.datasets import get_spec, resolve_data_root
    from crener.tools.pretrain import NAMED_TEXT, check_inputs, config_from_args, pretrain

    # What pretraining reads and writes, checked before its folders are made and its text read.
    check_folder(args.out, "--out")
    check_folder(args.workdir, "--workdir")
    for name in args.datasets or ():
        get_spec(name)
    for path in args.text or ():
        if path not in NAMED_TEXT:  # a corpus named ('xwlb') lies under the data root: check_inputs
            check_input_file(path, "--text")
    if args.data_root:
        resolve_data_root(args.data_root)
    # The numbers (steps, widths, rates) first, with bf16 fixed: auto measures this CPU's matmuls;
    # then the text files (or the named corpus), the vectors' sources and the --init-from encoder.
    unmeasured = config_from_args(argparse.Namespace(**{**vars(args), "bf16": "false"}))
    check_inputs(unmeasured)
    summary = pretrain(config_from_args(args), workdir=args.workdir, track=not args.no_track)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from crener.tools.bench import run_bench

    return run_bench(args)
