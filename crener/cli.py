"""The `crener` command line: the only place that parses arguments.

Each area owns its subcommands in a module exposing ``register(subparsers)``; handlers are
set with ``parser.set_defaults(func=...)`` and return an exit code. Modules are imported
lazily so ``crener data stats`` does not pay for importing torch or mlflow.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from crener.errors import CrenerError

# (module, subcommands it registers); modules are imported only when one of them is asked for.
_COMMAND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crener.data.commands", ("data",)),
    ("crener.commands", ("train", "evaluate", "predict", "bench", "pretrain")),
    ("crener.migrate", ("migrate",)),
    ("experiments.commands", ("reproduce", "tune", "ui")),
    ("experiments.curves", ("curves",)),
    ("reports.commands", ("report",)),
)

log = logging.getLogger("crener")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crener", description="CRENER reproduction suite: data, training, sweeps, reports."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name, commands in _COMMAND_MODULES:
        if only is not None and only not in commands:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Nothing may come from a model hub unless the user opted in: fail fast instead of hanging.
    # Set before any command module imports transformers, which reads it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Import only the module that owns the requested subcommand (fast `crener data ...`).
    first = next((a for a in argv if not a.startswith("-")), None)
    known = {c for _, cmds in _COMMAND_MODULES for c in cmds}
    parser = build_parser(first if first in known else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
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


if __name__ == "__main__":
    sys.exit(main())
