"""`crener bench`: training and inference speed, and peak memory against sentence length.

Speed is measured on real Resume training sentences with randomly initialised weights (the
weights do not change the cost). Memory is measured in a fresh subprocess per point, so each
peak is that configuration's own: CUDA peak allocation on a GPU, peak resident set size (minus
the process's size before the step) on CPU. Widths:

- ``quick``: the quick profile's widths;
- ``paper``: method.md §4.2 widths (d_h 512, d_c 96, biaffine 512, FFN 288) over a 2-layer,
  256-wide random BERT (the encoder the released W2NER code was measured with), so the CPU
  figures compare the grid models, not a 110M-parameter encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crener.config import RunConfig, parse_set
from crener.data.schema import Sentence
from crener.device import CpuPeak, device_peak, machine_info, reset_device_peak, rss_peak, sync
from crener.errors import DataError
from crener.files import check_folder, read_text, write_atomic
from crener.profiles import build_run_config
from crener.tools.workload import (  # the workloads the suites measure
    DEFAULT_WIDTHS,
    ROOFLINE_WIDTHS,
    bench_config,
    sample_parts,
    sample_sentences,
)

log = logging.getLogger(__name__)


def measure_speed(cfg: RunConfig, n_sentences: int) -> dict[str, float]:
    """Training and inference sentences/s on ``n_sentences`` Resume training sentences."""
    from crener.data.batching import batch_cells, collate, training_batches
    from crener.device import autocast, resolve_device
    from crener.evaluation import predict_examples
    from crener.train import keep_large_tensors_on_heap

    device = resolve_device(cfg.runtime.device)
    keep_large_tensors_on_heap(cfg.runtime.heap_tensors)
    parts = sample_parts(cfg, n_sentences, device)
    task, model, examples = parts.task, parts.model, parts.train_examples
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lengths = [e.n for e in examples]
    batches = training_batches(lengths, cfg.train, np.random.default_rng(0))
    model.train()

    def step(idx):
        batch = collate([examples[i] for i in idx], task.target, task.num_labels).to(device)
        with autocast(device, cfg.train.bf16):
            out = model(batch)
        loss = task.loss(out, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Warm-up on the shortest, a middle and the longest batch: allocator and kernel selection.
    by_cells = sorted(batches, key=lambda idx: batch_cells(idx, lengths))
    for idx in (by_cells[0], by_cells[len(by_cells) // 2], by_cells[-1]):
        step(idx)
    sync(device)
    reset_device_peak(device)
    t0 = time.perf_counter()
    for idx in batches:
        step(idx)
    sync(device)
    train_s = time.perf_counter() - t0
    train_peak = device_peak(device)
    predict_examples(model, task, examples[:8], device, cfg)
    reset_device_peak(device)
    t0 = time.perf_counter()
    predict_examples(model, task, examples, device, cfg)
    sync(device)
    eval_s = time.perf_counter() - t0
    n = len(examples)
    return {
        # Accelerator peaks (allocated bytes, weights and optimiser state included); None on CPU,
        # whose peaks the levers and memory suites measure in a fresh process each.
        "train_peak_bytes": train_peak,
        "eval_peak_bytes": device_peak(device),
        "train_sent_per_s": n / train_s,
        "eval_sent_per_s": n / eval_s,
        "train_ms_per_sentence": 1000 * train_s / n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batches": len(batches),
        "sentences_per_batch": n / len(batches),
    }


def memory_probe(cfg: RunConfig, length: int, batch: int = 1) -> dict[str, float]:
    """One training step, then one evaluation forward, on ``batch`` synthetic sentences of
    ``length`` characters; the peak memory of each above the memory held before it (on Linux CPUs
    from the resettable peak-RSS mark, so each peak is its own)."""
    from crener.config import MAX_LEN
    from crener.data.batching import collate
    from crener.data.datasets import DatasetSplits
    from crener.data.schema import Entity
    from crener.data.split import Chunk
    from crener.device import autocast, resolve_device
    from crener.train import build_parts, keep_large_tensors_on_heap

    if length > MAX_LEN:
        raise ValueError(f"length {length}: a BERT-style encoder reads at most {MAX_LEN} characters")
    device = resolve_device(cfg.runtime.device)
    keep_large_tensors_on_heap(cfg.runtime.heap_tensors)  # as in training: the heap's peak, not mmaps'
    # A random encoder at cfg's embedded widths, whatever encoder cfg names: no weights are needed
    # to measure memory, and the probe runs where no pretrained encoder is.
    cfg = cfg.with_overrides({"model.encoder": "embedded"})
    chars = [chr(0x4E00 + i) for i in range(200)]
    types = ("A", "B", "C")
    rng = np.random.default_rng(0)
    sentences = []
    for _ in range(batch):
        text = tuple(chars[i] for i in rng.integers(0, len(chars), length))
        ents = tuple(Entity.span(s, s + 3, types[s % 3]) for s in range(0, length - 3, 10))
        sentences.append(Sentence(text, ents))
    # The first training sentence only carries the encoder's vocabulary (all 200 characters);
    # the probe's batch is the others, each one uncut chunk whatever data.max_len says.
    data = DatasetSplits("synthetic", [Sentence(tuple(chars)), *sentences], [], [], types, {})
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(
            cfg, None, Path(tmp), device, data=data,
            sample=lambda train: [Chunk(s, 0, k) for k, s in enumerate(train[1:])],
        )  # fmt: skip
    task, model, examples = parts.task, parts.model, parts.train_examples
    b = collate(examples, task.target, task.num_labels).to(device)
    model.train()
    cpu = CpuPeak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        cpu.start()
    with autocast(device, cfg.train.bf16):
        out = model(b)
    task.loss(out, b)["loss"].backward()
    sync(device)
    if device.type == "cuda":
        train_peak = torch.cuda.max_memory_allocated(device)
        used = max(train_peak - base, 0)
    else:
        used = cpu.peak()
    del out
    model.zero_grad(set_to_none=True)
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        cpu.start()
    with torch.inference_mode(), autocast(device, cfg.train.bf16):
        task.decode(model(b), b)
    sync(device)
    if device.type == "cuda":
        eval_used = max(torch.cuda.max_memory_allocated(device) - base, 0)
    else:
        eval_used = cpu.peak()
    return {
        "length": length,
        "batch": batch,
        "peak_bytes": used,
        "eval_peak_bytes": eval_used,
        "bytes_per_cell": used / (batch * length * length),
        "process_peak_bytes": cpu.lifetime if device.type == "cpu" else train_peak,
    }


# Speed levers, each as the overrides that flip it from the default. The default row
# has every lever that pays switched on: cell-budget batches, space-to-batch convs in training,
# small (16k-cell) evaluation batches, the split grid input, fp32. The factored grid input stays
# an option (it is slower); uniform-draw dropout and the malloc heap are options (see
# model.fast_dropout and runtime.heap_tensors for why they are off).
# Measured and dropped: raising glibc's mmap threshold alone (no gain: the threshold is capped at
# 32 MiB, below every big grid). torch.compile is not a lever: on torch 2.13 CPU, dynamic shapes
# fail in Inductor ("cannot determine truth value of Relational") and static ones recompile for
# every new batch shape (minutes without finishing 8 sentences), so it cannot pay for varying grid
# sizes. Figures of the levers: reports/performance.md.
LEVERS: dict[str, dict[str, Any]] = {
    "default (every lever below on)": {},
    "fixed batch of 12 sentences": {"train.max_cells": 0, "train.batch_size": 12},
    "evaluation batches of 200k cells": {"runtime.eval_max_cells": 200_000},
    "concatenated grid input (eq. 7 as written)": {"runtime.grid_input": "concat"},
    "factored grid input": {"runtime.grid_input": "factored"},
    "uniform-draw dropout": {"model.fast_dropout": True},
    "bf16 autocast": {"train.bf16": True},
    "bf16 autocast, library dilated convs": {"train.bf16": True, "runtime.space_to_batch": False},
    "library dilated convs, GELU, masks and concatenation apart": {"runtime.fused_conv": False},
    "large tensors on the malloc heap": {"runtime.heap_tensors": True},
    "checkpointed rounds": {"runtime.checkpoint_rounds": True},
}
# The levers that change what is computed only for a model with several conv rounds.
CRENER_ONLY = {"checkpointed rounds"}


def cell_budget_like(batch_size: int, max_len: int, n_sentences: int) -> int:
    """A cell budget giving about as many batches per epoch as ``batch_size`` sentences a batch.

    B * N^2 summed over length-sorted batches is a little over the sum of n^2, so a budget of
    ``batch_size`` times the mean n^2 keeps roughly the step count (the optimiser's schedule) of
    fixed-size batches, with similar-length sentences in each batch.
    """
    from crener.data.datasets import load_dataset
    from crener.data.split import split_all

    cfg = build_run_config(dataset="resume", profile="paper", overrides={"data.max_len": max_len})
    data = load_dataset(cfg.data, seed=0, data_root=cfg.runtime.data_root)
    chunks = split_all(sample_sentences(data.train, n_sentences), max_len)
    lengths = np.array([len(c.sentence) for c in chunks])
    return int(batch_size * np.mean(lengths.astype(float) ** 2))


def budget_overrides(width: str, n: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The cell budget the speed suites train with: the preset's own, or (for ``paper``, whose
    recipe is fixed batches of 12) a budget with about the same step count, the default lever."""
    base = bench_config(width, "w2ner", "full", overrides)
    if base.train.max_cells > 0:
        return overrides
    return {"train.max_cells": cell_budget_like(base.train.batch_size, base.data.max_len, n), **overrides}


def probe_command(
    kind: str, width: str, model: str, variant: str, sets: list[str], **point: int
) -> list[str]:
    """The ``crener bench --probe`` command line that measures one point in a fresh process.

    ``kind``: ``speed`` (:func:`measure_speed`, with ``sentences``) or ``memory``
    (:func:`memory_probe`, with ``length`` and ``batch``); ``sets``: ``KEY=VALUE`` overrides."""
    cmd = [sys.executable, "-m", "crener.cli", "bench", "--probe", kind, "--widths", width]
    cmd += ["--models", model, "--variants", variant]
    flags = {"sentences": "--sentences", "length": "--lengths", "batch": "--batch"}
    for name, value in point.items():
        cmd += [flags[name], str(value)]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run_probe(args: argparse.Namespace) -> int:
    """One point of ``probe_command`` in this process; its JSON is the last line of stdout."""
    cfg = bench_config(args.widths[0], args.models[0], args.variants[0], parse_set(args.overrides))
    if args.probe == "speed":
        r = measure_speed(cfg, args.sentences)
        r["peak_rss_bytes"] = rss_peak()  # the whole process: interpreter, data, model, steps
    else:
        r = memory_probe(cfg, args.lengths[0], args.batch)
    sys.stdout.write(json.dumps(r) + "\n")
    return 0


def _speed_point(width: str, model: str, variant: str, n: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """``measure_speed`` in a fresh process, so its peak resident memory is its own."""
    items = [f"{k}={v}" for k, v in overrides.items()]
    cmd = probe_command("speed", width, model, variant, items, sentences=n)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        lines = (res.stderr or "").strip().splitlines() or ["?"]
        errors = [line for line in lines if "Error" in line.split(":")[0]] or lines[-1:]
        return {"error": errors[-1][:120]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_levers(budgeted: dict[str, dict[str, Any]], models: list[str], n: int) -> list[dict[str, Any]]:
    """Every lever on and off per width; ``budgeted``: width -> overrides with its cell budget."""
    rows = []
    for width, overrides in budgeted.items():
        for model in models:
            for lever, flip in LEVERS.items():
                if lever in CRENER_ONLY and model != "crener":
                    continue
                point = _speed_point(width, model, "full", n, {**overrides, **flip})
                rows.append({"width": width, "model": model, "lever": lever, **point})
                log.info("levers %s %s %s: %s", width, model, lever, point)
    return rows


def _memory_point(
    width: str, model: str, variant: str, length: int, batch: int, overrides: list[str]
) -> dict[str, Any]:
    cmd = probe_command("memory", width, model, variant, overrides, length=length, batch=batch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode < 0:  # a signal: on Linux most often the kernel's out-of-memory killer
        return {"length": length, "error": f"killed by signal {-res.returncode} (out of memory?)"}
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {"length": length, "error": tail[0][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(args: argparse.Namespace) -> int:
    if args.probe:
        return run_probe(args)
    if getattr(args, "from_json", None):
        results = read_results(args.from_json)
        page = getattr(args, "page", None) or str(Path(args.from_json).with_suffix(".md"))
        _check_page(page)
        _write_page(results, page)
        return 0
    if getattr(args, "page", None):
        _check_page(args.page)  # before minutes of measuring
    overrides = parse_set(args.overrides)
    suites = {args.suite} if isinstance(args.suite, str) else set(args.suite)
    if not args.widths:
        args.widths = list(ROOFLINE_WIDTHS if suites == {"roofline"} else DEFAULT_WIDTHS)
    # Every (width, model) the suites will build, resolved once here: a bad --set fails now, in one
    # message, not as an error row per measurement.
    for width in args.widths:
        for model in sorted({"crener", "w2ner", *args.models}):
            bench_config(width, model, "full", overrides)
        for variant in args.variants:
            bench_config(width, "crener", variant, overrides)
    set_items = [f"{k}={v}" for k, v in overrides.items()]
    results: dict[str, Any] = {"device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                               "threads": torch.get_num_threads(), "speed": [], "memory": [], "levers": [],
                               "machine": machine_info(), "command": "crener " + shlex.join(sys.argv[1:])}  # fmt: skip
    budgeted = {}  # width -> overrides with the cell budget the speed suites train with
    if {"model", "w2ner", "levers", "all"} & suites:
        budgeted = {w: budget_overrides(w, args.sentences, overrides) for w in args.widths}
    if {"model", "all"} & suites:
        for width in args.widths:
            for variant in args.variants:
                cfg = bench_config(width, "crener", variant, budgeted[width])
                r = measure_speed(cfg, args.sentences)
                results["speed"].append({"width": width, "model": "crener", "variant": variant, **r})
                log.info("%s %s: train %.1f sent/s, eval %.1f sent/s", width, variant,
                         r["train_sent_per_s"], r["eval_sent_per_s"])  # fmt: skip
    if {"w2ner", "all"} & suites:
        for width in args.widths:
            cfg = bench_config(width, "w2ner", "full", budgeted[width])
            r = measure_speed(cfg, args.sentences)
            results["speed"].append({"width": width, "model": "w2ner", "variant": "full", **r})
    if {"levers", "all"} & suites:
        results["levers"] = run_levers(budgeted, args.models, args.sentences)
    if {"memory", "all"} & suites:
        width = args.widths[-1]
        points = [("crener", "full"), ("crener", "no_enhancement")] if "crener" in args.models else []
        points += [(m, "full") for m in args.models if m != "crener"]
        for model, variant in points:
            for length in args.lengths:
                point = _memory_point(width, model, variant, length, args.batch, set_items)
                results["memory"].append({"width": width, "model": model, "variant": variant, **point})
                log.info("memory %s %s %s L=%d: %s", width, model, variant, length, point)
    if {"roofline", "all"} & suites:
        from crener.tools.roofline import run_roofline

        results.update(run_roofline(args.widths, args.models, args.sentences, overrides))
    _print(results, args.json)
    if getattr(args, "page", None):
        _write_page(results, args.page)
    failed = [
        r for rows in (results["speed"], results["memory"], results["levers"]) for r in rows if "error" in r
    ]
    if failed:
        log.error(
            "%d measurement(s) failed (error rows above), the first: %s", len(failed), failed[0]["error"]
        )
        return 1
    return 0


def _print(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(results) + "\n")
        return
    out = [f"device {results['device']}, {results['threads']} threads"]
    out += [body for _, body in _sections(results)]
    sys.stdout.write("\n\n".join(out) + "\n")


def _sections(results: dict[str, Any]) -> list[tuple[str, str]]:
    """``(title, Markdown body)`` for each suite present in ``results``."""
    from tabulate import tabulate

    out = []
    if results["speed"]:
        rows = [[r["width"], r["model"], r["variant"], f"{r['train_sent_per_s']:.1f}", f"{r['eval_sent_per_s']:.1f}",
                 f"{r['train_ms_per_sentence']:.0f}", f"{r['parameters'] / 1e6:.2f}M"] for r in results["speed"]]  # fmt: skip
        body = [tabulate(rows, ["widths", "model", "variant", "train sent/s", "eval sent/s", "train ms/sent", "params"],
                         tablefmt="github")]  # fmt: skip
        full = {r["width"]: r for r in results["speed"] if r["model"] == "crener" and r["variant"] == "full"}
        for r in results["speed"]:
            if r["variant"] == "no_enhancement" and r["width"] in full:
                ratio = full[r["width"]]["train_ms_per_sentence"] / r["train_ms_per_sentence"]
                body.append(
                    f"{r['width']}: CRENER full / no_enhancement training cost per sentence = {ratio:.2f}x"
                )
            if r["model"] == "w2ner" and r["width"] in full:
                ratio = full[r["width"]]["train_ms_per_sentence"] / r["train_ms_per_sentence"]
                body.append(f"{r['width']}: CRENER full / W2NER training cost per sentence = {ratio:.2f}x")
        out.append(("Speed of every variant", "\n\n".join(body)))
    if results["memory"]:
        rows = [[m["width"], m["model"], m["variant"], m["length"], m.get("batch", ""),
                 f"{m['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in m else m.get("error", "?"),
                 f"{m['bytes_per_cell'] / 1024:.1f}" if "bytes_per_cell" in m else "",
                 f"{m['eval_peak_bytes'] / 2**20:.0f}" if "eval_peak_bytes" in m else "",
                 f"{m['process_peak_bytes'] / 2**30:.2f}" if "process_peak_bytes" in m else ""]
                for m in results["memory"]]  # fmt: skip
        headers = ["widths", "model", "variant", "length", "batch", "train step peak MiB", "KiB per grid cell",
                   "eval peak MiB", "process peak GiB"]  # fmt: skip
        out.append(("Peak memory against sentence length", tabulate(rows, headers, tablefmt="github")))
    if results["levers"]:
        out.append(("Speed levers, each on and off", _levers_table(results["levers"])))
    if results.get("steps"):
        from crener.tools.roofline import roofline_tables

        out.append(("Roofline: each op group against this machine's peaks", roofline_tables(results)))
    return out


# What each suite measures and each lever is, for the generated page (no figures: those come
# from the run the page is generated from).
SUITE_NOTES = {
    "Speed of every variant": "Training and evaluation sentences/s of each CRENER variant (and W2NER) on "
    "Resume training sentences with random weights, in the profile's batches.",
    "Peak memory against sentence length": "One training step, then one evaluation forward, on synthetic "
    "sentences of each length, each point in a fresh process: the peak above the process's size before "
    "the step (CPU: the resettable peak-RSS mark; CUDA: peak allocation).",
    "Speed levers, each on and off": "Each lever flipped from the default, one fresh process per point "
    "(so each peak resident memory is its own). Repeated runs of one point differ by up to about 10 %, "
    "so small differences between rows are noise.",
    "Roofline: each op group against this machine's peaks": "The machine's peaks, then one profiled "
    "training and evaluation step on the median batch (crener/tools/roofline.py says how time, FLOPs and "
    "bytes are attributed).",
}
LEVER_NOTES = {
    "fixed batch of 12 sentences": "instead of the cell budget (`train.max_cells`): length-sorted buckets "
    "filled up to B·N² cells, buckets shuffled, so one long sentence does not pad a whole batch to N².",
    "evaluation batches of 200k cells": "instead of small evaluation batches (`runtime.eval_max_cells`): "
    "evaluation has no backward pass to amortise, and small grids stay in cache.",
    "bf16 autocast, library dilated convs": "bf16 autocast without space-to-batch dilated convolutions "
    "(`runtime.space_to_batch`; compare with the bf16 autocast row): in bf16 CPU training, dilated depthwise "
    "convolutions run as undilated ones over interleaved sub-grids, because oneDNN's dilated backward pass "
    "in bf16 is several times slower. In fp32 the library's own is the faster and is used. Exact (tested). "
    "It matters only where the dilated-conv kernel does not run: `runtime.fused_conv` off, on a GPU, or without "
    "a C compiler.",
    "library dilated convs, GELU, masks and concatenation apart": "instead of the fused dilated-conv group "
    "(`runtime.fused_conv`): every rate's depthwise 3x3 conv in one C kernel (crener/dconv.c, built on first "
    "use) that reads each cell's neighbourhood once for all rates and taps and writes straight into its slice "
    "of the concatenated output with GELU applied, and a backward pass that keeps nothing grid-sized (on CPU "
    "in fp32, also in bf16-autocast training; chained rates, W2NER's, one call a rate; elsewhere GELU and the "
    "masks as one op around the library's convs). Exact up to summation order (tested).",
    "concatenated grid input (eq. 7 as written)": "instead of the split grid input (`runtime.grid_input`): "
    "the 1x1 convolution is linear, so only the CLN grid goes through the large matmul while the "
    "distance, region and attention inputs reach the grid through small projected tables. Exact (tested).",
    "factored grid input": "`runtime.grid_input=factored`: avoids the CLN grid too. Exact (tested).",
    "uniform-draw dropout": "`model.fast_dropout`: the predictor's grid dropouts as uniforms compared "
    "with p, with a 1-byte mask. Same law; off by default: on quick Resume runs (ten seeds each) its F1 "
    "was lower, not significantly, so it is not shown harmless.",
    "bf16 autocast": "`train.bf16`: on in `paper` (a GPU profile), `auto` in `full` (on where this "
    "machine's bf16 matmuls measure at least twice its fp32 ones); on CPU it pays only where the CPU has "
    "fast bf16 matmuls (see the roofline's peaks).",
    "large tensors on the malloc heap": "`runtime.heap_tensors` (glibc): keep freed grids mapped for reuse "
    "instead of paying page faults on every new large tensor.",
    "checkpointed rounds": "`runtime.checkpoint_rounds`: recompute each convolution round in the backward "
    "pass, trading time for memory, in every batch; by default (`runtime.checkpoint_above`) only batches "
    "of sentences longer than 256 characters are checkpointed.",
}


def _check_page(page: str) -> None:
    """A page path that can be written (its folder is made if missing)."""
    if Path(page).is_dir():
        raise DataError("is a folder: name the page's file in it, e.g. performance.md", page)
    check_folder(Path(page).parent, "--page")


RESULT_KEYS = ("machine", "threads")  # what every `crener bench --json` result has


def read_results(path: str) -> dict[str, Any]:
    """The results of an earlier ``crener bench --json`` (or ``--page``) run, checked to be one."""
    text = read_text(path, "a JSON file")
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg}, column {exc.colno})", path, exc.lineno) from None
    lacks = [k for k in RESULT_KEYS if not isinstance(results, dict) or k not in results]
    if lacks:
        raise DataError(
            f"not the results of crener bench (no {', '.join(lacks)}): pass the .json that "
            "`crener bench --json` printed or `--page` wrote beside its page",
            path,
        )
    return results


def _write_page(results: dict[str, Any], page: str) -> None:
    """``page`` (Markdown) and its results beside it as JSON (same name, ``.json``), each whole."""
    path = Path(page)
    if path.suffix != ".json":
        write_atomic(path.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
    write_atomic(path, render_page(results, results.get("command", "crener bench")))
    log.info("wrote %s and its JSON", path)


def render_page(results: dict[str, Any], command: str) -> str:
    """The generated performance page (reports/performance.md) from one bench run's results."""
    m = results.get("machine") or {}
    lines = [
        "# Performance: speed, memory and the roofline",
        "",
        f"Generated by `{command}` (do not edit: rerun it). Every figure below comes from that one run "
        f"and holds for its machine only: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{results['threads']} torch threads{', GPU ' + m['gpu'] if m.get('gpu') else ''}, torch "
        f"{m.get('torch', '?')}, commit `{str(m.get('commit', '?'))[:7]}`, {m.get('date', '?')}. "
        "Compare rows of one run, never figures across machines.",
    ]
    for title, body in _sections(results):
        lines += ["", f"## {title}", "", SUITE_NOTES.get(title, ""), "", body]
        if title.startswith("Speed levers"):
            lines += ["", "The levers:", ""]
            lines += [f"- **{name}**: {note}" for name, note in LEVER_NOTES.items()]
    return "\n".join(lines).rstrip() + "\n"


def _levers_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    default = {
        (r["width"], r["model"]): r for r in rows if r["lever"] == next(iter(LEVERS)) and "error" not in r
    }
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["width"], r["model"], r["lever"], "error: " + r["error"], "", "", "", ""])
            continue
        ref = default.get((r["width"], r["model"]))
        ratio = f"{ref['train_ms_per_sentence'] / r['train_ms_per_sentence']:.2f}x" if ref else ""
        table.append([r["width"], r["model"], r["lever"], f"{r['train_sent_per_s']:.1f}", f"{r['eval_sent_per_s']:.1f}",
                      f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['sentences_per_batch']:.1f}", ratio])  # fmt: skip
    headers = ["widths", "model", "lever", "train sent/s", "eval sent/s", "peak RSS GiB", "sent/batch",
               "train speed vs default"]  # fmt: skip
    return tabulate(table, headers, tablefmt="github", disable_numparse=True)
