"""experiments.tune: search spaces, nested MLflow runs, pruning, export, shared studies."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import optuna
import pytest

from crener import registry
from crener.errors import CrenerError
from crener.identity import run_key
from crener.profiles import PROFILES, VARIANTS, build_run_config
from crener.tracking import Tracker
from experiments.sweeps import load_overrides, plan
from experiments.tune import (
    TrialCallback,
    default_params,
    default_study_name,
    export_best,
    search_space,
    tune,
)
from tests.helpers import fake_cli

REPO = Path(__file__).resolve().parents[1]
STUDY = default_study_name("crener", "full", "resume", "smoke")


@pytest.mark.parametrize("model", registry.names())
@pytest.mark.parametrize("profile", list(PROFILES))
def test_search_spaces_give_valid_configs(model: str, profile: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    variants = list(VARIANTS) if model == "crener" else ["full"]
    for i in range(6):
        variant = variants[i % len(variants)]
        base = build_run_config(model=model, variant=variant, profile=profile, dataset="resume")
        trial = study.ask()
        values = search_space(model)(trial, base)
        assert values and set(values) == set(trial.params)  # Optuna names are config keys
        cfg = base.with_overrides(values)  # raises if a sampled width breaks a constraint
        assert cfg.variant == variant and cfg.profile == profile
        study.tell(trial, 0.5)


@pytest.mark.parametrize("model", registry.names())
@pytest.mark.parametrize("profile", list(PROFILES))
def test_default_params_lie_inside_the_space(model: str, profile: str) -> None:
    # Trial 0 of every study replays the profile's defaults: they must be points of the space.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = build_run_config(model=model, profile=profile, dataset="resume")
    defaults = default_params(model, base)
    study = optuna.create_study()
    study.enqueue_trial(defaults)
    trial = study.ask()
    values = search_space(model)(trial, base)
    assert values == defaults == trial.params
    # Optuna only warns when an enqueued float lies outside its range, and uses it anyway: check.
    for name, dist in trial.distributions.items():
        value = trial.params[name]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            assert value in dist.choices, (name, value, dist.choices)
        else:
            assert dist.low <= value <= dist.high, (name, value, dist.low, dist.high)
    flat = base.flatten()
    assert all(flat[k] == v for k, v in values.items())
    assert run_key(base.with_overrides(values)) == run_key(base)  # the untuned run itself


def _trial_runs(study: str) -> tuple[list, list]:
    tracker = Tracker()
    parents = tracker.search(
        "crener-tune-smoke", f"tags.`crener.study` = '{study}' and tags.`crener.role` = 'study'"
    )
    trials = [
        r
        for r in tracker.search("crener-tune-smoke", f"tags.`crener.study` = '{study}'")
        if "crener.trial" in r.tags
    ]
    return parents, trials


def test_tune_logs_nested_trials_and_exports(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tune(dataset="resume", trials=3, profile="smoke", storage=storage, sets={"train.epochs": "2"})
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.study_name == STUDY and study.user_attrs["dataset"] == "resume"
    base = build_run_config(profile="smoke", dataset="resume", overrides={"train.epochs": "2"})
    assert study.trials[0].params == default_params("crener", base)  # trial 0: untuned default
    assert study.trials[0].user_attrs["crener.default"] is True
    parents, trials = _trial_runs(STUDY)
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert sorted(int(r.tags["crener.trial"]) for r in trials) == [0, 1, 2]
    for run in trials:
        assert run.tags["mlflow.parentRunId"] == parent.run_id
        assert run.tags["crener.sweep"] == "tune" and run.state == "finished"
        assert run.params["trial.number"] == run.tags["crener.trial"]
        assert "best/dev_f1" in run.metrics and "train.lr" in run.params
    history = Tracker().client.get_metric_history(parent.run_id, "trial/dev_f1")
    assert sorted(m.step for m in history) == [0, 1, 2]
    parent_run = Tracker().get_run(parent.run_id)
    assert parent_run.tags["crener.best_trial"] == str(study.best_trial.number)
    assert parent_run.status == "FINISHED"
    # separate workdirs, and trials never enter the sweep's run-once lookup
    assert sorted(p.name for p in (tmp_path / "runs" / "tune" / STUDY).iterdir()) == [
        "trial-0000",
        "trial-0001",
        "trial-0002",
    ]
    assert all(Tracker().find_runs(r.tags["crener.key"]) == [] for r in trials)

    # a second worker (same seed) joins the study instead of replaying it
    again = tune(dataset="resume", trials=1, profile="smoke", storage=storage, sets={"train.epochs": "2"})
    assert len(again.trials) == 4
    assert again.trials[3].params != again.trials[0].params
    assert len(_trial_runs(STUDY)[0]) == 1

    path = export_best(
        again, tmp_path / "best.toml", sets={"train.epochs": "2", "train.seed": "0", "runtime.threads": "1"}
    )
    (override,) = load_overrides(path)
    assert (
        override.models == ("crener",)
        and override.datasets == ("resume",)
        and override.profiles == ("smoke",)
    )
    assert "train.seed" not in override.values and override.values["train.epochs"] == "2"
    assert "runtime.threads" not in override.values  # the tuning machine's, not the recipe's
    best_lr = again.best_params["train.lr"]
    cells = plan(profile="smoke", datasets=["resume"], only="table6", configs=[path])
    assert {c.cfg.train.lr for c in cells} == {best_lr}
    assert {c.cfg.model.rounds for c in cells if c.cfg.variant == "no_enhancement"} == {1}


def test_pruned_trials(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pruner that prunes at the first report makes the pruning path deterministic.
    monkeypatch.setattr(
        optuna.pruners, "MedianPruner", lambda **kw: optuna.pruners.ThresholdPruner(lower=2.0)
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tune(dataset="resume", trials=2, profile="smoke", storage=storage, study_name="pruned")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    _, trials = _trial_runs("pruned")
    assert len(trials) == 2
    for run in trials:
        assert run.state == "finished" and run.tags["crener.pruned"] == "true"
        assert [m.step for m in Tracker().client.get_metric_history(run.run_id, "dev/f1")] == [1]
    with pytest.raises(Exception, match="no completed trial"):
        export_best(study, tmp_path / "none.toml")


def test_trial_callback_reports_then_prunes() -> None:
    calls: list[str] = []

    class Trial:
        def report(self, value: float, step: int) -> None:
            calls.append(f"report {step} {value}")

        def should_prune(self) -> bool:
            return len(calls) >= 2

    class Logger:
        def on_start(self, info: dict) -> None:
            calls.append("start")

        def on_epoch_end(self, epoch: int, metrics: dict) -> None:
            calls.append(f"log {epoch}")

    cb = TrialCallback(Trial(), Logger())  # type: ignore[arg-type]
    cb.on_start({})
    with pytest.raises(optuna.TrialPruned):
        cb.on_epoch_end(1, {"dev/f1": 0.25})
    assert calls == ["start", "log 1", "report 1 0.25"]


def _tune_cmd(prefix: list[str], storage: str, seed: int, trials: int, *extra: str) -> list[str]:
    return [
        *prefix,
        "tune",
        "--dataset",
        "resume",
        "--profile",
        "smoke",
        "--trials",
        str(trials),
        "--storage",
        storage,
        "--seed",
        str(seed),
        *extra,
    ]


def _env(tmp_path: Path, uri: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "CRENER_RUNS": str(tmp_path / "runs"),
        "HF_HUB_OFFLINE": "1",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return {**env, **extra}


def _two_workers(cmds: list[list[str]], env: dict[str, str], tmp_path: Path, timeout: float) -> None:
    logs = [tmp_path / f"worker{i}.log" for i in range(len(cmds))]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tmp_path)  # noqa: SIM115
        for cmd, log in zip(cmds, logs)
    ]
    try:
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=timeout) == 0, log.read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _check_shared_study(storage: str, total: int) -> None:
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert len(study.trials) == total
    assert sorted(t.number for t in study.trials) == list(range(total))
    assert all(t.state.is_finished() for t in study.trials)
    parents, trials = _trial_runs(STUDY)
    assert len(parents) == 1 and len(trials) == total
    assert {r.tags["mlflow.parentRunId"] for r in trials} == {parents[0].run_id}


def test_two_tune_workers_share_one_study(mlflow_store: str, tmp_path: Path) -> None:
    """Two ``crener tune`` processes (fake fit) on one SQLite storage: trials add up."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    prefix = fake_cli(tmp_path)
    cmds = [
        _tune_cmd(prefix, storage, seed, trials, "--set", "train.epochs=2")
        for seed, trials in ((0, 3), (1, 2))
    ]
    _two_workers(cmds, _env(tmp_path, mlflow_store, CRENER_FAKE_EPOCH_SECONDS="0.2"), tmp_path, timeout=120)
    _check_shared_study(storage, 5)


@pytest.mark.slow
def test_two_tune_workers_real_fit(mlflow_store: str, tmp_path: Path) -> None:
    """The same with the real fit on a tiny Resume slice (smoke profile)."""
    pytest.importorskip("crener.train")
    from tests.helpers import tiny_resume as _tiny_resume

    data = _tiny_resume(tmp_path / "data", 16)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    prefix = [sys.executable, "-m", "crener.cli"]
    extra = ("--data-root", str(data), "--set", "train.epochs=2")
    cmds = [_tune_cmd(prefix, storage, seed, 2, *extra) for seed in (0, 1)]
    _two_workers(cmds, _env(tmp_path, mlflow_store, OMP_NUM_THREADS="1"), tmp_path, timeout=560)
    _check_shared_study(storage, 4)


def test_tune_never_selects_on_test_for_a_dataset_without_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # MSRA has no dev split; its default lineage protocol makes dev the test set, so a study
    # on it would maximise test F1. Tune must run it under the clean protocol, and say so.
    import experiments.tune as tune_module

    seen: list[str] = []

    def fit(cfg, workdir, *, callback, data_root):  # noqa: ANN001 - records what a trial trains on
        seen.append(cfg.data.msra_protocol)
        return {"dev": {"f1": 0.5}}

    monkeypatch.setattr(tune_module, "_fit", fit)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with caplog.at_level("INFO", logger="experiments.tune"):
        tune(dataset="msra", trials=2, profile="smoke", storage=storage, runs_dir=tmp_path, track=False)
    assert seen == ["clean", "clean"]
    assert "clean protocol" in caplog.text
    # An explicit lineage request is refused before any trial runs.
    with pytest.raises(CrenerError, match="refuses data.msra_protocol=lineage on msra"):
        tune(dataset="msra", trials=1, profile="smoke", storage=storage, runs_dir=tmp_path, track=False,
             sets={"data.msra_protocol": "lineage"}, study_name="lineage")  # fmt: skip
    assert seen == ["clean", "clean"]
    # Datasets with a dev split keep their config untouched.
    tune(dataset="resume", trials=1, profile="smoke", storage=storage, runs_dir=tmp_path, track=False)
    assert seen[-1] == "lineage"


def test_space_is_centred_on_the_defaults_and_keeps_a_frozen_encoder_frozen() -> None:
    from crener.search import DROPOUT_SPAN, LR_SPAN

    base = build_run_config(profile="quick", overrides={"train.encoder_lr": 0.0, "model.out_dropout": 0.1})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        values = search_space("crener")(trial, base)
        assert "train.encoder_lr" not in values  # 0 = frozen: never tuned into a trained encoder
        assert base.train.lr / LR_SPAN <= values["train.lr"] <= base.train.lr * LR_SPAN
        assert 0.0 <= values["model.out_dropout"] <= 0.1 + DROPOUT_SPAN
        study.tell(trial, 0.0)
    dists = study.trials[0].distributions
    assert dists["model.out_dropout"].low == 0.0 and dists["model.out_dropout"].high == pytest.approx(0.25)


def test_only_out_of_memory_fails_a_trial_alone_and_the_sampler_is_the_studys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import experiments.tune as tune_module

    calls: list[int] = []

    def oom(cfg, workdir, *, callback, data_root):  # noqa: ANN001
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tune_module, "_fit", oom)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tune(dataset="resume", trials=2, profile="smoke", storage=storage, runs_dir=tmp_path, track=False)
    assert len(calls) == 2  # the study went on after the first failed trial
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert isinstance(study.sampler, optuna.samplers.TPESampler) and study.sampler._constant_liar

    def shape_bug(cfg, workdir, *, callback, data_root):  # noqa: ANN001
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x64 and 32x8)")

    monkeypatch.setattr(tune_module, "_fit", shape_bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        tune(dataset="resume", trials=2, profile="smoke", storage=storage, runs_dir=tmp_path,
             track=False, study_name="bug")  # fmt: skip
    assert len(optuna.load_study(study_name="bug", storage=storage).trials) == 1  # stopped at once


def test_an_interrupted_study_says_so_and_a_rerun_completes_it(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Issue 37, class 5: Ctrl-C in the untuned default's trial marks the parent run interrupted
    (not FINISHED), logs no traceback, and the rerun runs the default again."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    fit = fake_fit.fit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake_fit, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(dataset="resume", trials=2, profile="smoke", storage=storage, sets={"train.epochs": "1"})
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    (parent,) = _trial_runs(STUDY)[0]
    parent = Tracker().get_run(parent.run_id)
    assert parent.status == "KILLED" and parent.tags["crener.interrupted"] == "true"

    monkeypatch.setattr(fake_fit, "fit", fit)
    study = tune(dataset="resume", trials=1, profile="smoke", storage=storage, sets={"train.epochs": "1"})
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 1 and done[0].user_attrs["crener.default"] is True
    parent = Tracker().get_run(parent.run_id)
    assert parent.status == "FINISHED" and parent.tags["crener.interrupted"] == "false"


def test_tune_page_then_rebuilt_from_the_study_without_a_trial(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 36: `crener tune --page FILE` writes the study as a stamped page; `--page-only`
    rebuilds it from the study as it stands and runs no trial."""
    from crener.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    args = ["tune", "--dataset", "resume", "--profile", "smoke", "--storage", "sqlite:///optuna.db",
            "--set", "train.epochs=2"]  # fmt: skip
    assert cli_main([*args, "--trials", "3", "--page", "pages/tuning.md"]) == 0
    assert len(fake_fit.CALLS) == 3
    study = optuna.load_study(study_name=STUDY, storage="sqlite:///optuna.db")
    best = study.best_trial
    page = (tmp_path / "pages" / "tuning.md").read_text(encoding="utf-8")
    lines = page.splitlines()
    assert lines[0] == "# Tuning study: crener full on resume (profile `smoke`)"
    stamp = lines[2]
    assert stamp.startswith("Generated by `crener tune --dataset resume --profile smoke")
    assert "--page-only" in stamp and "commit `" in stamp and stamp.endswith(" UTC.")
    assert "storage `sqlite:///optuna.db`" in stamp and "store `sqlite:///mlflow.db`" in stamp
    assert str(tmp_path) not in page  # paths relative: the page is committed
    assert "- trials: 3 (3 complete, 0 pruned, 0 failed)" in page and "wall time" in page
    assert f"| untuned default | 0 | {100 * study.trials[0].value:.2f} |" in page
    assert f"| best | {best.number} | {100 * best.value:.2f} |" in page
    assert "chosen on dev F1 only" in page
    assert f"--set train.lr={best.params['train.lr']!r}" in page and "--set train.epochs=2" in page
    _, runs = _trial_runs(STUDY)
    assert len(runs) == 3 and all(f"`{r.run_id}`" in page for r in runs)
    for t in study.trials:
        run = next(r for r in runs if r.tags["crener.trial"] == str(t.number))
        number = "0 (default)" if t.number == 0 else str(t.number)
        assert f"| {number} | complete | {100 * t.value:.2f} | " in page and page.count(run.run_id) == 1
        assert page.split(f"| {number} | complete", 1)[1].splitlines()[0].endswith(f"`{run.run_id}` |")

    (tmp_path / "pages" / "tuning.md").unlink()
    assert cli_main([*args, "--page-only", "--page", "pages/tuning.md", "--export", "best.toml"]) == 0
    assert len(fake_fit.CALLS) == 3  # no trial ran
    assert len(optuna.load_study(study_name=STUDY, storage="sqlite:///optuna.db").trials) == 3
    again = (tmp_path / "pages" / "tuning.md").read_text(encoding="utf-8")
    command = (
        "crener tune --dataset resume --profile smoke --storage sqlite:///optuna.db --set train.epochs=2 "
    )
    command += "--page-only --page pages/tuning.md --export best.toml"
    assert (
        again.splitlines()[2].startswith(f"Generated by `{command}`")
        and f"rebuild it with `{command}`" in again
    )
    assert again.splitlines()[3:] == lines[3:]  # the same page but for its stamp
    assert (tmp_path / "best.toml").is_file()


def test_tune_page_is_checked_before_any_trial(
    mlflow_store: str, fake_fit: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from crener.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    args = ["tune", "--dataset", "resume", "--profile", "smoke", "--storage", "sqlite:///optuna.db"]
    assert cli_main([*args, "--trials", "1", "--page", "reports"]) == 2
    assert "--page reports is a folder: name a file in it, e.g. reports/tuning-quick.md" in caplog.text
    assert fake_fit.CALLS == [] and not (tmp_path / "optuna.db").exists()  # no study, no trial
    (tmp_path / "afile").write_text("", encoding="utf-8")
    assert cli_main([*args, "--trials", "1", "--page", "afile/tuning.md"]) == 2
    assert "afile is a file, not a folder" in caplog.text
    # --page-only needs a page, and a study to read (none is created for it).
    assert cli_main([*args, "--page-only"]) == 2
    assert "--page-only writes the page named by --page FILE" in caplog.text
    assert cli_main([*args, "--page-only", "--page", "reports/tuning.md"]) == 2
    assert f"no study '{STUDY}' in the Optuna storage 'sqlite:///optuna.db'" in caplog.text
    assert fake_fit.CALLS == [] and not (tmp_path / "optuna.db").exists()
    assert cli_main(args) == 2 and "--trials N is required" in caplog.text
