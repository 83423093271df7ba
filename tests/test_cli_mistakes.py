"""A table of command-line mistakes across every subcommand (issue 37), each run as a user would:
``python -m crener ...`` in a fresh process, in a folder of its own.

Each row asserts the exit status (:data:`crener.cli.EXIT_CODES`), exactly one line on standard
error that names the offending value, no traceback, an answer within seconds, and that nothing in
the folder was created or changed: a mistake is refused before any work. Rows are cheap by
construction; none trains. ``Mistake.kind`` is the issue's class of the mistake (1 a path or file
of the wrong kind, 2 a server address that is down or is another kind of server, 3 a file
that is not ours, 4 a value checked before costly work, 6 a message that says what to do), ``args`` (argparse), ``value`` (a value the command checks) or ``own`` (a
mistake found while writing the table). Rows that could only start work on the old code (a
pretraining, a training) are killed past the bound, so the table also runs against it.

Class 2 rows name loopback servers this process starts (tests/helpers.py): ``{silent}`` accepts
and says nothing, ``{web}`` answers HTTP 404 with a page, ``{closed}`` refuses connections.

``CRENER_UNDER_TEST`` (a source tree, default this checkout) runs the rows against another
version of the code, e.g. an older commit extracted with ``git archive``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import closed_port, silent_server, web_server

REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("CRENER_UNDER_TEST", REPO))
BOUND_S = 30.0  # a mistake is reported within seconds (imports included, on one core)
HANG_S = BOUND_S + 5  # past the bound the row fails anyway: kill it (it hung, or started costly work)

TEXT = "张三在北京工作\n"
BINARY = bytes(range(256)) * 4  # not UTF-8 text
JUNK_SQLITE = "not a database\n" * 100


def _zip_prefix() -> bytes:
    """The first bytes of a checkpoint (torch's zip format), as a killed copy or a full disk leaves it."""
    return b"PK\x03\x04" + b"\x00" * 60


def _sqlite_with(table: str) -> bytes:
    """The bytes of an SQLite database holding one table ``table`` (another program's database)."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        con = sqlite3.connect(Path(tmp) / "x.db")
        con.execute(f"CREATE TABLE {table} (id INTEGER)")
        con.commit()
        con.close()
        return (Path(tmp) / "x.db").read_bytes()


OPTUNA_DB = _sqlite_with("studies")  # what an Optuna storage has and an MLflow store has not
MLFLOW_DB = _sqlite_with("experiments")  # and the reverse
OTHER_DB = _sqlite_with("invoices")  # neither's


@dataclass(frozen=True)
class Mistake:
    argv: tuple[str, ...]  # after `crener`; {tmp} is the row's folder, {data} a tiny dataset root
    says: str  # in the one line on stderr: the offending value (formatted like argv)
    kind: str  # the class (see the module docstring)
    status: int = 2
    files: dict[str, str | bytes | None] = field(default_factory=dict)  # made first; None: a folder
    env: dict[str, str] = field(default_factory=dict)  # formatted like argv


def M(argv: str, says: str, kind: str, status: int = 2, files=None, env=None) -> Mistake:  # noqa: N802
    return Mistake(tuple(argv.split()), says, kind, status, files or {}, env or {})


FILE = {"afile": "a file, not a folder\n"}
DIR = {"adir": None}
TEXTS = {"in.txt": TEXT}
SMOKE = "--profile smoke --data-root {data}"
TRAIN = f"train --dataset resume {SMOKE} --no-track"
TUNE = f"tune --dataset resume {SMOKE} --trials 1"
PRED = "predict --checkpoint {tmp}/nosuch.pt"
ENC = "encoders --datasets resume --seeds 0 --arms random --profile smoke --data-root {data}"
CURVES = "curves --dataset resume --profile smoke --settings new"
REPRO = "reproduce --only table3 --datasets resume --models crener --seeds 0 --dry-run"
DASK = "reproduce --only table3 --datasets resume --models crener --seeds 0 --profile smoke --executor dask"
# Server addresses of class 2 (the servers are this process's, see the module docstring).
PG_CLOSED = "postgresql+psycopg://crener@127.0.0.1:{closed}/mlflow"
PG_SILENT = "postgresql+psycopg://crener:secret@127.0.0.1:{silent}/mlflow"
PG_SILENT_SHOWN = "postgresql+psycopg://crener:***@127.0.0.1:{silent}/mlflow"  # the password masked
PG_WEB = "postgresql://crener@127.0.0.1:{web}/mlflow"
MYSQL = "mysql://crener@127.0.0.1/mlflow"

MISTAKES: dict[str, Mistake] = {
    # ----------------------------------------------------------------- the command line itself
    "crener: no command": M("", "required: COMMAND", "args"),
    "crener: unknown command": M("nosuch", "'nosuch'", "args"),
    # ----------------------------------------------------------------- data
    "data stats: unknown dataset": M("data stats nosuch", "unknown dataset 'nosuch'", "value"),
    "data stats: missing data root": M("data stats resume --data-root {tmp}/nodir", "{tmp}/nodir", "1"),
    "data stats: data root a file": M(
        "data stats resume --data-root {tmp}/afile", "{tmp}/afile", "1", files=FILE
    ),
    "data stats: split file a folder": M(
        "data stats resume --data-root {tmp}/d",
        "{tmp}/d/resume/train.char.bmes",
        "1",
        files={"d/resume/train.char.bmes": None},
    ),
    "data stats: binary split file": M(
        "data stats resume --data-root {tmp}/d",
        "{tmp}/d/resume/train.char.bmes",
        "1",
        files={"d/resume/train.char.bmes": BINARY},
    ),
    "data stats: unknown split": M("data stats resume --split nosuch", "'nosuch'", "args"),
    "data check: missing file": M("data check {tmp}/nosuch.bmes", "{tmp}/nosuch.bmes", "1"),
    "data check: a folder": M("data check {tmp}/adir", "{tmp}/adir", "1", files=DIR),
    "data check: path under a file": M(
        "data check {tmp}/afile/x.bmes", "{tmp}/afile/x.bmes", "1", files=FILE
    ),
    "data stats: dataset folder empty": M(
        "data stats resume --data-root {tmp}/d",
        "{tmp}/d/resume/train.char.bmes",
        "own",
        files={"d/resume": None},
    ),
    "data check: unknown format": M(
        "data check {tmp}/in.txt --format nosuch", "'nosuch'", "args", files=TEXTS
    ),
    "data batches: unknown dataset": M("data batches nosuch", "unknown dataset 'nosuch'", "value"),
    "data batches: unknown profile": M("data batches resume --profile nosuch", "nosuch", "value"),
    "data batches: bad --set": M(
        "data batches resume --data-root {data} --set model.nosuch=1", "model.nosuch", "value"
    ),
    "data bench: unknown dataset": M("data bench nosuch", "unknown dataset 'nosuch'", "value"),
    "data bench: missing data root": M("data bench resume --data-root {tmp}/nodir", "{tmp}/nodir", "1"),
    # ----------------------------------------------------------------- train
    "train: unknown dataset": M("train --dataset nosuch", "unknown dataset 'nosuch'", "value"),
    "train: no dataset": M("train", "--dataset", "args"),
    "train: unknown profile": M("train --dataset resume --profile nosuch", "'nosuch'", "args"),
    "train: unknown model": M("train --dataset resume --model nosuch", "'nosuch'", "args"),
    "train: unknown variant": M("train --dataset resume --variant nosuch", "'nosuch'", "args"),
    "train: negative seed": M("train --dataset resume --seed -1", "'-1'", "args"),
    "train: epochs 1e30": M(f"{TRAIN} --set train.epochs=1e30", "train.epochs", "4"),
    "train: time budget nan": M(f"{TRAIN} --time-budget nan", "--time-budget nan", "4"),
    "train: time budget 0": M(f"{TRAIN} --time-budget 0", "--time-budget 0", "4"),
    "train: epochs a billion": M(f"{TRAIN} --set train.epochs=1000000000", "train.epochs=1000000000", "4"),
    "train: epochs 2.5": M(f"{TRAIN} --set train.epochs=2.5", "train.epochs", "value"),
    "train: unknown key": M(f"{TRAIN} --set model.nosuch=1", "model.nosuch", "value"),
    "train: lr inf": M(f"{TRAIN} --set train.lr=inf", "train.lr=inf", "4"),
    "train: max_steps 1e12": M(f"{TRAIN} --set train.max_steps=1e12", "train.max_steps", "4"),
    "train: set without =": M(f"{TRAIN} --set train.lr", "KEY=VALUE", "value"),
    "train: lr nan": M(f"{TRAIN} --set train.lr=nan", "train.lr", "value"),
    "train: workdir a file": M(f"{TRAIN} --workdir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "train: workdir under a file": M(f"{TRAIN} --workdir {{tmp}}/afile/w", "{tmp}/afile", "1", files=FILE),
    # /sys takes no new entry, even from root (EPERM): the environment refuses, not the command (exit 1).
    "train: workdir where nothing may be made": M(
        f"{TRAIN} --workdir /sys/crener-w", "/sys/crener-w", "1", status=1
    ),
    "train: runs-dir a file": M(f"{TRAIN} --runs-dir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "train: CRENER_RUNS a file": M(TRAIN, "{tmp}/afile", "1", files=FILE, env={"CRENER_RUNS": "{tmp}/afile"}),
    "train: missing data root": M(
        "train --dataset resume --profile smoke --no-track --data-root {tmp}/nodir", "{tmp}/nodir", "1"
    ),
    "train: data root a file": M(
        "train --dataset resume --profile smoke --no-track --data-root {tmp}/afile",
        "{tmp}/afile",
        "1",
        files=FILE,
    ),
    "train: binary split file": M(
        "train --dataset resume --profile smoke --no-track --data-root {tmp}/d",
        "{tmp}/d/resume/train.char.bmes",
        "1",
        files={
            "d/resume/train.char.bmes": BINARY,
            "d/resume/dev.char.bmes": "",
            "d/resume/test.char.bmes": "",
        },
    ),
    "train: missing encoder folder": M(
        f"{TRAIN} --encoder {{tmp}}/nosuch-encoder --workdir {{tmp}}/w", "{tmp}/nosuch-encoder", "6"
    ),
    "train: empty encoder folder": M(
        f"{TRAIN} --encoder {{tmp}}/adir --workdir {{tmp}}/w", "{tmp}/adir", "6", files=DIR
    ),
    "train: truncated last.pt": M(
        f"{TRAIN} --workdir {{tmp}}/w", "--no-resume", "6", files={"w/checkpoints/last.pt": _zip_prefix()}
    ),
    "train: text last.pt": M(
        f"{TRAIN} --workdir {{tmp}}/w", "--no-resume", "6", files={"w/checkpoints/last.pt": "hello\n"}
    ),
    "train: bare-word tracking store": M(
        f"train --dataset resume {SMOKE}", "nonsense", "3", env={"MLFLOW_TRACKING_URI": "nonsense"}
    ),
    "train: store not an SQLite file": M(
        f"train --dataset resume {SMOKE}",
        "{tmp}/junk.db",
        "3",
        files={"junk.db": JUNK_SQLITE},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/junk.db"},
    ),
    "train: store is an Optuna database": M(
        f"train --dataset resume {SMOKE}",
        "{tmp}/o.db is an SQLite database but not an MLflow store",
        "3",
        files={"o.db": OPTUNA_DB},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/o.db"},
    ),
    "train: store is another program's database": M(
        f"train --dataset resume {SMOKE}",
        "{tmp}/x.db is an SQLite database but not an MLflow store",
        "3",
        files={"x.db": OTHER_DB},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/x.db"},
    ),
    "train: store a folder": M(
        f"train --dataset resume {SMOKE}",
        "{tmp}/adir",
        "1",
        files=DIR,
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/adir"},
    ),
    "train: store in a missing folder": M(
        f"train --dataset resume {SMOKE}",
        "{tmp}/nodir",
        "1",
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/nodir/m.db"},
    ),
    "train: PostgreSQL store down": M(
        f"train --dataset resume {SMOKE}", PG_CLOSED, "2", status=1, env={"MLFLOW_TRACKING_URI": PG_CLOSED}
    ),
    "train: PostgreSQL store where another service listens": M(
        f"train --dataset resume {SMOKE}",
        f"{PG_SILENT_SHOWN} is not a PostgreSQL server",
        "2",
        env={"MLFLOW_TRACKING_URI": PG_SILENT},
    ),
    "train: PostgreSQL store where a web server listens": M(
        f"train --dataset resume {SMOKE}", "not a PostgreSQL server", "2", env={"MLFLOW_TRACKING_URI": PG_WEB}
    ),
    "train: HTTP store not MLflow": M(
        f"train --dataset resume {SMOKE}",
        "http://127.0.0.1:{web} is not an MLflow tracking server",
        "2",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{web}"},
    ),
    "train: mysql store without its driver": M(
        f"train --dataset resume {SMOKE}", "mysql:// needs the", "2", env={"MLFLOW_TRACKING_URI": MYSQL}
    ),
    "train: store of a scheme crener does not open": M(
        f"train --dataset resume {SMOKE}",
        "databricks://x",
        "2",
        env={"MLFLOW_TRACKING_URI": "databricks://x"},
    ),
    # ----------------------------------------------------------------- evaluate
    "evaluate: missing checkpoint": M("evaluate --checkpoint {tmp}/nosuch.pt", "{tmp}/nosuch.pt", "1"),
    "evaluate: checkpoint a folder": M("evaluate --checkpoint {tmp}/adir", "{tmp}/adir", "1", files=DIR),
    "evaluate: text checkpoint": M(
        "evaluate --checkpoint {tmp}/notes.pt",
        "{tmp}/notes.pt: it is a text file",
        "6",
        files={"notes.pt": "hello\n"},
    ),
    "evaluate: empty checkpoint": M(
        "evaluate --checkpoint {tmp}/empty.pt", "{tmp}/empty.pt: it is empty", "6", files={"empty.pt": ""}
    ),
    "evaluate: truncated checkpoint": M(
        "evaluate --checkpoint {tmp}/cut.pt", "{tmp}/cut.pt", "6", files={"cut.pt": _zip_prefix()}
    ),
    "evaluate: JSON checkpoint": M(
        "evaluate --checkpoint {tmp}/c.json",
        "{tmp}/c.json: it is a text file",
        "6",
        files={"c.json": '{"model": 1}\n'},
    ),
    "evaluate: binary checkpoint": M(
        "evaluate --checkpoint {tmp}/b.pt", "{tmp}/b.pt", "6", files={"b.pt": BINARY}
    ),
    "evaluate: empty run id": M("evaluate --run-id=", "--run-id", "1"),
    "evaluate: run id, no store": M("evaluate --run-id abc", "{tmp}/mlflow.db", "3"),
    "evaluate: run id, store is an Optuna database": M(
        "evaluate --run-id abc",
        "{tmp}/o.db is an SQLite database but not an MLflow store",
        "3",
        files={"o.db": OPTUNA_DB},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/o.db"},
    ),
    "evaluate: run id, HTTP store not MLflow": M(
        "evaluate --run-id abc",
        "http://127.0.0.1:{web} is not an MLflow tracking server",
        "2",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{web}"},
    ),
    "evaluate: unknown dataset": M(
        "evaluate --checkpoint {tmp}/nosuch.pt --dataset nosuch", "'nosuch'", "value"
    ),
    "evaluate: unknown split": M("evaluate --checkpoint {tmp}/x.pt --split nosuch", "'nosuch'", "args"),
    "evaluate: checkpoint and run id": M("evaluate --checkpoint x.pt --run-id y", "--run-id", "args"),
    "evaluate: neither": M("evaluate", "--checkpoint", "args"),
    "evaluate: missing data root": M(
        "evaluate --checkpoint {tmp}/nosuch.pt --data-root {tmp}/nodir", "{tmp}/nodir", "1"
    ),
    # ----------------------------------------------------------------- predict
    "predict: missing input": M(f"{PRED} {{tmp}}/nosuch.txt", "{tmp}/nosuch.txt", "1"),
    "predict: input a folder": M(f"{PRED} {{tmp}}/adir", "{tmp}/adir", "1", files=DIR),
    "predict: binary input": M(f"{PRED} {{tmp}}/bin.txt", "{tmp}/bin.txt", "1", files={"bin.txt": BINARY}),
    "predict: GBK input": M(
        f"{PRED} {{tmp}}/gbk.txt", "{tmp}/gbk.txt", "own", files={"gbk.txt": TEXT.encode("gbk")}
    ),
    "predict: output folder missing": M(
        f"{PRED} {{tmp}}/in.txt -o {{tmp}}/nodir/p.jsonl", "{tmp}/nodir", "1", files=TEXTS
    ),
    "predict: output a folder": M(
        f"{PRED} {{tmp}}/in.txt -o {{tmp}}/adir", "{tmp}/adir", "1", files={**TEXTS, **DIR}
    ),
    "predict: output under a file": M(
        f"{PRED} {{tmp}}/in.txt -o {{tmp}}/afile/p.jsonl", "{tmp}/afile", "1", files={**TEXTS, **FILE}
    ),
    "predict: missing checkpoint": M(f"{PRED} {{tmp}}/in.txt", "{tmp}/nosuch.pt", "1", files=TEXTS),
    "predict: checkpoint a folder": M(
        "predict --checkpoint {tmp}/adir {tmp}/in.txt", "{tmp}/adir", "1", files={**TEXTS, **DIR}
    ),
    "predict: text checkpoint": M(
        "predict --checkpoint {tmp}/in.txt {tmp}/in.txt", "{tmp}/in.txt: it is a text file", "6", files=TEXTS
    ),
    "predict: empty checkpoint": M(
        "predict --checkpoint {tmp}/e.pt {tmp}/in.txt",
        "{tmp}/e.pt: it is empty",
        "6",
        files={**TEXTS, "e.pt": ""},
    ),
    "predict: unknown format": M(f"{PRED} --format nosuch", "'nosuch'", "args"),
    "predict: no checkpoint": M("predict {tmp}/in.txt", "--checkpoint", "args", files=TEXTS),
    # ----------------------------------------------------------------- bench
    "bench: from-json missing": M("bench --from-json {tmp}/nosuch.json", "{tmp}/nosuch.json", "1"),
    "bench: from-json a folder": M("bench --from-json {tmp}/adir", "{tmp}/adir", "1", files=DIR),
    "bench: from-json invalid": M(
        "bench --from-json {tmp}/b.json", "{tmp}/b.json", "1", files={"b.json": "{not json\n"}
    ),
    "bench: from-json binary": M(
        "bench --from-json {tmp}/b.json", "{tmp}/b.json", "1", files={"b.json": BINARY}
    ),
    "bench: from-json of another kind": M(
        "bench --from-json {tmp}/o.json", "{tmp}/o.json", "1", files={"o.json": '{"runs": []}\n'}
    ),
    "bench: from-json a list": M(
        "bench --from-json {tmp}/l.json", "{tmp}/l.json", "1", files={"l.json": "[1, 2]\n"}
    ),
    "bench: from-json empty": M("bench --from-json {tmp}/e.json", "{tmp}/e.json", "1", files={"e.json": ""}),
    "bench: widths": M("bench --widths foo", "'foo'", "args"),
    "bench: models": M("bench --models foo", "'foo'", "args"),
    "bench: suite": M("bench --suite foo", "'foo'", "args"),
    "bench: lengths": M("bench --lengths 600", "'600'", "args"),
    "bench: sentences": M("bench --sentences 0", "'0'", "args"),
    "bench: batch": M("bench --batch -2", "'-2'", "args"),
    "bench: bad --set": M("bench --widths quick --set model.nosuch=1", "model.nosuch", "value"),
    "bench: page under a file": M(
        "bench --widths quick --page {tmp}/afile/p.md", "{tmp}/afile", "1", files=FILE
    ),
    "bench: page a folder": M("bench --widths quick --page {tmp}/adir", "{tmp}/adir", "1", files=DIR),
    # ----------------------------------------------------------------- pretrain
    "pretrain: no --out": M("pretrain", "--out", "args"),
    "pretrain: out an existing file": M("pretrain --out {tmp}/afile", "{tmp}/afile", "1", files=FILE),
    "pretrain: unknown dataset": M("pretrain --out {tmp}/o --datasets nosuch", "'nosuch'", "4"),
    "pretrain: missing text": M("pretrain --out {tmp}/o --text {tmp}/nosuch.txt", "{tmp}/nosuch.txt", "1"),
    "pretrain: text a folder": M("pretrain --out {tmp}/o --text {tmp}/adir", "{tmp}/adir", "1", files=DIR),
    "pretrain: workdir a file": M(
        "pretrain --out {tmp}/o --workdir {tmp}/afile", "{tmp}/afile", "1", files=FILE
    ),
    "pretrain: missing vectors": M(
        "pretrain --out {tmp}/o --vectors {tmp}/nosuch.vec", "{tmp}/nosuch.vec", "1"
    ),
    "pretrain: missing data root": M("pretrain --out {tmp}/o --data-root {tmp}/nodir", "{tmp}/nodir", "1"),
    "pretrain: negative steps": M("pretrain --out {tmp}/o --steps -1", "--steps", "4"),
    "pretrain: hidden not a number": M("pretrain --out {tmp}/o --hidden abc", "'abc'", "args"),
    "pretrain: bf16": M("pretrain --out {tmp}/o --bf16 maybe", "'maybe'", "args"),
    "pretrain: missing init-from": M(
        "pretrain --out {tmp}/o --vectors none --init-from {tmp}/nodir", "{tmp}/nodir", "1"
    ),
    "pretrain: missing named corpus": M("pretrain --out {tmp}/o --data-root {data} --text xwlb", "xwlb", "1"),
    # ----------------------------------------------------------------- migrate
    "migrate: runs-dir missing": M("migrate --runs-dir {tmp}/nodir", "{tmp}/nodir", "4"),
    "migrate: runs-dir a file": M("migrate --runs-dir {tmp}/afile", "{tmp}/afile", "4", files=FILE),
    "migrate: dry run, no store": M("migrate --dry-run", "{tmp}/mlflow.db", "3"),
    "migrate: no store": M("migrate", "{tmp}/mlflow.db", "3"),
    "migrate: store not SQLite": M(
        "migrate --dry-run",
        "{tmp}/junk.db",
        "3",
        files={"junk.db": JUNK_SQLITE},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/junk.db"},
    ),
    "migrate: store is an Optuna database": M(
        "migrate --dry-run",
        "{tmp}/o.db is an SQLite database but not an MLflow store",
        "3",
        files={"o.db": OPTUNA_DB},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/o.db"},
    ),
    "migrate: HTTP store not MLflow": M(
        "migrate --dry-run",
        "http://127.0.0.1:{web} is not an MLflow tracking server",
        "2",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{web}"},
    ),
    "migrate: data root missing": M("migrate --dry-run --data-root {tmp}/nodir", "{tmp}/nodir", "4"),
    # ----------------------------------------------------------------- reproduce
    "reproduce: unknown table": M("reproduce --only nosuch --dry-run", "nosuch", "value"),
    "reproduce: unknown dataset": M("reproduce --datasets nosuch --dry-run", "nosuch", "value"),
    "reproduce: negative seed": M("reproduce --seeds -1 --dry-run", "-1", "4"),
    "reproduce: seed not a number": M("reproduce --seeds x --dry-run", "'x'", "args"),
    "reproduce: unknown profile": M("reproduce --profile nosuch", "'nosuch'", "args"),
    "reproduce: jobs 0": M("reproduce --jobs 0", "'0'", "args"),
    "reproduce: worker 5/2": M("reproduce --worker 5/2", "'5/2'", "args"),
    "reproduce: worker x": M("reproduce --worker x", "'x'", "args"),
    "reproduce: config missing": M(f"{REPRO} --config {{tmp}}/nosuch.toml", "{tmp}/nosuch.toml", "1"),
    "reproduce: config a folder": M(f"{REPRO} --config {{tmp}}/adir", "{tmp}/adir", "1", files=DIR),
    "reproduce: config binary": M(
        f"{REPRO} --config {{tmp}}/b.toml", "{tmp}/b.toml", "1", files={"b.toml": BINARY}
    ),
    "reproduce: config not TOML": M(
        f"{REPRO} --config {{tmp}}/b.toml", "{tmp}/b.toml", "value", files={"b.toml": "[[x\n"}
    ),
    "reproduce: epochs 1e30": M(f"{REPRO} --set train.epochs=1e30", "train.epochs", "4"),
    "reproduce: bad --set": M(f"{REPRO} --set model.nosuch=1", "model.nosuch", "value"),
    "reproduce: selection matches nothing": M(
        "reproduce --only table3 --datasets weibo --dry-run", "matches no cell", "own"
    ),
    "reproduce: gpus with dask": M("reproduce --gpus 0 --executor dask", "--gpus", "value"),
    "reproduce: worker with dask": M("reproduce --executor dask --worker 0/2", "--worker", "value"),
    "reproduce: Dask scheduler down": M(
        f"{DASK} --address tcp://127.0.0.1:{{closed}}", "127.0.0.1:{closed}", "2", status=1
    ),
    "reproduce: Dask address of another service": M(
        f"{DASK} --address tcp://127.0.0.1:{{silent}}",
        "tcp://127.0.0.1:{silent} is not a Dask scheduler",
        "2",
    ),
    "reproduce: Dask address a bare word": M(
        f"{DASK} --address nonsense", "tcp://nonsense names no port", "2"
    ),
    "reproduce: Dask scheduler file missing": M(
        f"{DASK} --address {{tmp}}/nosuch.json", "--address {tmp}/nosuch.json: cannot read", "2"
    ),
    "reproduce: unknown executor": M("reproduce --executor nosuch", "'nosuch'", "args"),
    "reproduce: address without the dask executor": M(
        f"{REPRO} --address tcp://127.0.0.1:8786", "add --executor dask", "own"
    ),
    "reproduce: runs-dir a file": M(
        "reproduce --only table3 --datasets resume --models crener --seeds 0 --profile smoke --no-report "
        "--data-root {data} --runs-dir {tmp}/afile",
        "{tmp}/afile",
        "1",
        files=FILE,
    ),
    # ----------------------------------------------------------------- tune
    "tune: unknown dataset": M("tune --dataset nosuch --trials 1", "unknown dataset 'nosuch'", "value"),
    "tune: trials 0": M("tune --dataset resume --trials 0", "'0'", "args"),
    "tune: no trials": M("tune --dataset resume", "--trials", "args"),
    "tune: timeout -5": M("tune --dataset resume --trials 1 --timeout -5", "'-5'", "args"),
    "tune: seed -1": M("tune --dataset resume --trials 1 --seed -1", "'-1'", "args"),
    "tune: unknown profile": M("tune --dataset resume --trials 1 --profile nosuch", "'nosuch'", "args"),
    "tune: storage scheme": M(f"{TUNE} --storage nosuch://x", "nosuch://x", "value"),
    "tune: storage in a missing folder": M(
        f"{TUNE} --storage sqlite:///{{tmp}}/nodir/o.db", "{tmp}/nodir", "1"
    ),
    "tune: storage not SQLite": M(
        f"{TUNE} --storage sqlite:///{{tmp}}/junk.db", "{tmp}/junk.db", "3", files={"junk.db": JUNK_SQLITE}
    ),
    "tune: storage is an MLflow database": M(
        f"{TUNE} --storage sqlite:///{{tmp}}/m.db",
        "{tmp}/m.db is an SQLite database but not an Optuna storage",
        "3",
        files={"m.db": MLFLOW_DB},
    ),
    "tune: storage a folder": M(f"{TUNE} --storage sqlite:///{{tmp}}/adir", "{tmp}/adir", "1", files=DIR),
    "tune: storage PostgreSQL down": M(f"{TUNE} --storage {PG_CLOSED}", PG_CLOSED, "2", status=1),
    "tune: storage PostgreSQL where another service listens": M(
        f"{TUNE} --storage {PG_SILENT}", f"{PG_SILENT_SHOWN} is not a PostgreSQL server", "2"
    ),
    "tune: storage PostgreSQL where a web server listens": M(
        f"{TUNE} --storage {PG_WEB}", "not a PostgreSQL server", "2"
    ),
    "tune: storage mysql without its driver": M(f"{TUNE} --storage {MYSQL}", "mysql:// needs the", "2"),
    "tune: storage a bare word": M(f"{TUNE} --storage nonsense", "'nonsense'", "2"),
    "tune: Dask scheduler down": M(
        f"{TUNE} --executor dask --address tcp://127.0.0.1:{{closed}}", "127.0.0.1:{closed}", "2", status=1
    ),
    "tune: Dask address a web server": M(
        f"{TUNE} --executor dask --address 127.0.0.1:{{web}}",
        "tcp://127.0.0.1:{web} is not a Dask scheduler",
        "2",
    ),
    "tune: address without the dask executor": M(
        f"{TUNE} --address tcp://127.0.0.1:8786", "add --executor dask", "own"
    ),
    "tune: epochs 1e30": M(f"{TUNE} --set train.epochs=1e30", "train.epochs", "4"),
    "tune: bad --set": M(f"{TUNE} --set model.nosuch=1", "model.nosuch", "value"),
    "tune: export folder missing": M(f"{TUNE} --export {{tmp}}/nodir/best.toml", "{tmp}/nodir", "1"),
    "tune: export a folder": M(f"{TUNE} --export {{tmp}}/adir", "{tmp}/adir", "1", files=DIR),
    "tune: export under a file": M(
        f"{TUNE} --export {{tmp}}/afile/best.toml", "{tmp}/afile", "1", files=FILE
    ),
    "tune: runs-dir a file": M(f"{TUNE} --runs-dir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "tune: missing data root": M(
        "tune --dataset resume --profile smoke --trials 1 --data-root {tmp}/nodir", "{tmp}/nodir", "1"
    ),
    "tune: jobs 0": M("tune --dataset resume --trials 1 --jobs 0", "'0'", "args"),
    # ----------------------------------------------------------------- ui
    "ui: port 70000": M("ui --port 70000", "'70000'", "args"),
    "ui: port abc": M("ui --port abc", "'abc'", "args"),
    "ui: unresolvable host": M("ui --host no-such-host.invalid", "no-such-host.invalid", "value"),
    "ui: a server store": M(
        "ui", "http://127.0.0.1:9", "value", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    ),
    "ui: store not SQLite": M(
        "ui",
        "{tmp}/junk.db",
        "3",
        files={"junk.db": JUNK_SQLITE},
        env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/junk.db"},
    ),
    "ui: store a folder": M(
        "ui", "{tmp}/adir", "3", files=DIR, env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/adir"}
    ),
    "ui: bare-word store": M("ui", "nonsense", "3", env={"MLFLOW_TRACKING_URI": "nonsense"}),
    "ui: store in a missing folder": M(
        "ui", "{tmp}/nodir", "3", env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/nodir/m.db"}
    ),
    "ui: PostgreSQL store down": M("ui", PG_CLOSED, "2", status=1, env={"MLFLOW_TRACKING_URI": PG_CLOSED}),
    "ui: PostgreSQL store where another service listens": M(
        "ui", f"{PG_SILENT_SHOWN} is not a PostgreSQL server", "2", env={"MLFLOW_TRACKING_URI": PG_SILENT}
    ),
    "ui: garbage store address": M(
        "ui", "127.0.0.1:port", "2", env={"MLFLOW_TRACKING_URI": "postgresql://u@127.0.0.1:port/db"}
    ),
    "ui: mysql store without its driver": M(
        "ui", "mysql:// needs the", "2", env={"MLFLOW_TRACKING_URI": MYSQL}
    ),
    # ----------------------------------------------------------------- curves
    "curves: unknown dataset": M("curves --dataset nosuch", "'nosuch'", "4"),
    "curves: unknown model": M("curves --dataset resume --model nosuch", "'nosuch'", "4"),
    "curves: unknown profile": M("curves --dataset resume --profile nosuch", "'nosuch'", "4"),
    "curves: negative seed": M(f"{CURVES} --seed -1", "'-1'", "4"),
    "curves: every 0": M(f"{CURVES} --every 0", "'0'", "4"),
    "curves: unknown setting": M(f"{CURVES} --settings nosuch", "'nosuch'", "args"),
    "curves: bad --set": M(f"{CURVES} --set model.nosuch=1", "model.nosuch", "4"),
    "curves: epochs 1e30": M(f"{CURVES} --set train.epochs=1e30", "train.epochs", "4"),
    "curves: out a file": M(f"{CURVES} --out {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "curves: out under a file": M(f"{CURVES} --out {{tmp}}/afile/c", "{tmp}/afile", "1", files=FILE),
    "curves: out where nothing may be made": M(
        f"{CURVES} --out /sys/crener-out", "/sys/crener-out", "1", status=1
    ),
    "curves: runs-dir a file": M(f"{CURVES} --runs-dir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    # ----------------------------------------------------------------- encoders
    "encoders: unknown dataset": M("encoders --datasets nosuch", "'nosuch'", "4"),
    "encoders: negative seed": M("encoders --seeds -1", "'-1'", "4"),
    "encoders: seed not a number": M("encoders --seeds x", "'x'", "args"),
    "encoders: unknown profile": M("encoders --profile nosuch", "'nosuch'", "4"),
    "encoders: unknown arm": M("encoders --arms nosuch", "'nosuch'", "args"),
    "encoders: jobs 0": M("encoders --jobs 0", "'0'", "args"),
    "encoders: bad --set": M(f"{ENC} --set model.nosuch=1", "model.nosuch", "4"),
    "encoders: epochs 1e30": M(f"{ENC} --set train.epochs=1e30", "train.epochs", "4"),
    "encoders: build-dir a file": M(f"{ENC} --build-dir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "encoders: build-dir under a file": M(
        f"{ENC} --build-dir {{tmp}}/afile/b", "{tmp}/afile", "1", files=FILE
    ),
    "encoders: runs-dir a file": M(f"{ENC} --runs-dir {{tmp}}/afile", "{tmp}/afile", "1", files=FILE),
    "encoders: missing --encoders folder": M(f"{ENC} --encoders {{tmp}}/nodir", "{tmp}/nodir", "1"),
    "encoders: page a folder": M(f"{ENC} --page {{tmp}}/adir", "{tmp}/adir", "1", files=DIR),
    "encoders: missing data root": M(
        "encoders --datasets resume --seeds 0 --arms random --profile smoke --data-root {tmp}/nodir",
        "{tmp}/nodir",
        "4",
    ),
    # ----------------------------------------------------------------- report
    "report: out a file": M("report --out {tmp}/afile", "{tmp}/afile", "1", files=FILE),
    "report: out where nothing may be made": M(
        "report --out /sys/crener-out", "/sys/crener-out", "1", status=1
    ),
    "report: bootstrap 0": M("report --bootstrap 0", "--bootstrap", "value"),
    "report: bootstrap x": M("report --bootstrap x", "'x'", "args"),
    "report: unknown profile": M("report --profile nosuch", "'nosuch'", "4"),
    "report: seed -1": M("report --seed -1", "'-1'", "4"),
    "report: msra protocol": M("report --msra-protocol nosuch", "'nosuch'", "args"),
    "report: unknown sweep": M("report --sweeps nosuch", "'nosuch'", "4"),
    "report: no sweeps": M("report --sweeps ,", "none given", "own"),
    "report: bare-word store": M("report --tracking-uri nonsense", "nonsense", "3"),
    "report: store in a missing folder": M(
        "report --tracking-uri sqlite:///{tmp}/nodir/m.db", "{tmp}/nodir", "3"
    ),
    "report: store not SQLite": M(
        "report --tracking-uri sqlite:///{tmp}/junk.db", "{tmp}/junk.db", "3", files={"junk.db": JUNK_SQLITE}
    ),
    "report: store is an Optuna database": M(
        "report --tracking-uri sqlite:///{tmp}/o.db",
        "{tmp}/o.db is an SQLite database but not an MLflow store",
        "3",
        files={"o.db": OPTUNA_DB},
    ),
    "report: HTTP store not MLflow": M(
        "report --tracking-uri http://127.0.0.1:{web}",
        "http://127.0.0.1:{web} is not an MLflow tracking server",
        "2",
    ),
    "report: Optuna storage where another service listens": M(
        f"report --optuna-storage {PG_SILENT}", f"{PG_SILENT_SHOWN} is not a PostgreSQL server", "2"
    ),
    "report: missing data root": M("report --data-root {tmp}/nodir", "{tmp}/nodir", "4"),
    "report: time to accuracy without a page": M("report --time-to-accuracy", "--page FILE", "own"),
    "report: time to accuracy and a claim": M(
        "report --time-to-accuracy --claim weibo --page {tmp}/p.md", "--claim", "own"
    ),
    # ----------------------------------------------------------------- --time-budget (issue 35)
    "reproduce: time budget 0": M(f"{REPRO} --time-budget 0", "--time-budget 0", "4"),
    "reproduce: time budget on a remote cluster": M(
        "reproduce --executor dask --address tcp://127.0.0.1:9 --time-budget 5", "--time-budget", "value"
    ),
    "tune: time budget -1": M(f"{TUNE} --time-budget -1", "--time-budget -1", "4"),
}


def _tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``root``: (is a folder, size, modification time)."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(root))] = (path.is_dir(), 0 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def _make(root: Path, files: dict[str, str | bytes | None]) -> None:
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


@functools.cache
def servers() -> dict[str, str]:
    """The ports of class 2's servers, started once for the test process."""
    return {"silent": str(silent_server()), "web": str(web_server()), "closed": str(closed_port())}


def row_values(root: Path, data: Path) -> dict[str, str]:
    """What a row's {placeholders} stand for."""
    return {"tmp": str(root), "data": str(data), **servers()}


def run_mistake(mistake: Mistake, root: Path, data: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``crener ARGV`` in ``root`` (its own store, runs and outputs there); (result, seconds)."""
    fmt = row_values(root, data)
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(CODE),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "CRENER_RUNS": str(root / "runs"),
        "CRENER_DATA": str(data), "PYTHONWARNINGS": "ignore",
    }  # fmt: skip
    env.pop("CRENER_DEBUG", None)  # a row asks for the traceback itself (test_debug_adds_the_traceback)
    env.update({k: v.format(**fmt) for k, v in mistake.env.items()})
    argv = [a.format(**fmt) for a in mistake.argv]
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "crener", *argv], cwd=root, env=env, capture_output=True, text=True,
        timeout=HANG_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return res, time.monotonic() - t0


def first_of_each_kind() -> set[str]:
    """The first row of each (subcommand, class): the fast suite's share of the table. Each row is
    a subprocess of a second or more, so the whole table runs with the slow suite."""
    seen: set[tuple[str, str]] = set()
    fast = set()
    for name, mistake in MISTAKES.items():
        key = (mistake.argv[0] if mistake.argv else "", mistake.kind)
        if key not in seen:
            seen.add(key)
            fast.add(name)
    return fast


FAST_ROWS = first_of_each_kind()


@pytest.mark.parametrize(
    "name", [n if n in FAST_ROWS else pytest.param(n, marks=pytest.mark.slow) for n in MISTAKES]
)
def test_a_mistake_is_one_line_and_touches_nothing(name: str, tmp_path: Path, tiny_data: Path) -> None:
    mistake = MISTAKES[name]
    root = tmp_path / "cwd"
    root.mkdir()
    _make(root, mistake.files)
    before = _tree(root)
    res, seconds = run_mistake(mistake, root, tiny_data)
    err = res.stderr.strip()
    lines = err.splitlines()
    says = mistake.says.format(**row_values(root, tiny_data))
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert says in lines[0], lines[0]
    assert res.returncode == mistake.status, (res.returncode, err)
    assert seconds < BOUND_S, seconds
    assert _tree(root) == before, "the mistake created or changed files"


def test_the_table_covers_every_subcommand() -> None:
    from crener.cli import COMMANDS_GROUP
    from crener.registry import plugins

    covered = {m.argv[0] for m in MISTAKES.values() if m.argv}
    assert set(plugins(COMMANDS_GROUP)) <= covered
    assert len(MISTAKES) >= 100


# --------------------------------------------------------------------------- messages (class 6)


def test_no_network_is_not_called_downloads_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from crener import encoder
    from crener.errors import CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(encoder, "_hub_reachable", lambda: False)
    with pytest.raises(CheckpointError) as info:
        encoder.load_pretrained("nosuch-owner/nosuch-model")
    assert "could not be downloaded" in str(info.value) and "cannot be reached" in str(info.value)
    assert "downloads are off" not in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="downloads are off"):
        encoder.load_pretrained("nosuch-owner/nosuch-model")


def test_a_cut_checkpoint_says_so(tmp_path: Path) -> None:
    import torch

    from crener.checkpoint import load_checkpoint
    from crener.errors import CheckpointError

    whole = tmp_path / "whole.pt"
    torch.save({"version": 1, "model": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut short or damaged"):
        load_checkpoint(cut)


# --------------------------------------------------------------------------- the boundary itself


def test_debug_adds_the_traceback(tmp_path: Path, tiny_data: Path) -> None:
    mistake = MISTAKES["predict: input a folder"]
    root = tmp_path / "cwd"
    root.mkdir()
    _make(root, mistake.files)
    debug = Mistake(
        mistake.argv, mistake.says, mistake.kind, mistake.status, mistake.files, {"CRENER_DEBUG": "1"}
    )
    res, _ = run_mistake(debug, root, tiny_data)
    assert res.returncode == mistake.status and "Traceback" in res.stderr
    assert "is a folder" in res.stderr


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only expected failures become one line: a programming error is not caught by the boundary."""
    import errno as errno_mod

    from crener import cli

    def buggy(args) -> int:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr("crener.data.commands.cmd_stats", buggy)  # registered when the parser is built
    with pytest.raises(TypeError):
        cli.main(["data", "stats", "resume"])
    assert cli.explain(ValueError("x")) is None and cli.explain(KeyError("x")) is None
    assert cli.explain(OSError(errno_mod.EBADF, "Bad file descriptor")) is None  # no path: a bug
    status, message = cli.explain(OSError(errno_mod.ENOSPC, "No space left on device", "/x/last.pt"))
    assert status == cli.EXIT_ENVIRONMENT and message.startswith("/x/last.pt: no space left")
    assert cli.explain(IsADirectoryError(errno_mod.EISDIR, "Is a directory", "/x"))[0] == cli.EXIT_USAGE
