"""The README's first commands are what CI and a newcomer run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_setup_plus_reproduce_and_the_test_command():
    setup, test = readme_commands()[:2]
    assert "nox -s reproduce" in setup and "pip install" in setup
    assert test == "nox -s tests"


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test = readme_commands()[1]
    assert re.search(rf"^{re.escape(test)}$", ci, re.M), f"{test!r} is not a line of .ci/run"


def test_nox_sessions_have_docstrings_and_run_offline():
    nox_src = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    sessions = re.findall(
        r"@nox.session[^\n]*\ndef (\w+)\(session[^)]*\)[^:]*:\n    \"\"\"(.+?)\"\"\"", nox_src
    )
    names = {name for name, _ in sessions}
    assert {"tests", "lint", "smoke", "reproduce", "tune", "ui", "bench", "report", "tests_slow"} <= names
    assert '"HF_HUB_OFFLINE": "1"' in nox_src
