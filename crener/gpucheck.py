"""``python -m crener.gpucheck``: the one-command GPU check (``nox -s gpu_check``).

One call on a GPU machine, a few minutes, one table:

- ``tests``: the ``gpu``-marked tests (``tests/test_gpu.py``) on the device;
- ``speed``: training and evaluation sentences/s and peak memory of W2NER and CRENER ``full`` at
  ``paper`` widths over a bert-base-shaped random encoder (12 layers, 768 wide: no weights are
  needed to measure cost), fp32 against bf16 autocast, on Resume training sentences in the paper's
  batches of 12;
- ``epoch``: one training epoch of Resume (CRENER ``full``, the same widths and encoder, bf16 on
  CUDA), with its wall time and a small dev/test evaluation;
- ``worst batch``: one training step on MSRA's 12 longest training chunks (the largest batch of 12
  the paper's recipe meets) and whether its peak fits in 40 GB.

It runs from a source checkout with a Python that has torch, transformers, tabulate and pytest
and nothing installed from this project (tracking stays off, so MLflow and Optuna are never
imported). The GPU machine receives only the working tree, so ``--prepare DIR`` (run where the
data is) copies the files the check reads into ``DIR``, an ignored folder sent along with the tree;
``--data-root DIR`` reads them there. ``--device cpu --tiny`` is the dry run the test suite makes,
so the script cannot rot between GPU sessions. A step that fails is a row saying so; the others
still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEVICE_ENV = "CRENER_GPU_DEVICE"  # the device tests/test_gpu.py runs on (default: cuda)
# What the check reads, relative to a data root: Resume for speed and the epoch, MSRA's training
# split for its worst batch.
NEEDED = ("resume/train.char.bmes", "resume/dev.char.bmes", "resume/test.char.bmes", "msra/train.char.bmes",
          "msra/test.char.bmes")  # fmt: skip
BERT_BASE = {"model.embedded_hidden": 768, "model.embedded_layers": 12, "model.embedded_heads": 12,
             "model.embedded_ff": 3072}  # fmt: skip
TINY_ENCODER = {"model.embedded_hidden": 32, "model.embedded_layers": 2, "model.embedded_heads": 2,
                "model.embedded_ff": 64}  # fmt: skip
FITS_BYTES = 40 * 10**9  # the goal: MSRA's worst batch of 12 in 40 GB (reports/decisions.md)


def prepare(out: Path, data_root: str | None) -> Path:
    """Copy the files the check reads from the data root into ``out`` (same layout)."""
    from crener.data.datasets import resolve_data_root

    src = Path(resolve_data_root(data_root))
    for rel in NEEDED:
        if not (src / rel).is_file():
            raise FileNotFoundError(f"{src / rel}: missing; the GPU check reads {', '.join(NEEDED)}")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, out / rel)
    log.info("copied %d files into %s: pass --data-root %s on the GPU machine", len(NEEDED), out, out)
    return out


def _config(args: argparse.Namespace, model: str, bf16: bool, **extra: Any):
    from crener.profiles import build_run_config

    flat: dict[str, Any] = {
        "model.encoder": "embedded",
        **(TINY_ENCODER if args.tiny else BERT_BASE),
        "runtime.device": args.device,
        "train.bf16": bf16,
        "runtime.progress": False,
        # The paper's batches: 12 sentences from length-sorted buckets, no memory guard.
        "train.sorted_batches": True,
        "train.max_cells": 0,
        "train.batch_size": 12,
        **extra,
    }
    if args.data_root:
        flat["runtime.data_root"] = args.data_root
    return build_run_config(
        model=model, profile="smoke" if args.tiny else "paper", dataset="resume", overrides=flat
    )


def check_tests(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "test_gpu.py"),
    ]
    env = {**os.environ, DEVICE_ENV: args.device, "HF_HUB_OFFLINE": "1"}
    if args.data_root:
        env["CRENER_DATA"] = str(Path(args.data_root).resolve())
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = dict(
        (k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)
    )
    ok = res.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped")
    return {"check": "tests", "setting": "pytest -m gpu tests/test_gpu.py", "ok": ok, "result": summary,
            **({} if ok else {"error": (res.stdout + res.stderr).strip()[-2000:]})}  # fmt: skip


def check_speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crener.bench import measure_speed

    rows = []
    for model in ("w2ner", "crener"):
        for bf16 in (False, True):  # on the CPU dry run too: the autocast path must not rot
            setting = f"{model} full, {'bf16' if bf16 else 'fp32'}"
            try:
                r = measure_speed(_config(args, model, bf16), args.sentences)
            except Exception as e:  # noqa: BLE001 - a failed measurement is a row; the rest still run
                rows.append(
                    {"check": "speed", "setting": setting, "ok": False, "error": f"{type(e).__name__}: {e}"}
                )
                continue
            rows.append({"check": "speed", "setting": setting, "ok": True, **r,
                         "result": f"train {r['train_sent_per_s']:.1f} sent/s, eval {r['eval_sent_per_s']:.1f} sent/s"
                                   + _peak_text(r.get("train_peak_bytes"), r.get("eval_peak_bytes"))})  # fmt: skip
    fp32 = {r["setting"].split(",")[0]: r for r in rows if r.get("ok") and r["setting"].endswith("fp32")}
    for r in rows:
        ref = fp32.get(r["setting"].split(",")[0])
        if r.get("ok") and r["setting"].endswith("bf16") and ref:
            r["bf16_speedup"] = r["train_sent_per_s"] / ref["train_sent_per_s"]
            r["result"] += f"; bf16/fp32 training {r['bf16_speedup']:.2f}x"
    return rows


def _peak_text(train: int | None, evaluation: int | None) -> str:
    if train is None:
        return ""
    return f"; peak {train / 2**30:.2f} GiB train, {(evaluation or 0) / 2**30:.2f} GiB eval"


def check_epoch(args: argparse.Namespace) -> dict[str, Any]:
    from crener.train import fit

    bf16 = args.device.startswith("cuda")
    limits = {"data.train_limit": 32, "data.eval_limit": 16, "data.test_limit": 16} if args.tiny else {
        "data.eval_limit": 100, "data.test_limit": 100}  # fmt: skip
    cfg = _config(args, "crener", bf16, **{"train.epochs": 1, **limits})
    setting = f"Resume, crener full, {'bf16' if bf16 else 'fp32'}, one epoch"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = fit(cfg, tmp, resume=False)
        wall = time.perf_counter() - t0
        history = json.loads((Path(tmp) / "history.json").read_text())
    epoch = history[0]
    return {"check": "epoch", "setting": setting, "ok": True, "wall_seconds": wall,
            "epoch_seconds": epoch["epoch_seconds"], "train_sent_per_s": epoch["train/sentences_per_s"],
            "dev_f1": summary["dev"]["f1"],
            "result": f"epoch {epoch['epoch_seconds']:.0f} s ({epoch['train/sentences_per_s']:.1f} sent/s), "
                      f"{wall:.0f} s with loading and evaluation"}  # fmt: skip


def check_worst_batch(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from crener.bench import _CpuPeak, _device_peak, _reset_device_peak, _sync
    from crener.data.batching import collate
    from crener.data.datasets import load_dataset
    from crener.data.split import split_all
    from crener.evaluation import autocast, featurize, resolve_device
    from crener.registry import build_model, build_task
    from crener.train import load_encoder

    bf16 = args.device.startswith("cuda")
    size = 2 if args.tiny else 12
    cfg = _config(args, "crener", bf16, **{"data.dataset": "msra"})
    data = load_dataset(cfg.data, seed=0, data_root=cfg.runtime.data_root)
    chunks = split_all(data.train, cfg.data.max_len)
    longest = sorted(range(len(chunks)), key=lambda i: (-len(chunks[i].sentence), i))[:size]
    task = build_task(cfg.model, data.types)
    device = resolve_device(cfg.runtime.device)
    with tempfile.TemporaryDirectory() as tmp:
        encoder, tok = load_encoder(cfg, data.train, Path(tmp))
    torch.manual_seed(0)
    model = build_model(cfg.model, task, encoder, cfg.runtime).to(device).train()
    examples = featurize([chunks[i] for i in longest], task, tok)
    batch = collate(examples, task.target, task.num_labels).to(device)
    cpu = _CpuPeak()
    _sync(device)
    _reset_device_peak(device)
    cpu.start()
    with autocast(device, cfg.train.bf16):
        out = model(batch)
    task.loss(out, batch)["loss"].backward()
    _sync(device)
    peak = _device_peak(device) if device.type == "cuda" else cpu.peak()
    n = int(np.max([e.n for e in examples]))
    fits = peak <= FITS_BYTES
    return {"check": "worst batch", "setting": f"MSRA, {size} longest chunks ({n} characters), crener full",
            "ok": fits, "peak_bytes": peak, "fits_40gb": fits,
            "result": f"peak {peak / 2**30:.2f} GiB ({'fits' if fits else 'does not fit'} in 40 GB)"}  # fmt: skip


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    rows: list[dict[str, Any]] = []
    steps = [
        ("tests", check_tests),
        ("speed", check_speed),
        ("epoch", check_epoch),
        ("worst batch", check_worst_batch),
    ]
    for name, step in steps:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            out = step(args)
        except Exception as e:  # noqa: BLE001 - report the failure as a row and go on
            log.exception("%s failed", name)
            out = {"check": name, "setting": "", "ok": False, "error": f"{type(e).__name__}: {e}"}
        for r in out if isinstance(out, list) else [out]:
            r.setdefault("seconds", time.perf_counter() - t0)
            rows.append(r)
        log.info("%s done in %.0f s", name, time.perf_counter() - t0)
    return rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    from tabulate import tabulate

    body = [[r["check"], r["setting"], "ok" if r["ok"] else "FAIL", r.get("result") or r.get("error", "")[:300]]
            for r in rows]  # fmt: skip
    return header + "\n\n" + tabulate(body, ["check", "setting", "status", "result"], tablefmt="github")


def machine(device: str) -> str:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "CPU"
    return (
        f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; {torch.get_num_threads()} CPU threads"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crener.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the dry run")
    p.add_argument("--tiny", action="store_true", help="tiny widths and data: the CPU dry run")
    p.add_argument("--data-root", help="dataset directory (default: $CRENER_DATA, then ../shared/data)")
    p.add_argument("--prepare", metavar="DIR", help="copy the data files the check reads into DIR and exit")
    p.add_argument("--sentences", type=int, default=96, help="Resume sentences of each speed measurement")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "speed", "epoch", "worst batch"])
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prepare:
        prepare(Path(args.prepare), args.data_root)
        return 0
    if args.tiny:
        args.sentences = min(args.sentences, 16)
    t0 = time.perf_counter()
    rows = run(args)
    header = f"GPU check on {machine(args.device)}: {time.perf_counter() - t0:.0f} s"
    sys.stdout.write(table(rows, header) + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(args.device), "rows": rows}, indent=1, default=str)
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
