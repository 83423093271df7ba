"""Is the server at an address the one crener expects? Answered within seconds, before a client
library is handed the address.

MLflow retries a store it cannot open for minutes (SQLAlchemy: 15 attempts with back-off; HTTP:
7 retries), SQLAlchemy waits on a PostgreSQL port where another service listens for as long as
that service keeps the connection open, and Dask waits 30 s, then raises a traceback. So each
server address is checked once, up front, with :func:`check_server`: a TCP connection and the
first exchange of the expected protocol, each bounded by :data:`PROBE_TIMEOUT_S`, with no driver
needed (psycopg, distributed):

- ``postgresql`` (``postgresql+DRIVER``): an SSLRequest packet, which every PostgreSQL server
  answers with one byte, ``S`` or ``N``, before any authentication;
- ``http``, ``https``: a GET of MLflow's REST endpoint ``experiments/search``, which an MLflow
  tracking server answers with a JSON object;
- ``tcp`` (a Dask scheduler): the handshake a Dask listener sends first on every connection;
- ``mysql``, ``mssql``, ``tls``: a TCP connection only (their first exchange needs a driver or
  a certificate).

No torch, no mlflow, no optuna: the command modules call it before importing them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request

from crener.errors import StoreError, UnreachableError

PROBE_TIMEOUT_S = 5.0
# PostgreSQL's SSLRequest: length 8, then the request code 1234.5679; the answer is b"S" or b"N".
PG_SSL_REQUEST = struct.pack("!II", 8, 80877103)
PG_ANSWERS = (b"S", b"N")
# MLflow's REST endpoint that every tracking server serves (GET), and the credentials MLflow reads.
MLFLOW_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV = (
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)  # fmt: skip
# A Dask message: 8 bytes of total length, then 8 bytes of frame count; a handshake is a small
# msgpack mapping that names the peer's pickle protocol.
DASK_HANDSHAKE_KEY = b"pickle-protocol"
MAX_ANSWER_BYTES = 1 << 16  # a handshake or a probe's JSON is far smaller
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
SERVER_SCHEMES = ("postgresql", "http", "https", "mysql", "mssql", "tcp", "tls")


def masked_uri(uri: str) -> str:
    """``uri`` with any password masked, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def scheme_of(uri: str) -> str:
    """The scheme of ``uri`` without its driver (``postgresql+psycopg`` -> ``postgresql``)."""
    return urllib.parse.urlsplit(uri).scheme.split("+", 1)[0].lower()


def check_server(uri: str, role: str, how: str) -> None:
    """Raise within about :data:`PROBE_TIMEOUT_S` unless the server at ``uri`` answers as its
    scheme's service should (see the module docstring). ``role`` names what the address is for
    ("the MLflow store", "the Optuna storage", "the Dask scheduler"), ``how`` what to do instead;
    both go into the message. :class:`~crener.errors.UnreachableError` when nothing answers (a
    server that is down: the environment), :class:`~crener.errors.StoreError` when something
    else does (the address is wrong)."""
    scheme = scheme_of(uri)
    shown = masked_uri(uri)
    if scheme not in SERVER_SCHEMES:
        raise StoreError(f"{role} {shown!r}: {scheme or 'no'} scheme is not a server crener can use; {how}")
    host, port = _host_port(uri, scheme, role, how)
    sock = _connect(host, port, f"{role} {shown}", how)
    try:
        if scheme == "postgresql":
            _expect_postgresql(sock, f"{role} {shown}", how)
        elif scheme in ("http", "https"):
            sock.close()  # urllib makes its own connection, with TLS where asked
            _expect_mlflow(uri, f"{role} {shown}", how)
        elif scheme == "tcp":
            _expect_dask(sock, f"{role} {shown}", how)
    finally:
        sock.close()


def _host_port(uri: str, scheme: str, role: str, how: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(uri)
    try:
        host, port = parts.hostname, parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError as exc:  # a port that is not a number
        raise StoreError(f"{role} {masked_uri(uri)}: {exc}; {how}") from None
    if not host:
        raise StoreError(f"{role} {masked_uri(uri)} names no host; {how}")
    if port is None:  # Dask has no default port: the scheduler prints the one it listens on
        raise StoreError(f"{role} {masked_uri(uri)} names no port (tcp://HOST:PORT); {how}")
    return host, port


def _connect(host: str, port: int, what: str, how: str) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except socket.gaierror as exc:  # a name that does not resolve: a typo more often than not
        raise StoreError(f"{what}: host {host} not found ({exc.strerror}); {how}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UnreachableError(
            f"cannot reach {what} ({host}:{port}: {reason}); start that server, or {how}"
        ) from None


def _recv(sock: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes within :data:`PROBE_TIMEOUT_S` in all (a peer that trickles bytes
    does not extend it), fewer if the peer closes or falls silent."""
    data = b""
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        while len(data) < size and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
    except (TimeoutError, OSError):
        pass
    return data


def _silence(data: bytes) -> str:
    return "it said nothing" if not data else f"it answered {data[:16]!r}"


def _expect_postgresql(sock: socket.socket, what: str, how: str) -> None:
    try:
        sock.sendall(PG_SSL_REQUEST)
    except OSError as exc:
        raise StoreError(f"{what}: the server closed the connection ({exc}); {how}") from None
    answer = _recv(sock, 1)
    if answer not in PG_ANSWERS:
        raise StoreError(
            f"{what} is not a PostgreSQL server ({_silence(answer)} in {PROBE_TIMEOUT_S:g} s to a "
            f"PostgreSQL greeting): another service listens at that port; {how}"
        )


def _expect_dask(sock: socket.socket, what: str, how: str) -> None:
    # A Dask listener writes its handshake as soon as it accepts a connection.
    head = _recv(sock, 8)
    total = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    body = _recv(sock, total) if 0 < total <= MAX_ANSWER_BYTES else b""
    if DASK_HANDSHAKE_KEY not in body:
        raise StoreError(
            f"{what} is not a Dask scheduler ({_silence(head)} in {PROBE_TIMEOUT_S:g} s where a "
            f"scheduler sends its handshake); {how}"
        )


def _expect_mlflow(uri: str, what: str, how: str) -> None:
    url = uri.rstrip("/") + MLFLOW_PROBE_PATH
    request = urllib.request.Request(url, headers={"Accept": "application/json", **_mlflow_auth()})
    context = ssl.create_default_context() if scheme_of(uri) == "https" else None
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S, context=context) as response:  # noqa: S310 - http(s) only
            status, body = response.status, response.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_ANSWER_BYTES)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, (TimeoutError, socket.timeout)):
            reason = f"no answer in {PROBE_TIMEOUT_S:g} s"
        raise StoreError(f"{what} is not an MLflow tracking server ({reason}); {how}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status == 200 and isinstance(answer, dict):
        return
    if isinstance(answer, dict) and "error_code" in answer:  # MLflow itself, refusing
        detail = f"{answer['error_code']}: {str(answer.get('message', ''))[:200]}"
        raise StoreError(f"{what} answers HTTP {status} ({detail}); {how}")
    if status in (401, 403):
        raise StoreError(
            f"{what} refuses the request (HTTP {status}); set {MLFLOW_USER_ENV} and {MLFLOW_PASSWORD_ENV} "
            f"(or {MLFLOW_TOKEN_ENV}), or {how}"
        )
    kind = "JSON" if answer is not None else "not JSON"
    raise StoreError(
        f"{what} is not an MLflow tracking server (HTTP {status}, {kind}, at {MLFLOW_PROBE_PATH}); {how}"
    )


def _mlflow_auth() -> dict[str, str]:
    """The Authorization header MLflow's client would send, from its environment variables."""
    user, password = os.environ.get(MLFLOW_USER_ENV), os.environ.get(MLFLOW_PASSWORD_ENV)
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get(MLFLOW_TOKEN_ENV)
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_driver(uri: str, role: str, how: str) -> None:
    """Refuse a database URL whose SQLAlchemy driver is not installed (``postgresql://`` means
    psycopg2, ``mysql://`` mysqlclient), naming the module to install, instead of the
    ImportError the client library would raise when it first connects."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(uri).get_dialect()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{role} {masked_uri(uri)!r}: {reason}; {how}") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name or dialect.driver
        scheme = urllib.parse.urlsplit(uri).scheme
        raise StoreError(
            f"{role} {masked_uri(uri)!r}: {scheme}:// needs the {module} driver, which is not installed; "
            f"install it, or {how}"
        ) from None
