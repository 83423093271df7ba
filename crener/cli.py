"""The `crener` command line: the only place that parses arguments.

Each area owns its subcommands in a module exposing ``register(subparsers)``; handlers are
set with ``parser.set_defaults(func=...)`` and return an exit code. Areas are found through the
entry points of the group ``crener.commands`` (pyproject.toml), one per subcommand, naming the
module that registers it: the same plugin mechanism as the model families (:mod:`crener.registry`),
so crener/ never names experiments/ or reports/, and only the module owning the requested
subcommand is imported (``crener data stats`` does not pay for importing torch or mlflow).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from crener.errors import CrenerError
from crener.registry import plugins

COMMANDS_GROUP = "crener.commands"

log = logging.getLogger("crener")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a subcommand), just the module that registers it is imported."""
    parser = argparse.ArgumentParser(
        prog="crener", description="CRENER reproduction suite: data, training, sweeps, reports."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = plugins(COMMANDS_GROUP)
    registered: set[str] = set()
    for name, ep in commands.items():
        if (only is not None and name != only) or ep.value in registered:
            continue
        registered.add(ep.value)  # one module may register several subcommands
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Nothing may come from a model hub unless the user opted in: fail fast instead of hanging.
    # Set before any command module imports transformers, which reads it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in plugins(COMMANDS_GROUP) else None)
    args = parser.parse_args(argv)
    args.argv = argv  # for commands that start copies of themselves (reproduce --jobs)
    # A worker process of such a command says which one it is on every line.
    job = os.environ.get("CRENER_JOB", "")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s " + (f"[{job}] " if job else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except CrenerError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:
        # The reader of the output went away (`crener predict ... | head`): stop without a
        # traceback, and keep Python's exit-time flush of stdout from failing on the same pipe.
        _silence_stdout()
        log.error("the output pipe was closed before crener finished writing (broken pipe); stopped")
        return BROKEN_PIPE_EXIT


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
