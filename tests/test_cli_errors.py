"""Bad input across the whole command line: every user mistake ends in one message that
says what to change, a non-zero exit status, and no Python traceback; nothing hangs.

Most probes run the CLI in this process (``crener.cli.main``); a closed output pipe and one
end-to-end ``--set`` mistake run it as a subprocess. One tiny smoke fit (6 sentences, 1 epoch)
makes the checkpoint the predict and evaluate probes need.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crener.cli import main
from crener.config import MAX_LEN
from crener.errors import ConfigError, CrenerError
from crener.profiles import build_run_config

REPO = Path(__file__).resolve().parents[1]
FAST_S = 30  # a wrong store must fail within seconds, not after MLflow's minutes of retries


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every probe gets its own MLflow store path and runs folder under ``tmp_path``; the store
    file is not created here, so a probe that never opens it leaves it absent."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("CRENER_RUNS", str(tmp_path / "runs"))
    return db


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory) -> Path:
    """The one training run of this file: test is scored on a 3-of-6 sample (data.test_limit)."""
    from crener.train import fit

    cfg = build_run_config(profile="smoke", overrides={
        "runtime.data_root": str(tiny_data), "data.train_limit": 0, "data.eval_limit": 0, "data.test_limit": 3,
        "train.epochs": 1, "train.max_cells": 400, "runtime.progress": False,
    })  # fmt: skip
    work = tmp_path_factory.mktemp("run")
    fit(cfg, work)
    return work / "checkpoints" / "best.pt"


def _run(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """``crener ARGV`` in this process: (exit status, everything it printed and logged)."""
    caplog.clear()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out + out.err + caplog.text


def _assert_refused(rc: int, text: str, message: str, status: int = 2) -> None:
    assert rc == status, text
    assert message in text, text
    assert "Traceback" not in text, text


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- --set and the config

TRAIN = ["train", "--dataset", "resume", "--profile", "smoke", "--no-track"]

CONFIG_MISTAKES = {
    "unknown key": (
        ["--set", "model.hiden=64"],
        "unknown config key 'model.hiden'; did you mean model.hidden?",
    ),
    "unknown section": (["--set", "modle.hidden=64"], "unknown config key 'modle.hidden'"),
    "not an integer": (["--set", "model.hidden=abc"], "model.hidden: expected an integer, got 'abc'"),
    "not a number": (["--set", "train.lr=fast"], "train.lr: expected a number, got 'fast'"),
    "not a boolean": (["--set", "model.use_biaffine=maybe"], "model.use_biaffine: expected a boolean"),
    "not integers": (
        ["--set", "model.dilations=1,x"],
        "model.dilations: expected integers separated by commas",
    ),
    "no =": (["--set", "model.hidden"], "--set expects KEY=VALUE"),
    "no key": (["--set", "=3"], "--set expects KEY=VALUE"),
    "zero epochs": (["--set", "train.epochs=0"], "train.epochs=0: must be >= 1"),
    "no predictor": (
        ["--set", "model.use_biaffine=false", "--set", "model.use_grid_mlp=false"],
        "model.use_biaffine and model.use_grid_mlp cannot both be false",
    ),
    "negative width": (["--set", "model.hidden=-8"], "model.hidden=-8: must be a positive integer"),
    "zero heads": (["--set", "model.tf_heads=0"], "model.tf_heads=0: must be a positive integer"),
    "not divisible": (["--set", "model.hidden=30"], "model.hidden=30 is not divisible by model.tf_heads=4"),
    "dropout 1": (["--set", "model.out_dropout=1"], "model.out_dropout=1.0: a dropout must be in [0, 1)"),
    "max_len above the encoder": (
        ["--set", "data.max_len=600"],
        f"data.max_len=600: must be between 8 and {MAX_LEN}",
    ),
    "negative limit": (["--set", "data.test_limit=-1"], "data.test_limit=-1: must be >= 0"),
    "negative seed": (["--set", "train.seed=-3"], "train.seed=-3: a seed must be >= 0"),
    "device": (["--set", "runtime.device=gpu"], "runtime.device='gpu' is not one of auto, cpu, cuda"),
    "zero lr": (["--set", "train.lr=0"], "train.lr=0.0 must be > 0"),
    "bad choice": (
        ["--set", "model.context=lstm"],
        "model.context='lstm' is not one of transformer, none, bilstm",
    ),
}


@pytest.mark.parametrize("extra,message", CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_config_mistakes_are_one_message(extra, message, tmp_path, capsys, caplog) -> None:
    rc, text = _run([*TRAIN, "--workdir", str(tmp_path / "w"), *extra], capsys, caplog)
    _assert_refused(rc, text, message)
    assert not (tmp_path / "w").exists()  # refused before anything was made


def test_a_set_mistake_prints_no_traceback_end_to_end(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "crener.cli", *TRAIN, "--set", "model.hidden=abc"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    _assert_refused(res.returncode, res.stdout + res.stderr, "model.hidden: expected an integer, got 'abc'")
    assert len((res.stdout + res.stderr).strip().splitlines()) == 1  # one message


def test_config_error_is_still_a_key_and_value_error() -> None:
    for bad in (
        {"variant": "nosuch"},
        {"overrides": {"model.nosuch": 1}},
        {"overrides": {"train.epochs": 0}},
    ):
        with pytest.raises(ConfigError) as info:
            build_run_config(**bad)
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert isinstance(info.value, CrenerError)
        assert not str(info.value).startswith(("'", '"'))  # no KeyError quoting


def test_max_len_limit_is_the_encoders() -> None:
    from crener.encoder import MAX_POSITIONS

    assert MAX_LEN == MAX_POSITIONS - 2
    assert build_run_config(overrides={"data.max_len": MAX_LEN}).data.max_len == MAX_LEN


# --------------------------------------------------------------------------- argparse-level mistakes

ARG_MISTAKES = {
    "train seed -1": (["train", "--dataset", "resume", "--seed", "-1"], "expected an integer >= 0, got '-1'"),
    "train seed x": (["train", "--dataset", "resume", "--seed", "x"], "expected an integer >= 0"),
    "tune timeout -5": (
        ["tune", "--dataset", "resume", "--trials", "1", "--timeout", "-5"],
        "expected a positive number of seconds, got '-5'",
    ),
    "tune trials 0": (
        ["tune", "--dataset", "resume", "--trials", "0"],
        "expected a positive integer, got '0'",
    ),
    "tune seed -1": (
        ["tune", "--dataset", "resume", "--trials", "1", "--seed", "-1"],
        "expected an integer >= 0",
    ),
    "bench widths": (["bench", "--widths", "foo"], "argument --widths: invalid choice: 'foo'"),
    "bench models": (["bench", "--models", "foo"], "argument --models: invalid choice: 'foo'"),
    "bench variants": (["bench", "--variants", "foo"], "argument --variants: invalid choice: 'foo'"),
    "bench lengths": (["bench", "--lengths", "600"], f"expected an integer between 4 and {MAX_LEN}"),
    "bench sentences": (["bench", "--sentences", "0"], "expected an integer >= 1"),
    "ui port": (["ui", "--port", "70000"], "expected a port number from 1 to 65535"),
}


@pytest.mark.parametrize("argv,message", ARG_MISTAKES.values(), ids=ARG_MISTAKES.keys())
def test_argument_mistakes_exit_2_with_usage(argv, message, capsys, caplog) -> None:
    rc, text = _run(argv, capsys, caplog)
    _assert_refused(rc, text, message)
    assert "usage: crener" in text


def test_bench_widths_match_the_presets() -> None:
    from crener.commands import BENCH_WIDTHS
    from crener.tools.workload import WIDTHS

    assert set(BENCH_WIDTHS) == set(WIDTHS)


def test_bench_error_rows_fail_the_command(monkeypatch, capsys, caplog) -> None:
    from crener.tools import bench

    monkeypatch.setattr(bench, "_memory_point", lambda *a, **k: {"length": 32, "error": "killed by signal 9"})
    argv = [
        "bench",
        "--suite",
        "memory",
        "--widths",
        "quick",
        "--models",
        "w2ner",
        "--lengths",
        "32",
        "--json",
    ]
    rc, text = _run(argv, capsys, caplog)
    _assert_refused(rc, text, "1 measurement(s) failed", status=1)
    rc, text = _run([*argv, "--set", "model.nosuch=1"], capsys, caplog)
    _assert_refused(rc, text, "unknown config key 'model.nosuch'")


# --------------------------------------------------------------------------- datasets


def test_unknown_dataset_in_train_makes_no_run(store, capsys, caplog) -> None:
    rc, text = _run(["train", "--dataset", "nosuch", "--profile", "smoke"], capsys, caplog)
    _assert_refused(rc, text, "unknown dataset 'nosuch'; known:")
    assert not store.exists()  # no MLflow run, not even a store, was made


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "missing.pt", "--dataset", "nosuch"],
        ["tune", "--dataset", "nosuch", "--trials", "1"],
    ],
    ids=["evaluate", "tune"],
)
def test_unknown_dataset_elsewhere(argv, capsys, caplog) -> None:
    rc, text = _run(argv, capsys, caplog)
    _assert_refused(rc, text, "unknown dataset 'nosuch'")


# --------------------------------------------------------------------------- tracking stores


def _stores(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "junk.db").write_text("not a database\n" * 100)
    return {
        "missing folder": (f"sqlite:///{tmp_path / 'nodir' / 'x.db'}", "does not exist"),
        "not a database": (f"sqlite:///{tmp_path / 'junk.db'}", "is not an SQLite database"),
        "a folder": (f"sqlite:///{tmp_path}", "is a folder, not a database file"),
        "nobody listening": (
            f"http://127.0.0.1:{_free_port()}",
            "cannot reach the MLflow store http://127.0.0.1:",
        ),
        # No file can be made there, even by root (MLflow would retry it for minutes).
        "folder takes no files": ("sqlite:////proc/crener-x.db", "cannot create files in /proc"),
    }


@pytest.mark.parametrize(
    "which", ["missing folder", "not a database", "a folder", "nobody listening", "folder takes no files"]
)
def test_an_unusable_store_fails_fast(which, tiny_data, tmp_path, monkeypatch, capsys, caplog) -> None:
    if which == "folder takes no files" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    uri, message = _stores(tmp_path)[which]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CRENER_RUNS", str(tmp_path / "runs"))
    t0 = time.monotonic()
    rc, text = _run(["train", "--dataset", "resume", "--profile", "smoke", "--data-root", str(tiny_data)],
                    capsys, caplog)  # fmt: skip
    # A server that is down is the environment (exit 1); a store named wrongly, the command (2).
    _assert_refused(rc, text, message, status=1 if which == "nobody listening" else 2)
    assert time.monotonic() - t0 < FAST_S
    assert not (tmp_path / "nodir").exists()


def test_evaluate_run_id_on_an_unreachable_server(monkeypatch, capsys, caplog) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    rc, text = _run(["evaluate", "--run-id", "abc"], capsys, caplog)
    _assert_refused(rc, text, "cannot reach the MLflow store", status=1)


def _tune_argv(data_root) -> list[str]:
    """One smoke trial of ``crener tune`` on ``data_root``."""
    return [
        "tune",
        "--dataset",
        "resume",
        "--profile",
        "smoke",
        "--trials",
        "1",
        "--data-root",
        str(data_root),
    ]


def test_tune_refuses_a_bad_storage_url(tiny_data, tmp_path, capsys, caplog) -> None:
    argv = _tune_argv(tiny_data)
    rc, text = _run([*argv, "--storage", "nosuch://x"], capsys, caplog)
    _assert_refused(rc, text, "cannot open the Optuna storage 'nosuch://x'")
    rc, text = _run([*argv, "--storage", f"sqlite:///{tmp_path / 'nodir' / 'o.db'}"], capsys, caplog)
    _assert_refused(rc, text, "does not exist")


def test_tune_checks_the_mlflow_store_before_creating_its_study(
    tiny_data, tmp_path, monkeypatch, capsys, caplog
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    db = tmp_path / "optuna.db"
    argv = _tune_argv(tiny_data)
    rc, text = _run([*argv, "--storage", f"sqlite:///{db}"], capsys, caplog)
    _assert_refused(rc, text, "cannot reach the MLflow store", status=1)
    assert not db.exists()  # no study (nor its database) left behind with no trial in it


# --------------------------------------------------------------------------- predict and evaluate


def test_predict_output_folder_must_exist(tmp_path, capsys, caplog) -> None:
    text_in = tmp_path / "in.txt"
    text_in.write_text("张三在北京工作\n", encoding="utf-8")
    out = tmp_path / "nodir" / "x.jsonl"
    rc, text = _run(["predict", "--checkpoint", "missing.pt", str(text_in), "-o", str(out)], capsys, caplog)
    _assert_refused(rc, text, f"folder {out.parent} does not exist")
    rc, text = _run(
        ["predict", "--checkpoint", "missing.pt", str(text_in), "-o", str(tmp_path)], capsys, caplog
    )
    _assert_refused(rc, text, "is a folder")


def test_predict_refuses_a_terminal_as_input(monkeypatch, capsys, caplog) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

        def read(self, *args):  # pragma: no cover - reading would wait for typed text
            raise AssertionError("read a terminal")

    monkeypatch.setattr(sys, "stdin", Terminal())
    rc, text = _run(["predict", "--checkpoint", "missing.pt"], capsys, caplog)
    _assert_refused(rc, text, "no input: pass a text or CoNLL file")
    assert "pipe text in" in text


def test_text_that_looks_like_conll_gets_the_format_hint(tmp_path, monkeypatch, capsys, caplog) -> None:
    import io

    looks = tmp_path / "pairs.txt"
    looks.write_text("张 三\n李 四\n", encoding="utf-8")  # two columns, one character first
    rc, text = _run(["predict", "--checkpoint", "missing.pt", str(looks)], capsys, caplog)
    _assert_refused(rc, text, "pass --format text")
    monkeypatch.setattr(sys, "stdin", io.StringIO("张 三\n李 四\n"))
    rc, text = _run(["predict", "--checkpoint", "missing.pt"], capsys, caplog)
    _assert_refused(rc, text, "CoNLL input must be a file, not stdin; if it is plain text")


def test_conll_read_by_guess_is_said(checkpoint, tmp_path, capsys, caplog) -> None:
    conll = tmp_path / "tagged.txt"
    conll.write_text("张 B-NAME\n三 E-NAME\n\n北 O\n京 O\n", encoding="utf-8")
    caplog.set_level(logging.WARNING)
    rc, text = _run(["predict", "--checkpoint", str(checkpoint), str(conll)], capsys, caplog)
    assert rc == 0 and "looks like CoNLL" in text and "--format text" in text
    rc, _ = _run(["predict", "--checkpoint", str(checkpoint), "--format", "text", str(conll)], capsys, caplog)
    assert rc == 0


def test_predict_into_a_closed_pipe(checkpoint, tmp_path) -> None:
    text_in = tmp_path / "in.txt"
    text_in.write_text("张三在北京工作\n" * 50, encoding="utf-8")
    cmd = [sys.executable, "-m", "crener.cli", "predict", "--checkpoint", str(checkpoint), str(text_in)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the first line is written (like `| head` done)
    try:
        err = proc.stderr.read().decode("utf-8", "replace")
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
    _assert_refused(rc, err, "broken pipe", status=141)


def test_evaluate_says_how_many_sentences_and_whether_a_sample(checkpoint, capsys) -> None:
    results = {}
    for name, extra in {"test": (), "dev": ("--split", "dev"), "whole": ("--whole-split",)}.items():
        assert main(["evaluate", "--checkpoint", str(checkpoint), *extra]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: results["test"][k] for k in ("sentences", "split_sentences", "sample")} == {
        "sentences": 3, "split_sentences": 6, "sample": True,
    }  # fmt: skip
    assert {k: results["dev"][k] for k in ("sentences", "split_sentences", "sample")} == {
        "sentences": 6, "split_sentences": 6, "sample": False,
    }  # fmt: skip
    assert results["whole"]["sentences"] == 6 and results["whole"]["sample"] is False
    assert results["test"]["split"] == "test" and results["dev"]["split"] == "dev"


# --------------------------------------------------------------------------- ui


def test_ui_refuses_a_taken_port(monkeypatch, capsys, caplog) -> None:
    from experiments import commands

    monkeypatch.setattr(commands.os, "execv", lambda *a: pytest.fail(f"started mlflow: {a}"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, text = _run(["ui", "--port", str(port)], capsys, caplog)
    _assert_refused(rc, text, f"cannot serve on 127.0.0.1:{port}")
    assert "--port N" in text


def test_ui_passes_allowed_hosts_to_mlflow(monkeypatch, capsys, caplog) -> None:
    from experiments import commands

    started = []

    def execv(path, cmd):
        started.append(cmd)
        raise SystemExit(0)

    monkeypatch.setattr(commands.os, "execv", execv)
    caplog.set_level(logging.WARNING)
    port = _free_port()
    rc, text = _run(["ui", "--host", "0.0.0.0", "--port", str(port)], capsys, caplog)
    assert rc == 0 and "pass --allowed-hosts" in text
    rc, text = _run(["ui", "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts", "ner.example.org"],
                    capsys, caplog)  # fmt: skip
    assert rc == 0 and "pass --allowed-hosts" not in text
    cmd = started[-1]
    assert cmd[cmd.index("--allowed-hosts") + 1] == "ner.example.org"
    assert "--allowed-hosts" not in started[0]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_predict_onto_a_full_device(checkpoint, tmp_path) -> None:
    """Issue 37: standard output on a full device is one line (exit 1, the environment), not a
    traceback followed by Python's own complaint at exit."""
    text_in = tmp_path / "in.txt"
    text_in.write_text("张三在北京工作\n" * 50, encoding="utf-8")
    cmd = [sys.executable, "-m", "crener.cli", "predict", "--checkpoint", str(checkpoint), str(text_in)]
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            cmd, stdout=full, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path, timeout=120
        )
    _assert_refused(res.returncode, res.stderr, "standard output: no space left on the device", status=1)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_takes_the_interrupt_path_and_the_handler_is_restored(monkeypatch, capsys, caplog) -> None:
    import signal

    from crener import cli

    before = signal.getsignal(signal.SIGTERM)
    real_parser = cli.build_parser

    def killed(args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; reaching the end means SIGTERM was not seen
        return 0

    def parser_whose_command_is_killed(first):
        parser = real_parser(first)
        parse = parser.parse_args
        parser.parse_args = lambda argv: setattr(ns := parse(argv), "func", killed) or ns
        return parser

    monkeypatch.setattr(cli, "build_parser", parser_whose_command_is_killed)
    t0 = time.monotonic()
    rc, text = _run(["data", "stats", "resume"], capsys, caplog)
    assert rc == cli.EXIT_TERMINATED == 143 and time.monotonic() - t0 < 4  # raised at once, not slept out
    assert "terminated (SIGTERM)" in text and "Traceback" not in text
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(cli.Terminated, KeyboardInterrupt)  # every Ctrl-C path (KILLED runs, workers) applies


@pytest.mark.slow  # a real training process, started and killed (about 40 s)
def test_a_run_killed_with_sigterm_is_marked_killed_and_resumable(tiny_data, mlflow_store, tmp_path) -> None:
    """``kill``/``timeout``/preemption used to end the process with the run left RUNNING."""
    import signal

    import mlflow

    cmd = [sys.executable, "-m", "crener.cli", "train", "--dataset", "resume", "--profile", "smoke",
           "--data-root", str(tiny_data), "--set", "train.epochs=400",
           "--set", "data.train_limit=0", "--set", "data.eval_limit=0", "--set", "train.max_cells=400"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    client = mlflow.MlflowClient(mlflow_store)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the run has logged an epoch
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
            if runs and client.get_metric_history(runs[0].info.run_id, "dev/f1"):
                break
            time.sleep(0.5)
        else:  # pragma: no cover
            pytest.fail("the run never logged an epoch")
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode("utf-8", "replace")
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    assert any((tmp_path / "runs").rglob("last.pt"))  # resumable state kept
