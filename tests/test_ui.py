"""``crener ui``: the MLflow UI comes up on 127.0.0.1 with one worker and answers HTTP 200."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from experiments.commands import ui_command
from tests.helpers import mlflow_template

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90  # a cold `mlflow ui` on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port: int) -> set[str] | None:
    """IPv4 addresses listening on ``port`` per /proc/net/tcp (None where there is no /proc)."""
    table = Path("/proc/net/tcp")
    if not table.is_file():
        return None
    out = set()
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def test_ui_command_line(tmp_path: Path) -> None:
    cmd = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", "127.0.0.1", 5005)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5005"
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert "--artifacts-destination" not in ui_command("postgresql://db/mlflow", "127.0.0.1", 5000)


def test_ui_refuses_a_server_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    from crener.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert main(["ui"]) == 2


def test_ui_answers_http_200(tmp_path: Path) -> None:
    shutil.copy(mlflow_template(), tmp_path / "mlflow.db")  # the server need not build the schema
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    log = tmp_path / "ui.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crener.cli", "ui", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=open(log, "w"),  # noqa: SIM115 - lives as long as the server
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server's own children go down with the group
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status = None
        while time.monotonic() < deadline and status is None:
            if proc.poll() is not None:
                pytest.fail(f"crener ui exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    status = resp.status
                    body = resp.read(4096).decode("utf-8", "replace")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert status == 200, f"no answer within {START_TIMEOUT_S} s:\n{log.read_text()}"
        assert "mlflow" in body.lower()
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text  # the URL is logged
        listening = _listen_addresses(port)
        if listening is not None:  # Linux: the socket is on loopback, not a wildcard address
            assert listening == {"127.0.0.1"}, listening
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


def test_ui_lists_runs_links(tmp_path: Path) -> None:
    """MLflow 3 opens experiments on its GenAI page, so `crener ui` names each runs table."""
    from crener.tracking import Tracker
    from experiments.commands import _crener_experiments

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _crener_experiments(uri) == []  # no store yet: nothing to list, nothing created
    assert not (tmp_path / "mlflow.db").exists()
    shutil.copy(mlflow_template(), tmp_path / "mlflow.db")
    exp_id = Tracker(uri).experiment_id("crener-main-smoke")
    assert _crener_experiments(uri) == [("crener-main-smoke", exp_id)]
