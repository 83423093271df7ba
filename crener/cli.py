"""The `crener` command line: the only place that parses arguments, and its one error boundary.

Each area owns its subcommands in a module exposing ``register(subparsers)``; handlers are
set with ``parser.set_defaults(func=...)`` and return an exit code. Areas are found through the
entry points of the group ``crener.commands`` (pyproject.toml), one per subcommand, naming the
module that registers it: the same plugin mechanism as the model families (:mod:`crener.registry`),
so crener/ never names experiments/ or reports/, and only the module owning the requested
subcommand is imported (``crener data stats`` does not pay for importing torch or mlflow).

:func:`main` turns every expected failure (the project's own errors, a path that is wrong, a full
disk, a file that is not text, an interrupt) into one line on standard error and an exit status of
:data:`EXIT_CODES`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import NoReturn

from crener.errors import CrenerError, UnreachableError
from crener.registry import plugins

# When the command line was loaded (time.time()): where the kernel does not say when the process
# started, the earliest moment crener knows of (crener.budget.process_started).
LOADED = time.time()

COMMANDS_GROUP = "crener.commands"
DEBUG_ENV = "CRENER_DEBUG"

EXIT_ENVIRONMENT = 1  # the machine, not the command: a full disk, no permission, a network
EXIT_USAGE = 2  # the command or its input: an argument, a path, a file's contents
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: kill, timeout, a batch scheduler's preemption
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
EXIT_CODES = {
    0: "success",
    EXIT_ENVIRONMENT: "the environment failed (full disk, no permission, network, a failed cell or measurement)",
    EXIT_USAGE: "a usage or input mistake (an argument, a path, a file's contents); the message says what to change",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); rerun the same command to continue where it can",
    EXIT_TERMINATED: "terminated (SIGTERM: kill, timeout, preemption); rerun the same command to continue",
    BROKEN_PIPE_EXIT: "the reader of the output went away (broken pipe)",
}

# OSError numbers that say the machine failed rather than that a named path is wrong.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
)
# What to do about an OSError, by its number; the message names the path it came with.
OS_ADVICE = {
    errno.ENOENT: "no such file or folder; check the path",
    errno.EISDIR: "is a folder where a file is expected; name a file",
    errno.ENOTDIR: "a part of this path is a file where a folder is expected; name a folder",
    errno.EEXIST: "already exists; remove it or name another path",
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere, then run it again",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere, then run it again",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "no permission; write elsewhere or change the permissions",
    errno.EPERM: "operation not permitted; write elsewhere or change the permissions",
    errno.EIO: "input/output error of the device; check the disk",
    errno.ENAMETOOLONG: "the name is too long; use a shorter path",
}

log = logging.getLogger("crener")


class Parser(argparse.ArgumentParser):
    """argparse with its usage mistakes on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (usage: {self.prog} --help)\n")


def epilog() -> str:
    return (
        "exit status:\n"
        + "\n".join(f"  {code:3d}  {what}" for code, what in EXIT_CODES.items())
        + (f"\n\nA failure is one line on standard error; --debug (or {DEBUG_ENV}=1) adds its traceback.")
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a subcommand), just the module that registers it is imported."""
    parser = Parser(
        prog="crener",
        description="CRENER reproduction suite: data, training, sweeps, reports.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help=f"a traceback with every failure (also {DEBUG_ENV}=1)"
    )
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
    entered = time.time()
    whole_process = argv is None  # the script (or python -m crener): this process is the command
    argv = list(sys.argv[1:] if argv is None else argv)
    # Nothing may come from a model hub unless the user opted in: fail fast instead of hanging.
    # Set before any command module imports transformers, which reads it at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in plugins(COMMANDS_GROUP) else None)
    args = parser.parse_args(argv)
    args.argv = argv  # for commands that start copies of themselves (reproduce --jobs)
    # When the command's clock started, for what --time-budget counts as spent before its probe:
    # the process's start where the process is the command, else (called in a running program,
    # such as the tests) this call.
    from crener.budget import process_started

    args.started = (process_started() if whole_process else None) or entered
    # A worker process of such a command says which one it is on every line.
    job = os.environ.get("CRENER_JOB", "")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s " + (f"[{job}] " if job else "") + "%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        with _terminate_as_interrupt():
            return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of the output went away (`crener predict ... | head`): stop without a
        # traceback, and keep Python's exit-time flush of stdout from failing on the same pipe.
        _silence_stdout()
        log.error("the output pipe was closed before crener finished writing (broken pipe); stopped")
        return BROKEN_PIPE_EXIT
    except Terminated:
        log.error("terminated (SIGTERM); run the same command again to continue where it can", exc_info=debug)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to continue where it can", exc_info=debug)
        return EXIT_INTERRUPTED
    except Exception as exc:
        failure = explain(exc)
        if failure is None:
            raise  # a bug: its traceback is what a report needs
        status, message = failure
        log.error("%s", message, exc_info=debug)
        _flush_stdout()
        return status


class Terminated(KeyboardInterrupt):
    """SIGTERM delivered as an interrupt. Python's default for SIGTERM ends the process without
    unwinding, so a run it stopped stayed RUNNING in MLflow and its worker's children lived on;
    as an interrupt it takes Ctrl-C's path: the run is marked KILLED, resumable state is kept,
    workers are stopped."""


@contextmanager
def _terminate_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; restored after)."""

    def handler(signum: int, frame: object) -> NoReturn:
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a command run from a thread): leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def explain(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an expected failure; None for a bug."""
    if isinstance(exc, UnreachableError):  # a server that is down, as a refused connection below
        return EXIT_ENVIRONMENT, _one_line(str(exc))
    if isinstance(exc, CrenerError):
        return EXIT_USAGE, _one_line(str(exc))
    if isinstance(exc, UnicodeDecodeError):
        return EXIT_USAGE, (
            f"cannot read the input as UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at "
            f"offset {exc.start}): is it a binary file? Save it as UTF-8 text"
        )
    if isinstance(exc, OSError):
        return _explain_os_error(exc)
    return None


def _explain_os_error(exc: OSError) -> tuple[int, str] | None:
    """A path error (with its filename) or a failure of the machine; other OSErrors (a socket
    used wrongly, say) are bugs."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_ENVIRONMENT, _one_line(
            f"network: {exc.strerror or exc}; check the address and that the service runs"
        )
    if exc.filename is None and exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = "" if exc.filename is None else f"{os.fsdecode(exc.filename)}: "
    if exc.filename2 is not None:
        where = f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: "
    advice = OS_ADVICE.get(exc.errno, exc.strerror or str(exc))
    status = EXIT_ENVIRONMENT if exc.errno in ENVIRONMENT_ERRNOS else EXIT_USAGE
    return status, _one_line(where + advice)


def _one_line(message: str) -> str:
    """A multi-line message (a library's) folded onto one line: one failure, one line."""
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def _flush_stdout() -> None:
    """Flush what the command wrote before failing; if standard output itself is what failed (a
    full device), drop the rest, so that Python's exit-time flush adds no second message."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
