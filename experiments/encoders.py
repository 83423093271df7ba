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

from crener.config import parse_set
from crener.files import write_atomic
from crener.identity import run_key
from crener.profiles import build_run_config

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
# The text ablation: one architecture and step count (the shipped crener-char's, or --text-steps),
# pretrained from its vectors on more and more text. arm -> (unlabelled text, share of its lines).
TEXT_ARMS: dict[str, tuple[tuple[str, ...], float]] = {
    "text:splits": ((), 1.0),  # the four training splits alone
    "text:quarter": (("xwlb",), 0.25),  # and an evenly spread quarter of the news corpus
    "text:all": (("xwlb",), 1.0),  # and all of it
}
BUILD_DIR = Path(".crener") / "encoders"


def register(subparsers: Any) -> None:
    from crener.options import add_run_options, add_seeds, count_int

    p = subparsers.add_parser(
        "encoders",
        help="encoder ablation: random, vectors only, pretrained only, pretrained + vectors",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--datasets", nargs="+", default=["resume", "weibo"])
    add_seeds(p, [0, 1, 2, 3, 4])
    add_run_options(p)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *TEXT_ARMS])
    p.add_argument(
        "--text-steps", type=count_int, default=None,
        help="pretraining steps of each text:* arm (default: the shipped crener-char's)",
    )  # fmt: skip
    p.add_argument(
        "--encoders", nargs="+", default=[], metavar="ENCODER",
        help="more arms, each an encoder used as it is: a shipped name (crener-xwlb) or a folder",
    )  # fmt: skip
    p.add_argument("--build-dir", default=str(BUILD_DIR), help="where the non-shipped encoders are built")
    p.add_argument("--jobs", type=count_int, default=1, help="worker processes (as crener reproduce --jobs)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument(
        "--page", metavar="FILE",
        help="also write the report, stamped with the command, commit, machine and date, to FILE "
        "(a committed page, e.g. reports/encoders-quick.md)",
    )  # fmt: skip
    p.set_defaults(func=cmd_encoders)


def build_encoders(
    arms: list[str], build_dir: Path, data_root: str | None, text_steps: int | None = None
) -> dict[str, str]:
    """``{arm: encoder name or path}``; builds the missing ones (a killed build resumes)."""
    from crener.device import bf16_pays
    from crener.encoder import SHIPPED_ENCODERS
    from crener.tools.pretrain import PretrainConfig, pretrain

    card = json.loads((SHIPPED_ENCODERS[SHIPPED] / "card.json").read_text(encoding="utf-8"))
    shipped = PretrainConfig.from_identity(card["config"], out="")
    out: dict[str, str] = {}
    for arm in arms:
        if arm in TEXT_ARMS:
            text, fraction = TEXT_ARMS[arm]
            steps = shipped.steps if text_steps is None else text_steps
            path = build_dir / f"{arm.replace(':', '-')}-{steps}"  # the folder (and arm) names its budget
            # bf16 where this machine's bf16 matmuls pay (the card records which): all arms alike.
            cfg = replace(
                shipped, out=str(path), data_root=data_root, text=text, text_fraction=fraction, steps=steps,
                bf16=bf16_pays("cpu"),
            )  # fmt: skip
            if not (path / "config.json").is_file():
                log.info("building encoder %s in %s (%d pretraining steps)", arm, path, cfg.steps)
                pretrain(cfg, workdir=build_dir / "state" / path.name, progress=False, command=cfg.command())
            out[arm] = str(path.resolve())
            continue
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
            pretrain(cfg, workdir=build_dir / "state" / path.name, progress=False, command=cfg.command())
        out[arm] = str(path.resolve())
    return out


def plan(args: argparse.Namespace, encoders: dict[str, str]) -> list[tuple[str, Any]]:
    """``[(arm, cell), ...]`` for every arm, dataset and seed, each config checked."""
    from crener.commands import check_run_config
    from experiments.sweeps import Cell

    sets = parse_set(args.overrides)
    if args.data_root:
        sets.setdefault("runtime.data_root", args.data_root)
    return [
        (arm, Cell(SWEEP, check_run_config(build_run_config(
            profile=args.profile, dataset=d, seed=s, overrides={**sets, "model.encoder": encoders[arm]}
        ))))
        for arm in all_arms(args) for d in args.datasets for s in args.seeds
    ]  # fmt: skip


def all_arms(args: argparse.Namespace) -> list[str]:
    """The constructions asked for, then the named encoders (each its own arm, named by itself)."""
    return [*args.arms, *(e for e in args.encoders if e not in args.arms)]


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before an encoder is built (thousands of pretraining steps): the datasets,
    the folders, and the cells' configs (planned with the encoders' names standing in)."""
    from crener.commands import check_folder, check_run_inputs
    from crener.data.datasets import get_spec
    from crener.encoder import check_encoder_name
    from crener.files import check_page_file

    for name in args.datasets:
        get_spec(name)
    check_folder(args.build_dir, "--build-dir")
    if getattr(args, "page", None):  # its folder is made if missing; a folder or a file above it is refused
        check_page_file(args.page, "encoders.md")
    for name in args.encoders:  # the named arms load as they are: each must exist now
        check_encoder_name(name)
    stand_in = {arm: SHIPPED for arm in args.arms} | {e: e for e in args.encoders if e not in args.arms}
    for _, cell in plan(args, stand_in)[:1]:
        check_run_inputs(cell.cfg, runs_dir=args.runs_dir)


def cmd_encoders(args: argparse.Namespace) -> int:
    from experiments.commands import run_cells, spawn_jobs

    check_args(args)
    # Built before any worker starts.
    encoders = build_encoders(args.arms, Path(args.build_dir), args.data_root, args.text_steps)
    encoders.update({e: e for e in args.encoders if e not in encoders})
    planned = plan(args, encoders)
    if args.jobs > 1:
        rc = spawn_jobs(args.argv, args.jobs, args.overrides)
    else:
        _, failed = run_cells([cell for _, cell in planned], runs_dir=args.runs_dir, data_root=args.data_root)
        rc = 1 if failed else 0
    if not args.no_report:
        write_report(args, encoders, planned)
    return rc


def write_report(args: argparse.Namespace, encoders: dict[str, str], planned: list[tuple[str, Any]]) -> Path:
    """Dev and test F1 per arm and dataset, mean ± std over the seeds that finished, from MLflow.

    Dev comes first: an encoder is chosen on dev (the best epoch's dev F1), test only reported."""
    from crener.tracking import Tracker
    from reports.stats import format_mean_std

    tracker = Tracker()
    rows: dict[tuple[str, str], list[tuple[int, float, float, str]]] = {}
    for arm, cell in planned:
        done = next((r for r in tracker.find_runs(run_key(cell.cfg)) if r.finished), None)
        if done is None:
            continue
        dev, test = done.metrics.get("best/dev_f1"), done.metrics.get("best/test_f1")
        if test is not None:
            rows.setdefault((arm, cell.cfg.data.dataset), []).append(
                (cell.cfg.train.seed, float("nan") if dev is None else dev, test, done.run_id)
            )
    lines = [
        f"# Encoder ablation ({args.profile}, CRENER full)",
        "",
        "F1 ×100 at the best dev epoch, mean ± sample std over seeds (n seeds); each encoder used as the "
        "profile uses the shipped one. Choose on dev; test is reported, never chosen on.",
        "",
        "| encoder | " + " | ".join(f"{d} dev | {d} test" for d in args.datasets) + " |",
        "|---|" + "---:|---:|" * len(args.datasets),
    ]
    for arm in all_arms(args):
        row = [f"{arm} (`{Path(encoders[arm]).name}`)"]
        for d in args.datasets:
            for col in (1, 2):
                vals = [item[col] for item in rows.get((arm, d), [])]
                row.append(f"{format_mean_std(vals)} (n={len(vals)})" if vals else format_mean_std(vals))
        lines.append("| " + " | ".join(row) + " |")
    lines += pretraining_lines(all_arms(args), encoders)
    lines += curve_lines(all_arms(args), encoders)
    lines += ["", "Runs (MLflow run id per arm, dataset, seed):", ""]
    for (arm, d), items in sorted(rows.items()):
        lines.append(
            f"- {arm} / {d}: "
            + ", ".join(
                f"s{s} `{rid}` dev {100 * dv:.2f} test {100 * f:.2f}" for s, dv, f, rid in sorted(items)
            )
        )
    out = write_atomic(Path("reports") / "out" / args.profile / "encoders.md", "\n".join(lines) + "\n")
    log.info("encoder ablation written to %s", out)
    if getattr(args, "page", None):
        page = write_atomic(Path(args.page), "\n".join([lines[0], "", stamp(args), *lines[1:]]) + "\n")
        log.info("and to %s", page)
    return out


def encoder_files(arms: list[str], encoders: dict[str, str], name: str) -> dict[str, Any]:
    """``{arm: parsed JSON}`` of the file ``name`` beside each arm's encoder, for the arms that have one
    (a shipped name resolves to its folder)."""
    from crener.encoder import resolve_encoder

    out = {}
    for arm in arms:
        path = Path(resolve_encoder(encoders[arm])) / name
        if path.is_file():
            out[arm] = json.loads(path.read_text(encoding="utf-8"))
    return out


def pretraining_lines(arms: list[str], encoders: dict[str, str]) -> list[str]:
    """What each arm's encoder was pretrained on and how far it got, read from its card: the text,
    steps and tokens, and masked-token accuracy on held-out pieces and on each dataset's dev text
    (never trained on), so a difference in F1 can be traced to text, steps or neither."""
    cards = encoder_files(arms, encoders, "card.json")
    if not cards:
        return []
    datasets = sorted({d for c in cards.values() for d in c.get("summary", {}).get("dev_mlm_accuracy", {})})
    lines = [
        "",
        "Pretraining of each encoder (its card): the text beyond the four training splits, characters "
        "in the pretraining corpus, steps, tokens seen, minutes of steps, and masked-token accuracy on "
        "500 held-out pieces and on each dataset's dev text.",
        "",
        "| encoder | text | corpus characters | steps | tokens seen | minutes | held-out acc | "
        + " | ".join(f"{d} dev acc" for d in datasets)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(datasets),
    ]
    for arm, card in cards.items():
        cfg, summary = card.get("config", {}), card.get("summary", {})
        text = ", ".join(cfg.get("text") or []) or "splits only"
        if cfg.get("text_fraction", 1) < 1:
            text += f" ({cfg['text_fraction']:g} of its lines)"
        if cfg.get("datasets_repeat", 1) > 1:
            text += f", splits read {cfg['datasets_repeat']}x an epoch"
        if cfg.get("init_from"):
            text += f", continued from {cfg['init_from']}"
        dev = summary.get("dev_mlm_accuracy", {})
        cells = [
            arm, text, f"{summary.get('corpus_characters', 0):,}", f"{cfg.get('steps', 0):,}",
            f"{summary['tokens_seen']:,}" if "tokens_seen" in summary else "",
            f"{summary['seconds'] / 60:.1f}" if "seconds" in summary else "",
            f"{summary['held_out_mlm_accuracy']:.3f}" if "held_out_mlm_accuracy" in summary else "",
            *(f"{dev[d]:.3f}" if d in dev else "" for d in datasets),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def curve_lines(arms: list[str], encoders: dict[str, str]) -> list[str]:
    """Each arm's pretraining curve, read from its ``history.json``: held-out masked-token accuracy
    at every step where it was measured, so a reader sees whether an encoder had flattened or was
    still rising when its steps ran out (more steps) while its end point was no better (more text)."""
    curves: dict[str, dict[int, float]] = {}
    for arm, history in encoder_files(arms, encoders, "history.json").items():
        points = {int(r["step"]): r["held_out/mlm_accuracy"] for r in history if "held_out/mlm_accuracy" in r}
        if points:
            curves[arm] = points
    if not curves:
        return []
    steps = sorted({s for points in curves.values() for s in points})
    lines = [
        "",
        "Pretraining curves (each history.json): held-out masked-token accuracy by step, each encoder on "
        "its own 500 held-out pieces (so a column compares arms only where their texts agree; the dev-text "
        "columns above compare them on the same text).",
        "",
        "| encoder | " + " | ".join(f"{s:,}" for s in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for arm, points in curves.items():
        lines.append(
            "| " + " | ".join([arm, *(f"{points[s]:.3f}" if s in points else "" for s in steps)]) + " |"
        )
    return lines


def stamp(args: argparse.Namespace) -> str:
    """Where the page's figures come from: they hold for that machine, commit and store only."""
    import shlex

    from crener.device import machine_stamp

    argv = getattr(args, "argv", None) or []
    return (
        f"Generated by `crener {' '.join(shlex.quote(a) for a in argv)}` from the MLflow store (do not edit: "
        f"rerun it; finished cells are found, not retrained): {machine_stamp()}."
    )
