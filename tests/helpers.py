"""Helpers shared by the test modules (fixtures built on them live in conftest.py): a fake
``fit`` with ``crener.train.fit``'s contract, usable in-process and in subprocesses; an MLflow
SQLite store template (creating the schema takes seconds, copying it does not); tiny configs and
a BMES writer for synthetic datasets."""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
import textwrap
import types
from pathlib import Path

from crener.config import RunConfig
from crener.profiles import build_run_config

FAKE_TRAIN_SOURCE = textwrap.dedent(
    '''
    """Stand-in for crener.train with fit's contract: checkpoints, history replay, files."""
    import json, math, os, time
    from pathlib import Path

    from crener.identity import run_key

    CALLS = []  # keys fit was called with (in-process tests read it)

    def _f1(cfg, epoch):
        # Peaks at lr = 2e-3 and grows with the epoch, so tuning and pruning have a signal.
        peak = 0.9 - 0.2 * abs(math.log10(cfg.train.lr) - math.log10(2e-3))
        return max(0.01, peak * epoch / cfg.train.epochs)

    def fit(cfg, workdir, *, callback=None, resume=True, data_root=None):
        CALLS.append(run_key(cfg))
        failing = set(filter(None, os.environ.get("CRENER_FAKE_FAIL_MODELS", "").split(",")))
        if cfg.model.name in failing:
            raise ModuleNotFoundError(f"No module named 'baselines.{cfg.model.name}'")
        sleep = float(os.environ.get("CRENER_FAKE_EPOCH_SECONDS", "0"))
        workdir = Path(workdir)
        (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)
        last = workdir / "checkpoints" / "last.pt"
        history = json.loads(last.read_text())["history"] if resume and last.exists() else []
        (workdir / "config.json").write_text(json.dumps(cfg.flatten(), default=list))
        start = getattr(callback, "on_start", None)
        if start:
            start({"num_labels": 9, "parameters": 1234, "labels": ["O", "PER"], "resumed_from_epoch": len(history)})
        end = getattr(callback, "on_epoch_end", None)
        for rec in history:
            if end:
                end(rec["epoch"], {k: v for k, v in rec.items() if k != "epoch"})
        for epoch in range(len(history) + 1, cfg.train.epochs + 1):
            time.sleep(sleep)
            f1 = _f1(cfg, epoch)
            m = {"train/loss": 1.0 / epoch, "dev/precision": f1, "dev/recall": f1, "dev/f1": f1, "epoch_seconds": sleep}
            history.append({"epoch": epoch, **m})
            (workdir / "history.json").write_text(json.dumps(history))
            last.write_text(json.dumps({"history": history}))
            if end:
                end(epoch, m)
        best = max(history, key=lambda r: r["dev/f1"])
        (workdir / "checkpoints" / "best.pt").write_text("{}")
        (workdir / "predictions").mkdir(exist_ok=True)
        (workdir / "predictions" / "test.jsonl").write_text(
            json.dumps({"index": 0, "text": "张三", "gold": [[[0, 1], "PER"]], "pred": [[[0, 1], "PER"]]}) + "\\n"
        )
        (workdir / "per_type.json").write_text(json.dumps({"PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0}}))
        dev = {"precision": best["dev/precision"], "recall": best["dev/recall"], "f1": best["dev/f1"]}
        summary = {"dev": dev, "test": dict(dev), "best_epoch": best["epoch"], "epochs": cfg.train.epochs,
                   "seconds": 0.5, "parameters": 1234, "num_labels": 9, "key": run_key(cfg)}
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary
    '''
)


def fake_train_module() -> types.ModuleType:
    module = types.ModuleType("crener.train")
    exec(compile(FAKE_TRAIN_SOURCE, "<fake crener.train>", "exec"), module.__dict__)
    return module


def fake_cli(tmp_path: Path) -> list[str]:
    """``python -c ...`` prefix that runs the ``crener`` CLI with the fake ``fit`` installed."""
    (tmp_path / "fakepkg").mkdir(exist_ok=True)
    (tmp_path / "fakepkg" / "fake_train.py").write_text(FAKE_TRAIN_SOURCE, encoding="utf-8")
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); import fake_train; "
        "sys.modules['crener.train'] = fake_train; from crener.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, str(tmp_path / "fakepkg")]


@functools.cache
def mlflow_template() -> Path:
    """An empty MLflow SQLite store, its schema created once per test process (seconds)."""
    tmp = Path(tempfile.mkdtemp(prefix="crener-mlflow-template-"))
    atexit.register(shutil.rmtree, tmp, True)
    from crener.tracking import Tracker  # here: the GPU machine's tests run without MLflow

    Tracker(f"sqlite:///{tmp / 'mlflow.db'}")
    return tmp / "mlflow.db"


def smoke_cfg(**kw: object) -> RunConfig:
    return build_run_config(profile="smoke", dataset=kw.pop("dataset", "resume"), **kw)  # type: ignore[arg-type]


def write_bmes(path: Path, sentences) -> None:  # noqa: ANN001 - Sentence objects
    """``sentences`` as a BMES file (one ``char tag`` a line, a blank line between sentences)."""
    lines = []
    for s in sentences:
        tags = ["O"] * len(s)
        for e in s.entities:
            if len(e.indices) == 1:
                tags[e.start] = f"S-{e.type}"
            else:
                tags[e.start] = f"B-{e.type}"
                for i in e.indices[1:-1]:
                    tags[i] = f"M-{e.type}"
                tags[e.end - 1] = f"E-{e.type}"
        lines += [f"{c} {t}" for c, t in zip(s.chars, tags)] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_cfg(data_root: Path, model: str = "crener", **overrides: object) -> RunConfig:
    """A smoke-sized config of ``model`` on the synthetic dataset under ``data_root`` (tiny_data)."""
    base = {
        "runtime.data_root": str(data_root), "data.train_limit": 0, "data.eval_limit": 0,
        "train.epochs": 3, "train.max_cells": 400, "runtime.progress": False,
    }  # fmt: skip
    return build_run_config(model=model, profile="smoke", overrides={**base, **overrides})


def tiny_resume(root: Path, sentences: int) -> Path:
    """The first ``sentences`` sentences of each Resume split, so a real smoke run takes seconds."""
    from crener.data.datasets import resolve_data_root

    src = resolve_data_root() / "resume"
    for split in ("train", "dev", "test"):
        blocks = (src / f"{split}.char.bmes").read_text(encoding="utf-8").split("\n\n")[:sentences]
        (root / "resume").mkdir(parents=True, exist_ok=True)
        (root / "resume" / f"{split}.char.bmes").write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- servers of the wrong kind


def silent_server() -> int:
    """The port of a loopback server that accepts connections and never says anything (what a
    PostgreSQL or Dask client meets at a port where another, quiet, service listens). It runs in
    a daemon thread for the rest of the test process."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held = []  # accepted connections stay open: the peer sees silence, not a close

    def accept() -> None:
        while True:
            held.append(sock.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def web_server(status: int = 404, body: bytes = b"<html><body>Not Found</body></html>",
               content_type: str = "text/html") -> int:  # fmt: skip
    """The port of a loopback HTTP server answering every GET with ``status`` and ``body`` (a web
    server that is not MLflow, or a fake MLflow); a daemon thread for the rest of the process."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


@functools.cache
def closed_port() -> int:
    """A loopback port where nothing listens (a server that is down): bound, never listening, and
    held for the rest of the process so that nothing else takes it; a connection is refused."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


_HELD: list = []
