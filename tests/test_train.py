"""The training loop: determinism, resume-after-interrupt, failure modes, checkpoints, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from crener import train as train_mod
from crener.checkpoint import load_checkpoint
from crener.cli import main as cli_main
from crener.errors import CheckpointError, CrenerError
from crener.identity import run_key
from crener.train import fit
from tests.conftest import SENTENCES
from tests.helpers import tiny_cfg, write_bmes


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.epochs: list[tuple[int, dict]] = []
        self.stop_after = stop_after
        self.info: dict = {}

    def on_start(self, info):
        self.info = info

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, metrics))
        if self.stop_after is not None and epoch == self.stop_after:
            raise KeyboardInterrupt("simulated kill after the epoch checkpoint")


def strip_times(history):
    return [{k: v for k, v in h.items() if "second" not in k and "per_s" not in k} for h in history]


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data)
    a = fit(cfg, tmp_path / "a")
    b = fit(cfg, tmp_path / "b")
    hist_a = json.loads((tmp_path / "a" / "history.json").read_text())
    hist_b = json.loads((tmp_path / "b" / "history.json").read_text())
    assert strip_times(hist_a) == strip_times(hist_b)
    assert a["test"] == b["test"] and a["dev"] == b["dev"]

    rec = Recorder(stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "c", callback=rec)
    assert not (tmp_path / "c" / "summary.json").exists()
    rec2 = Recorder()
    epochs_trained = []
    real_epoch = train_mod.train_one_epoch

    def counting(*args, **kwargs):
        epochs_trained.append(kwargs["epoch"])
        return real_epoch(*args, **kwargs)

    train_mod.train_one_epoch = counting
    try:
        c = fit(cfg, tmp_path / "c", callback=rec2)
    finally:
        train_mod.train_one_epoch = real_epoch
    # It really resumed: started after the saved epoch and trained only the two missing ones
    # (a silent retrain from scratch would reach the same deterministic weights).
    assert rec2.info["resumed_from_epoch"] == 1 and epochs_trained == [2, 3]
    hist_c = json.loads((tmp_path / "c" / "history.json").read_text())
    assert strip_times(hist_c) == strip_times(hist_a)
    assert c["test"] == a["test"] and c["best_epoch"] == a["best_epoch"]
    # The resumed run replays epoch 1 to its callback before training epochs 2 and 3.
    assert [e for e, _ in rec2.epochs] == [1, 2, 3]
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wc = load_checkpoint(tmp_path / "c" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # A checkpoint of another configuration is refused, not silently continued.
    with pytest.raises(CheckpointError, match="belongs to another configuration"):
        fit(tiny_cfg(tiny_data, **{"train.lr": 0.5}), tmp_path / "c")


def test_each_epoch_logs_how_its_seconds_split_between_training_and_dev(tiny_data, tmp_path):
    """train/seconds and train/steps (what --time-budget's step estimate is checked against) and
    dev/seconds (its evaluation estimate) are logged each epoch and add up to no more than the epoch."""
    rec = Recorder()
    fit(tiny_cfg(tiny_data, **{"train.epochs": 2, "train.max_steps": 1}), tmp_path / "a", callback=rec)
    full = Recorder()
    fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "b", callback=full)
    for metrics in [m for _, m in rec.epochs + full.epochs]:
        assert metrics["train/seconds"] > 0 and metrics["dev/seconds"] > 0
        assert metrics["train/seconds"] + metrics["dev/seconds"] <= metrics["epoch_seconds"]
    assert [m["train/steps"] for _, m in rec.epochs] == [1.0, 1.0]
    assert full.epochs[0][1]["train/steps"] == 2.0  # every batch of the epoch when steps are not capped


def test_different_seed_differs(tiny_data, tmp_path):
    a = fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "a")
    b = fit(tiny_cfg(tiny_data, **{"train.epochs": 1, "train.seed": 1}), tmp_path / "b")
    assert a["key"] != b["key"]
    ha = json.loads((tmp_path / "a" / "history.json").read_text())[0]["train/loss"]
    hb = json.loads((tmp_path / "b" / "history.json").read_text())[0]["train/loss"]
    assert ha != hb


def test_non_finite_loss_stops_the_run(tiny_data, tmp_path, monkeypatch):
    from crener.tasks import GridTask

    def nan_loss(self, outputs, batch):
        return {"loss": outputs["logits"].sum() * float("nan")}

    monkeypatch.setattr(GridTask, "loss", nan_loss)
    with pytest.raises(CrenerError, match="non-finite loss"):
        fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def test_deferred_loss_reads_and_loader_workers_train_the_same(tiny_data, tmp_path, monkeypatch):
    """Reading the losses every few steps (as on an accelerator) and collating in DataLoader
    workers change nothing: the same per-step losses, in order, and the same weights."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1})
    real_epoch = train_mod.train_one_epoch
    runs = {}
    for name, sync_every, workers in (("plain", 1, 0), ("deferred", 3, 0), ("workers", 1, 1)):
        seen: list[float] = []

        def epoch(*args, sync_every=sync_every, seen=seen, **kwargs):
            inner = kwargs.pop("on_step")
            kwargs["on_step"] = lambda value: seen.append(value) or inner(value)
            return real_epoch(*args, sync_every=sync_every, **kwargs)

        monkeypatch.setattr(train_mod, "train_one_epoch", epoch)
        over = {"train.epochs": 1, "train.max_cells": 100, "runtime.loader_workers": workers}
        fit(tiny_cfg(tiny_data, **over), tmp_path / name)
        weights = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"]
        runs[name] = (seen, weights)
    plain, w_plain = runs["plain"]
    assert len(plain) >= 5  # several reads of three
    for name in ("deferred", "workers"):
        seen, weights = runs[name]
        assert seen == plain, name
        assert all(torch.equal(weights[k], w_plain[k]) for k in w_plain), name
    assert cfg.runtime.loader_workers == 0


def test_a_non_finite_loss_is_caught_at_a_deferred_read(tiny_data, tmp_path, monkeypatch):
    from crener.tasks import GridTask

    real_loss, calls = GridTask.loss, []

    def late_nan(self, outputs, batch):
        calls.append(1)
        out = real_loss(self, outputs, batch)
        return {**out, "loss": out["loss"] * (float("nan") if len(calls) == 2 else 1.0)}

    real_epoch = train_mod.train_one_epoch
    monkeypatch.setattr(GridTask, "loss", late_nan)
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: real_epoch(*a, sync_every=4, **k))
    with pytest.raises(CrenerError, match="non-finite loss .* step 1:"):
        fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "nan")
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def test_missing_and_malformed_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "text.pt"
    text.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is a text file, not a checkpoint"):
        load_checkpoint(text)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a crener checkpoint"):
        load_checkpoint(other)


def test_a_malicious_torch_checkpoint_runs_no_code(tmp_path):
    """A real torch zip checkpoint whose pickle would write a marker file when unpickled (the
    legacy raw-pickle case fails on its magic number whatever weights_only says)."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    evil = tmp_path / "evil.pt"
    torch.save({"version": 1, "model": {"w": torch.zeros(2)}, "payload": Evil()}, evil)
    assert zipfile.is_zipfile(evil)  # the format torch.load reads with weights_only
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(evil)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (the claim above can fail).
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_missing_encoder_fails_fast_with_advice(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, **{"model.encoder": str(tmp_path / "no-such-bert")})
    with pytest.raises(CheckpointError, match="--encoder"):
        fit(cfg, tmp_path / "run")


def test_cli_train_evaluate_predict(tiny_data, tmp_path, capsys):
    work = tmp_path / "run"
    args = ["train", "--dataset", "resume", "--profile", "smoke", "--no-track", "--workdir", str(work),
            "--data-root", str(tiny_data), "--set", "train.epochs=1", "--set", "data.train_limit=0"]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) >= {"dev", "test", "best_epoch", "epochs", "seconds", "parameters"}
    assert set(summary["test"]) == {"precision", "recall", "f1"}

    ckpt = work / "checkpoints" / "best.pt"
    assert (
        cli_main(["evaluate", "--checkpoint", str(ckpt), "--split", "dev", "--data-root", str(tiny_data)])
        == 0
    )
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["f1"] == pytest.approx(summary["dev"]["f1"])

    text = tmp_path / "in.txt"
    long_line = "张三是北京大学的教授，" * 40  # 440 characters: split at max_len and merged back
    text.write_text("李四任华为公司总经理\n" + long_line + "\n", encoding="utf-8")
    assert cli_main(["predict", "--checkpoint", str(ckpt), str(text)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["李四任华为公司总经理", long_line]
    # Entity texts checked against the lines we wrote, not against the text the code echoes back.
    for line, r in zip(["李四任华为公司总经理", long_line], rows):
        for e in r["entities"]:
            idx = e.get("indices", range(e["start"], e["end"]))  # decoded paths may skip characters
            assert 0 <= e["start"] < e["end"] <= len(line)
            assert "".join(line[i] for i in idx) == e["text"]

    assert cli_main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_reused_workdir_builds_the_encoder_its_inputs_need(tmp_path):
    # The embedded encoder is keyed by its vocabulary, widths and seed: a workdir reused for
    # other data must not hand the new run the old vocabulary (its characters would be [UNK]).
    from crener.data.schema import Sentence
    from crener.train import load_encoder

    work = tmp_path / "work"
    cfg = tiny_cfg(tmp_path)
    first, second = [Sentence(tuple("甲乙"), ())], [Sentence(tuple("丙丁"), ())]
    _, tok = load_encoder(cfg, first, work)
    assert tok.char_id("甲") != tok.unk_id
    _, tok = load_encoder(cfg, second, work)
    assert tok.char_id("丙") != tok.unk_id and tok.char_id("甲") == tok.unk_id
    wide, _ = load_encoder(tiny_cfg(tmp_path, **{"model.embedded_hidden": 64}), second, work)
    assert wide.out_dim == 64
    a, _ = load_encoder(cfg, second, work)
    b, _ = load_encoder(tiny_cfg(tmp_path, **{"train.seed": 1}), second, work)
    assert not torch.equal(a.bert.embeddings.word_embeddings.weight, b.bert.embeddings.word_embeddings.weight)
    assert len(list(work.glob("encoder-*"))) == 4  # the same inputs reuse their directory


def test_a_test_only_entity_type_is_a_miss_not_a_crash(tmp_path):
    # Types come from train + dev; a test entity of another type cannot be predicted. Nothing
    # may featurize test gold against the label set (it would fail on the unknown type).
    from crener.data.schema import Entity, Sentence
    from crener.inference import evaluate_checkpoint

    root = tmp_path / "data"
    (root / "resume").mkdir(parents=True)
    write_bmes(root / "resume" / "train.char.bmes", SENTENCES)
    write_bmes(root / "resume" / "dev.char.bmes", SENTENCES)
    novel = Sentence(tuple("孙七去了深圳"), (Entity.span(0, 2, "NAME"), Entity.span(4, 6, "GPE")))
    write_bmes(root / "resume" / "test.char.bmes", [*SENTENCES, novel])
    fit(tiny_cfg(root, **{"train.epochs": 1}), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert "GPE" not in load_checkpoint(ckpt)["types"]
    gpe = json.loads((tmp_path / "run" / "per_type.json").read_text())["per_type"]["GPE"]
    assert (gpe["correct"], gpe["predicted"], gpe["gold"]) == (0, 0, 1)
    ev = evaluate_checkpoint(ckpt, split="test", data_root=str(root))
    assert (ev["per_type"]["GPE"]["correct"], ev["per_type"]["GPE"]["gold"]) == (0, 1)


FAULTS = """
import resource, sys, torch
from crener.train import keep_large_tensors_on_heap
print(keep_large_tensors_on_heap(sys.argv[1] == "on"))
for _ in range(6):  # 64 MiB, freed at once; the heap settles after a few (first touches fault)
    torch.zeros(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.zeros(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_heap_tensors_reuse_freed_memory_without_page_faults():
    # Process-wide, so each setting runs in its own interpreter.
    faults = {}
    for setting in ("on", "off"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True
        )
        took, count = out.stdout.split()
        assert took == str(setting == "on")
        faults[setting] = int(count)
    pages = 5 * 64 * 2**20 // 4096  # every page of five fresh 64 MiB mappings
    assert faults["off"] > pages // 2  # glibc mmaps each block anew: it faults in again
    assert faults["on"] < pages // 20  # the heap keeps the freed block: reused without faults


REAL_DEV_SCORES = train_mod._dev_scores


def scripted_dev_f1(monkeypatch, values: list[float]) -> None:
    """Dev F1 of successive epochs as scripted (the real scores otherwise), to steer early stopping."""
    import types

    real = REAL_DEV_SCORES  # not the attribute: an earlier script may have replaced it
    script = iter(values)

    def scripted(*args, **kwargs):
        shift, scores = real(*args, **kwargs)
        f1 = next(script)
        micro = types.SimpleNamespace(precision=f1, recall=f1, f1=f1)
        return shift, types.SimpleNamespace(micro=micro)

    monkeypatch.setattr(train_mod, "_dev_scores", scripted)


def test_patience_stops_and_tests_the_best_checkpoint_and_a_resumed_run_stops_alike(
    tiny_data, tmp_path, monkeypatch
):
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 6, "train.patience": 2})
    assert run_key(cfg) != run_key(tiny_cfg(tiny_data, **{"train.epochs": 6}))  # another experiment
    # Best at epoch 2; epochs 3 and 4 do not beat it: stop after 4, never train 5 and 6.
    scripted_dev_f1(monkeypatch, [0.2, 0.5, 0.4, 0.5, 0.9, 0.9])
    whole = fit(cfg, tmp_path / "a")
    assert whole["epochs_run"] == 4 and whole["best_epoch"] == 2 and whole["epochs"] == 6
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")
    assert best["epoch"] == 2
    # The test was scored with the best checkpoint's weights, not the last epoch's.
    last = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert last["epoch"] == 4 and any(
        not torch.equal(best["model"][k], last["model"][k]) for k in best["model"]
    )
    # Killed after epoch 3, resumed: it trains epoch 4 only and stops where the whole run did.
    scripted_dev_f1(monkeypatch, [0.2, 0.5, 0.4])
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, tmp_path / "b", callback=Recorder(stop_after=3))
    scripted_dev_f1(monkeypatch, [0.5])
    resumed = fit(cfg, tmp_path / "b")
    assert resumed["epochs_run"] == 4 and resumed["best_epoch"] == 2
    assert resumed["test"] == whole["test"]
    # Resumed after the stop itself: nothing more is trained.
    scripted_dev_f1(monkeypatch, [])
    assert fit(cfg, tmp_path / "b")["epochs_run"] == 4


def test_patience_must_not_be_negative(tiny_data):
    from crener.errors import ConfigError

    with pytest.raises(ConfigError, match="train.patience=-1"):
        tiny_cfg(tiny_data, **{"train.patience": -1})
