"""The command-line options several subcommands share, each declared once.

`--profile`, `--data-root`, `--runs-dir`, `--set` and the run seeds (`--seed`, `--seeds`) mean
the same in every subcommand that takes them: the same name, choices, type, destination and
help (tests/test_cli_options.py checks it). A subcommand adds them with the functions below and
declares only what is its own. Also here: the argparse integer types the subcommands share.
"""

from __future__ import annotations

import argparse
import math

from crener.profiles import PROFILES

PROFILE_HELP = "named budget, one of {choices} (crener/profiles.toml)"
DATA_ROOT_HELP = "dataset directory (default: $CRENER_DATA, then ../shared/data)"
RUNS_DIR_HELP = "root of run folders (default: $CRENER_RUNS, then runs)"
SET_HELP = "config override, repeatable: any field of crener/config.py, e.g. train.lr=3e-4"
SEED_HELP = "run seed (>= 0)"
SEEDS_HELP = "run seeds (>= 0)"
TIME_BUDGET_HELP = (
    "fix the steps from a probe that times the run's parts (start-up, set-up, steps, evaluations, "
    "checkpoints, the end, logging: crener/budget.py) so that {what} fits MINUTES on this machine; "
    "the steps enter the run key, the minutes are logged as runtime.time_budget"
)


def int_at_least(low: int, high: int | None = None, *, label: str | None = None):
    """An argparse type: an integer in ``[low, high]``; ``label`` names it in the error message
    (default "an integer >= low" or "an integer between low and high")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected {label or 'an integer ' + bound}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


non_negative_int = int_at_least(0)
positive_int = int_at_least(1)
count_int = int_at_least(1, label="a positive integer")  # how many: trials, jobs


def positive_minutes(text: str) -> float:
    """An argparse type: a finite number of minutes > 0 (``--time-budget``), refused before any work."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        # The flag and value as typed, so the one line names what to change.
        raise argparse.ArgumentTypeError(f"expected a finite number of minutes > 0, got --time-budget {text}")
    return value


positive_minutes.__name__ = "minutes"  # argparse names the type in its messages


def _with_default(help_text: str, default: str) -> str:
    return f"{help_text}; default: {default}"


def add_profile(p: argparse.ArgumentParser, default: str | None = "quick", *, default_text: str = "") -> None:
    """``--profile``; ``default=None`` with ``default_text`` when the command picks one itself."""
    text = PROFILE_HELP.format(choices=", ".join(PROFILES))
    p.add_argument(
        "--profile",
        default=default,
        choices=list(PROFILES),
        help=_with_default(text, default_text or str(default)),
    )


def add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", metavar="DIR", help=DATA_ROOT_HELP)


def add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", metavar="DIR", help=RUNS_DIR_HELP)


def add_overrides(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides`` (a list, maybe empty)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def add_seed(p: argparse.ArgumentParser) -> None:
    """``--seed``: the seed of the one run a command trains."""
    p.add_argument("--seed", type=non_negative_int, default=0, help=_with_default(SEED_HELP, "0"))


def add_seeds(
    p: argparse.ArgumentParser, default: list[int] | None = None, *, default_text: str = ""
) -> None:
    """``--seeds``: the seeds of the cells a sweep trains."""
    text = default_text or " ".join(map(str, default or []))
    p.add_argument(
        "--seeds",
        nargs="+",
        type=non_negative_int,
        default=default,
        metavar="S",
        help=_with_default(SEEDS_HELP, text),
    )


def add_run_options(
    p: argparse.ArgumentParser, profile: str | None = "quick", *, profile_text: str = ""
) -> None:
    """What every command that trains takes: ``--profile``, ``--set``, ``--data-root``, ``--runs-dir``."""
    add_profile(p, profile, default_text=profile_text)
    add_overrides(p)
    add_data_root(p)
    add_runs_dir(p)


def add_time_budget(p: argparse.ArgumentParser, what: str) -> None:
    """``--time-budget MINUTES``; ``what`` says what the minutes cover in this command."""
    p.add_argument(
        "--time-budget", type=positive_minutes, metavar="MINUTES", help=TIME_BUDGET_HELP.format(what=what)
    )
