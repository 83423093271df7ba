"""`crener curves`: training loss and dev F1 against the step, for named settings side by side.

The question it answers is whether a grid model *starts* learning: on the all-negative plateau the
loss falls while dev F1 stays at 0 for hundreds of steps. Each setting is trained with dev evaluated
every ``--every`` steps (``runtime.eval_every``: extra evaluations draw nothing random, so the run is
the same as without them), logged to MLflow as a ``diagnostic`` run (never reused as a sweep cell),
and the curves are written under ``reports/out/curves/`` as a Markdown table, a CSV and a figure,
with the step where dev F1 first exceeds 0 and F1 at the best single threshold shift.

Settings: ``new`` is the profile as it is; ``main-before-13`` is the ``quick`` profile as it was before
the pretrained encoder and the prior start (random 64-wide encoder, logits starting at 0).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from crener import registry
from crener.commands import check_folder, check_run_config, check_run_inputs
from crener.config import parse_set
from crener.data.datasets import get_spec
from crener.files import write_atomic
from crener.identity import QUICK_V1, run_key
from crener.options import add_overrides, add_profile, add_runs_dir, add_seed, positive_int
from crener.profiles import build_run_config

log = logging.getLogger(__name__)

# The whole quick profile before the shipped encoder (QUICK_V1), applied over today's quick
# profile: its widths and budget, the random embedded encoder, and scores starting at 0.
BEFORE_QUICK: dict[str, Any] = {
    **QUICK_V1,
    "model.encoder": "embedded",
    "model.prior_bias": False,
    "train.unk_alpha": 0.0,
}
SETTINGS: dict[str, dict[str, Any]] = {"main-before-13": BEFORE_QUICK, "new": {}}
OUT_DIR = Path("reports") / "out" / "curves"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "curves", help="loss and dev F1 against the step for settings side by side (learning-start check)"
    )
    p.add_argument("--dataset", default="weibo")
    p.add_argument("--model", default="crener", choices=registry.names())
    add_profile(p)
    add_seed(p)
    p.add_argument("--every", type=positive_int, default=25, help="dev evaluation every N steps")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    add_overrides(p)
    p.add_argument("--out", default=str(OUT_DIR))
    p.add_argument("--name", default="", help="suffix of the output files (default: none)")
    add_runs_dir(p)
    p.set_defaults(func=cmd_curves)


def cmd_curves(args: argparse.Namespace) -> int:
    from crener.workspace import resolve_runs_dir

    get_spec(args.dataset)
    configs = {
        name: check_run_config(build_run_config(
            model=args.model, profile=args.profile, dataset=args.dataset, seed=args.seed,
            overrides={**SETTINGS[name], **parse_set(args.overrides), "runtime.eval_every": args.every},
        ))
        for name in args.settings
    }  # fmt: skip
    check_folder(args.out, "--out")
    for cfg in configs.values():  # every run's inputs before the first run starts
        check_run_inputs(cfg, runs_dir=args.runs_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cfg in configs.items():
        workdir = resolve_runs_dir(args.runs_dir) / "curves" / f"{name}-{run_key(cfg)}"
        results[name] = run_diagnostic(cfg, workdir, label=name)
    stem = f"{args.model}-{args.dataset}-{args.profile}-s{args.seed}" + (f"-{args.name}" if args.name else "")
    write_curves(results, out / stem)
    return 0


def run_diagnostic(cfg: Any, workdir: Path, *, label: str) -> dict[str, Any]:
    """Train ``cfg`` from scratch into ``workdir``, logged as a diagnostic run; summary + curve."""
    from crener.tracking import Tracker
    from crener.train import fit

    tracker = Tracker()
    logger = tracker.start_run(cfg, sweep="diagnostic", tags={"crener.curve": label})
    logger.log_config(cfg)
    try:
        summary = fit(cfg, workdir, callback=logger, resume=False)
    except BaseException as exc:
        logger.fail(exc, killed=isinstance(exc, KeyboardInterrupt))
        raise
    logger.finish(summary, workdir)
    curve = json.loads((workdir / "curve.json").read_text()) if (workdir / "curve.json").exists() else []
    return {"summary": summary, "curve": curve, "run_id": logger.run_id, "config": cfg}


def write_curves(results: dict[str, dict[str, Any]], stem: Path) -> None:
    """``stem``.md / .csv / .png: one row per evaluated step and setting."""
    import pandas as pd

    rows = [{"setting": name, **row} for name, r in results.items() for row in r["curve"]]
    frame = pd.DataFrame(rows)
    write_atomic(stem.with_suffix(".csv"), frame.to_csv(index=False))
    lines = [f"# Learning start: {stem.name}", ""]
    for name, r in results.items():
        s = r["summary"]
        first = s.get("first_step_dev_f1_positive")
        lines.append(
            f"- **{name}** (MLflow run `{r['run_id']}`, encoder `{s['encoder']}`): first step with dev F1 > 0: "
            f"{first if first is not None else 'never'}; best epoch {s['best_epoch']}: dev F1 {s['dev']['f1']:.4f}, "
            f"test F1 {s['test']['f1']:.4f}; dev F1 at the best threshold shift "
            f"({s['dev_best_shift']['shift']:+.1f}) {s['dev_best_shift']['f1']:.4f}; {s['seconds']:.0f} s"
        )
    lines += [
        "",
        "| setting | step | train loss | dev F1 | dev F1, best shift (shift) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {int(row['step'])} | {row['train/loss']:.4f} | {row['dev/f1']:.4f} | "
            f"{row['dev/f1_best_shift']:.4f} ({row['dev/best_shift']:+.1f}) |"
        )
    write_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    _plot(frame, stem.with_suffix(".png"), stem.name)
    log.info("curves written to %s.{md,csv,png}", stem)


def _plot(frame: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (name, part) in enumerate(frame.groupby("setting", sort=False)):
        color = f"C{k}"  # one colour per setting in both panels
        ax_loss.plot(part["step"], part["train/loss"], color=color, label=name)
        ax_f1.plot(part["step"], part["dev/f1"], color=color, label=f"{name}")
        ax_f1.plot(
            part["step"], part["dev/f1_best_shift"], color=color, linestyle=":", label=f"{name}, best shift"
        )
    ax_loss.set(xlabel="step", ylabel="training loss (mean since last point)", yscale="log")
    ax_f1.set(xlabel="step", ylabel="dev F1", ylim=(0, 1))
    ax_f1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
