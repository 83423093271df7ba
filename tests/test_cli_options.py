"""The options subcommands share (crener/options.py) mean the same in every subcommand."""

from __future__ import annotations

import argparse

import pytest

from crener.cli import build_parser
from crener.profiles import PROFILES

SHARED = ("--profile", "--data-root", "--runs-dir", "--set", "--seeds")


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand's parser, by its full name (``data batches``), nested ones included."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                out.update(subcommands(sub, full) or {full: sub})
    return out


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    return subcommands(build_parser())


def test_the_parser_walk_finds_the_commands_that_share_options(commands):
    assert {"train", "tune", "reproduce", "curves", "encoders", "report", "bench", "data batches"} <= set(
        commands
    )


def test_every_profile_option_has_the_same_choices(commands):
    takers = {name: option(p, "--profile") for name, p in commands.items() if option(p, "--profile")}
    assert {"train", "tune", "reproduce", "curves", "encoders", "report", "data batches"} <= set(takers)
    for name, action in takers.items():
        assert list(action.choices) == list(PROFILES), name


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_is_declared_alike_everywhere(commands, flag):
    """Same destination, type, choices, metavar and help (up to the stated default) everywhere."""
    seen = {}
    for name, p in commands.items():
        action = option(p, flag)
        if action is not None:
            help_text = (action.help or "").split("; default:")[0]
            choices = tuple(action.choices) if action.choices is not None else None
            seen[name] = (action.dest, action.type, choices, action.metavar, action.nargs, help_text)
    assert len(seen) >= 2, f"{flag} is taken by {sorted(seen)} only"
    variants = set(seen.values())
    assert len(variants) == 1, {name: s for name, s in seen.items()}


def test_set_collects_into_overrides_even_when_absent(commands):
    for name in ("train", "reproduce", "tune", "encoders", "curves", "bench", "data batches"):
        action = option(commands[name], "--set")
        assert (action.dest, action.default) == ("overrides", []), name


def test_time_budget_is_declared_once_for_every_command_that_trains(commands):
    """Same destination, type (minutes > 0, refused while parsing) and metavar; the help says what
    the minutes cover in each command."""
    from crener.options import positive_minutes

    for name in ("train", "reproduce", "tune"):
        action = option(commands[name], "--time-budget")
        assert (action.dest, action.type, action.metavar) == ("time_budget", positive_minutes, "MINUTES"), (
            name
        )
    for text in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--time-budget {text}"):
            positive_minutes(text)
    assert positive_minutes("0.5") == 0.5
