"""crener.probe: a server address answers as the service it names within seconds, or the command
stops with one line that says which (issue 37, class 2). Loopback servers only.

The real PostgreSQL test needs ``$CRENER_TEST_POSTGRES`` (``.ci/postgres``); without it it skips,
which CI (``CRENER_STRICT_SKIPS=1``) turns into a failure.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from crener import probe
from crener.errors import StoreError, UnreachableError
from crener.probe import check_driver, check_server
from tests.helpers import closed_port, silent_server, web_server

SHORT_S = 1.0  # the probe's timeout in these tests: silence is found without waiting 5 s


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(probe, "PROBE_TIMEOUT_S", SHORT_S)
    return SHORT_S


def _refused(uri: str, error: type[StoreError] = StoreError) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        check_server(uri, "the store", "do this instead")
    return str(info.value), time.monotonic() - t0


def test_a_real_postgresql_server_passes() -> None:
    url = os.environ.get("CRENER_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: export CRENER_TEST_POSTGRES=$(.ci/postgres)")
    check_server(url, "the store", "x")
    from crener.tracking import check_store

    check_store(url)  # its driver is installed too (psycopg)


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg", "tcp"])
def test_a_silent_server_fails_within_the_timeout(scheme: str, short_timeout: float) -> None:
    port = silent_server()
    message, seconds = _refused(f"{scheme}://user:secret@127.0.0.1:{port}/db")
    assert seconds < short_timeout + 1.0, seconds
    assert f"127.0.0.1:{port}" in message and "it said nothing" in message and "do this instead" in message
    assert "secret" not in message and "***" in message  # the password is masked
    assert ("not a PostgreSQL server" if scheme != "tcp" else "not a Dask scheduler") in message


def test_a_web_server_is_not_postgresql(short_timeout: float) -> None:
    message, seconds = _refused(f"postgresql://u@127.0.0.1:{web_server()}/db")
    assert "not a PostgreSQL server" in message and seconds < short_timeout + 1.0


def test_a_web_server_answering_404_is_not_mlflow() -> None:
    port = web_server()
    message, seconds = _refused(f"http://127.0.0.1:{port}")
    assert f"http://127.0.0.1:{port} is not an MLflow tracking server (HTTP 404, not JSON" in message
    assert seconds < 2


def test_a_web_server_answering_json_of_another_kind_is_not_mlflow() -> None:
    port = web_server(404, b'{"detail": "Not Found"}', "application/json")
    message, _ = _refused(f"http://127.0.0.1:{port}")
    assert "is not an MLflow tracking server (HTTP 404, JSON" in message


def test_an_mlflow_like_answer_passes() -> None:
    body = json.dumps({"experiments": [{"experiment_id": "0", "name": "Default"}]}).encode()
    port = web_server(200, body, "application/json")
    check_server(f"http://127.0.0.1:{port}", "the store", "x")
    check_server(f"http://127.0.0.1:{port}/", "the store", "x")


def test_mlflow_refusing_says_its_error() -> None:
    body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "database is down"}).encode()
    message, _ = _refused(f"http://127.0.0.1:{web_server(500, body, 'application/json')}")
    assert "HTTP 500 (INTERNAL_ERROR: database is down)" in message


def test_a_silent_http_server_fails_within_the_timeout(short_timeout: float) -> None:
    message, seconds = _refused(f"http://127.0.0.1:{silent_server()}")
    assert f"no answer in {short_timeout:g} s" in message and seconds < short_timeout + 1.0


@pytest.mark.parametrize("scheme", ["postgresql", "http", "tcp", "mysql"])
def test_nothing_listening_is_the_environment(scheme: str) -> None:
    message, seconds = _refused(f"{scheme}://127.0.0.1:{closed_port()}/x", UnreachableError)
    assert message.startswith("cannot reach the store") and "start that server" in message
    assert seconds < 1


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("postgresql:///db", "names no host"),
        ("tcp://127.0.0.1", "names no port"),
        ("postgresql://u@127.0.0.1:port/db", "Port could not be cast"),
        ("postgresql://u@no-such-host.invalid/db", "host no-such-host.invalid not found"),
        ("redis://127.0.0.1:6379", "redis scheme is not a server crener can use"),
    ],
)
def test_an_address_that_names_no_server_is_a_usage_mistake(uri: str, says: str) -> None:
    message, _ = _refused(uri)
    assert says in message, message


def test_a_real_dask_scheduler_passes() -> None:
    pytest.importorskip("distributed", reason="the cluster extra: pip install -e '.[cluster]'")
    import asyncio
    import queue
    import threading

    from distributed import Scheduler

    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=None) as scheduler:
            ready.put(scheduler.address)
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    try:
        check_server(ready.get(timeout=60), "the Dask scheduler", "x")
    finally:
        stop.set()
        thread.join(timeout=30)


def test_a_missing_driver_names_the_module() -> None:
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mysqlclient is installed here")
    with pytest.raises(
        StoreError, match=r"mysql:// needs the MySQLdb driver, which is not installed; install it, or x"
    ):
        check_driver("mysql://u:pw@127.0.0.1/db", "--storage", "x")
    with pytest.raises(StoreError, match="Can't load plugin"):
        check_driver("nosuch://x", "--storage", "x")


def test_check_store_refuses_stores_crener_does_not_open() -> None:
    from crener.tracking import check_store

    with pytest.raises(StoreError, match="crener does not open databricks:// stores"):
        check_store("databricks://profile")
    with pytest.raises(StoreError, match="is not a store address"):
        check_store("nonsense")
