"""Developer and user entry points. Every session runs offline from model hubs."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
# A missing checkpoint must fail at once instead of waiting on a hub we cannot reach.
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
# The interpreter nox itself runs on (the README's venv): any Python >= 3.11 (pyproject's
# requires-python). Naming a version here made `nox -s tests` print "skipped: interpreter not
# found" and exit 0 on machines without it: green with no test run.
PY = None
nox.options.error_on_missing_interpreters = True
# Keep each session's environment between runs: reinstalling torch every time cost minutes.
nox.options.reuse_venv = "yes"


def _install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    """Fast test suite (CPU, minutes): everything not marked slow or gpu."""
    _install(session)
    session.run("pytest", "-m", "not slow and not gpu", *session.posargs, env=ENV)


@nox.session(python=PY)
def tests_slow(session: nox.Session) -> None:
    """Slow tests: whole-dataset round trips, real training runs."""
    _install(session)
    session.run("pytest", "-m", "slow and not gpu", *session.posargs, env=ENV)


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PY)
def smoke(session: nox.Session) -> None:
    """The smoke profile end to end (minutes): reproduce on a data slice, then the report."""
    _install(session)
    session.run("crener", "reproduce", "--profile", "smoke", *session.posargs, env=ENV)


@nox.session(python=PY)
def reproduce(session: nox.Session) -> None:
    """Tables 2-6: train every system and variant (quick profile by default), then report."""
    _install(session)
    # Two worker processes of one thread each: on 2 cores the small quick cells run 1.8x faster
    # side by side than one after another with two threads each (reports/results-history.md).
    args = session.posargs or ["--profile", "quick", "--jobs", "2"]
    session.run("crener", "reproduce", *args, env=ENV)


@nox.session(python=PY)
def report(session: nox.Session) -> None:
    """Regenerate tables and figures from the MLflow store (never retrains)."""
    _install(session)
    session.run("crener", "report", *session.posargs, env=ENV)


@nox.session(python=PY)
def tune(session: nox.Session) -> None:
    """Optuna search (defaults: Resume, CRENER, quick profile, 10 trials)."""
    _install(session)
    args = session.posargs or ["--dataset", "resume", "--trials", "10"]
    session.run("crener", "tune", *args, env=ENV)


@nox.session(python=PY)
def ui(session: nox.Session) -> None:
    """MLflow UI on 127.0.0.1 with one worker (prints the URL)."""
    _install(session)
    session.run("crener", "ui", *session.posargs, env=ENV)


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """Speed and memory benchmarks (sentences/s, peak memory against length)."""
    _install(session)
    session.run(
        "crener",
        "bench",
        *session.posargs,
        env={**ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )


@nox.session(python=PY)
def gpu_check(session: nox.Session) -> None:
    """The GPU check (crener/gpucheck.py): gpu tests, fp32 vs bf16 speed, an epoch, MSRA's worst batch."""
    _install(session)
    session.run("python", "-m", "crener.gpucheck", *session.posargs, env=ENV)
