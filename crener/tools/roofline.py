"""``crener bench --suite roofline``: how close each part of a step runs to what this machine can do.

In one process: this machine's peaks (fp32 and bf16 matmul GFLOP/s at grid-like shapes, memory
bandwidth from a large copy), then one training step and one evaluation step of each model at
each width preset, profiled:

- time per op group (encoder, context layer, grid input + 1x1 conv, dilated convs, enhancement,
  predictor, loss, decode, optimiser, data/collate, other) from ``torch.profiler``: every event's
  *self* time goes to the innermost group scope it ran in; a backward op goes to the group of the
  forward op that created it (the autograd sequence number links the two);
- dense FLOPs per group from ``torch.utils.flop_counter`` (matmuls, convolutions, attention)
  over the forward pass, where its module tracking is exact; a training step counts three times
  that, the rule for matmuls and convolutions (the input's and the weights' gradients each cost
  one forward). Counting the backward pass under the same tracker put CRENER's backward ops under
  several modules (its groups summed to twice the counter's own total), and its formula for a
  convolution's backward ignores groups (a depthwise one would count as dense);
- bytes read per group: the sizes of every leaf op's tensor inputs, a lower bound on its traffic
  (writes and cache misses are not counted), for the groups that are bandwidth-bound.

Figures are this machine's only: compare the rows of one run, never across machines.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from crener.device import best_seconds, matmul_gflops, sync, timings

# Direct children of a grid or sequence model -> op group; "grid.dconv" is nested in "grid" and
# wins for its own ops. A child not listed lands in "other" (tests/test_roofline.py checks that
# every child of the registered grid models is listed).
GROUP_OF_CHILD = {
    "encoder": "encoder",
    "emb_dropout": "context",
    "proj": "context",
    "transformer": "context",
    "lstm": "context",
    "grid": "grid input + 1x1 conv",
    "grid.dconv": "dilated convs",
    "subj": "enhancement",
    "obj": "enhancement",
    "tag_proj": "enhancement",
    "enhance": "enhancement",
    "predictor": "predictor",
}
GROUPS = ("encoder", "context", "grid input + 1x1 conv", "dilated convs", "enhancement", "predictor", "loss",
          "decode", "optimiser", "data/collate", "other")  # fmt: skip
# Groups whose work is mostly elementwise or memory movement: their fraction is of the bandwidth.
MEMORY_BOUND = {"loss", "decode", "optimiser", "data/collate", "other"}
SCOPE = "group::"


# --------------------------------------------------------------------------------------------
# machine peaks


def copy_bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """Bytes read plus written per second by a large tensor copy."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: dst.copy_(src), reps) / 1e9


def machine_peaks() -> dict[str, float]:
    return {
        "fp32_gflops": matmul_gflops(torch.float32),
        "bf16_gflops": matmul_gflops(torch.bfloat16),
        "bandwidth_gbs": copy_bandwidth_gbs(),
    }


# --------------------------------------------------------------------------------------------
# attribution


def module_groups(model: nn.Module) -> dict[str, nn.Module]:
    """``{group-qualified path: module}`` for the children :data:`GROUP_OF_CHILD` names."""
    out = {}
    for path in GROUP_OF_CHILD:
        mod: nn.Module | None = model
        for part in path.split("."):
            mod = getattr(mod, part, None) if mod is not None else None
        if isinstance(mod, nn.Module):
            out[path] = mod
    return out


@contextmanager
def group_scopes(model: nn.Module) -> Iterator[None]:
    """Profiler scopes ``group::<group>`` around the forward of every grouped child."""
    handles, stack = [], []
    for path, mod in module_groups(model).items():
        name = SCOPE + GROUP_OF_CHILD[path]

        def enter(_m, _args, name=name):  # noqa: ANN001, ANN202
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            stack.append(rf)

        def leave(_m, _args, _out):  # noqa: ANN001, ANN202
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _group_of_scope(event) -> str | None:  # noqa: ANN001 - torch FunctionEvent
    while event is not None:
        if event.name.startswith(SCOPE):
            return event.name[len(SCOPE) :]
        event = event.cpu_parent
    return None


def _evaluate_function(event):  # noqa: ANN001, ANN202 - the autograd node an event ran under
    while event is not None:
        if event.name.startswith("autograd::engine::evaluate_function"):
            return event
        event = event.cpu_parent
    return None


# Ops that make views or allocate without reading their inputs' data: no traffic of their own.
NO_DATA = {"aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::expand", "aten::permute",
           "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
           "aten::alias", "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_like",
           "aten::empty_strided", "aten::resize_", "aten::unbind", "aten::split", "aten::chunk",
           "aten::narrow", "aten::reshape", "aten::flatten", "aten::unflatten", "aten::diagonal"}  # fmt: skip


# Bytes per element by the profiler's C++ type names (the rest: 4, the common float).
ITEM_BYTES = {"double": 8, "long int": 8, "long": 8, "float": 4, "int": 4, "c10::BFloat16": 2, "c10::Half": 2,
              "short int": 2, "bool": 1, "unsigned char": 1, "signed char": 1}  # fmt: skip


def _input_bytes(event) -> int:  # noqa: ANN001
    if event.name in NO_DATA:
        return 0
    total = 0
    for shape, dtype in zip(event.input_shapes or (), getattr(event, "input_dtypes", None) or ()):
        if shape and dtype and isinstance(shape, list | tuple) and all(isinstance(d, int) for d in shape):
            total += int(np.prod(shape)) * ITEM_BYTES.get(dtype, 4)
    return total


def attribute_profile(events) -> dict[str, dict[str, float]]:  # noqa: ANN001 - profiler EventList
    """``{group: {"seconds", "bytes"}}`` from a profiler's events (self times, so nothing counts twice)."""
    seq_group: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            g = _group_of_scope(e)
            if g is not None:
                seq_group.setdefault(e.sequence_nr, g)
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"seconds": 0.0, "bytes": 0.0})
    for e in events:
        group = _group_of_scope(e)
        if group is None:
            node = _evaluate_function(e)
            group = seq_group.get(node.sequence_nr, "other") if node is not None else "other"
        out[group]["seconds"] += e.self_cpu_time_total / 1e6
        if not e.cpu_children:
            out[group]["bytes"] += _input_bytes(e)
    return dict(out)


def flops_by_group(counts: dict[str, dict[Any, int]], root: str, train: bool) -> dict[str, float]:
    """Dense FLOPs per group from ``FlopCounterMode.get_flop_counts()`` of a forward pass, whose
    entry for a module path counts its descendants' ops too (``root`` is the model's class name
    there); ``train``: three times that, forward and backward (the module docstring says why)."""

    def total(path: str) -> float:
        return sum(counts.get(path, {}).values()) * (3 if train else 1)

    out: dict[str, float] = defaultdict(float)
    for path, group in GROUP_OF_CHILD.items():
        out[group] += total(f"{root}.{path}")
    out[GROUP_OF_CHILD["grid"]] -= total(f"{root}.grid.dconv")  # counted in grid's entry too
    out["other"] = max(total("Global") - sum(out.values()), 0.0)
    return {g: v for g, v in out.items() if v > 0}


# --------------------------------------------------------------------------------------------
# one step, profiled


def _median_batch(lengths: list[int], cfg) -> list[int]:  # noqa: ANN001 - RunConfig
    """The batch of median size (B * N^2 cells) among the batches training would make."""
    from crener.data.batching import batch_cells, training_batches

    batches = training_batches(lengths, cfg.train, np.random.default_rng(0))
    cells = [batch_cells(b, lengths) for b in batches]
    return batches[int(np.argsort(cells, kind="stable")[len(cells) // 2])]


def profile_step(cfg, phase: str, n_sentences: int, peaks: dict[str, float], reps: int = 3) -> dict[str, Any]:  # noqa: ANN001
    """Time, FLOPs and the per-group profile of one ``phase`` ("train" or "eval") step of ``cfg``
    on the median batch of ``n_sentences`` Resume training sentences."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from torch.utils.flop_counter import FlopCounterMode

    from crener.data.batching import collate
    from crener.device import autocast, resolve_device
    from crener.tools.workload import sample_parts

    if phase not in ("train", "eval"):
        raise ValueError(f"phase {phase!r}: train or eval")
    train = phase == "train"
    device = resolve_device(cfg.runtime.device)
    parts = sample_parts(cfg, n_sentences, device)
    task, model, examples = parts.task, parts.model.train(train), parts.train_examples
    idx = _median_batch([e.n for e in examples], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def make_batch():  # noqa: ANN202 - crener.data.batching.Batch
        return collate([examples[i] for i in idx], task.target if train else "none", task.num_labels).to(
            device
        )

    def step() -> None:
        with record_function(SCOPE + "data/collate"):
            batch = make_batch()
        if train:
            with autocast(device, cfg.train.bf16):
                out = model(batch)
            with record_function(SCOPE + "loss"):
                loss = task.loss(out, batch)["loss"]
            loss.backward()
            with record_function(SCOPE + "optimiser"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast(device, cfg.train.bf16):
                out = model(batch)
                with record_function(SCOPE + "decode"):
                    task.decode(out, batch)
        sync(device)

    def forward_flops() -> dict[str, float]:
        # The forward pass only (see flops_by_group); its graph is freed on return, before the
        # profiled step, whose allocations (and so its groups' time shares) it would change.
        batch = make_batch()
        with (
            FlopCounterMode(display=False) as counter,
            torch.inference_mode(not train),
            autocast(device, cfg.train.bf16),
        ):
            out = model(batch)
            if train:
                task.loss(out, batch)
            else:
                task.decode(out, batch)
        return flops_by_group(counter.get_flop_counts(), type(model).__name__, train)

    seconds = statistics.median(timings(step, reps))
    flops = forward_flops()
    with group_scopes(model), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    attributed = attribute_profile(prof.events())
    profiled = sum(v["seconds"] for v in attributed.values()) or 1e-12
    peak = peaks["bf16_gflops"] if cfg.train.bf16 else peaks["fp32_gflops"]
    groups = []
    for name in GROUPS:
        share = attributed.get(name, {}).get("seconds", 0.0) / profiled
        gflop = flops.get(name, 0.0) / 1e9
        if share == 0 and gflop == 0:
            continue
        t = share * seconds  # the unprofiled step's time, split by the profiled shares
        gbs = attributed.get(name, {}).get("bytes", 0.0) / 1e9 / t if t > 0 else 0.0
        rate = gflop / t if t > 0 else 0.0
        groups.append({
            "group": name, "share": share, "ms": 1000 * t, "gflop": gflop, "gflops": rate,
            "fraction_of_peak": rate / peak if peak else 0.0, "read_gbs": gbs,
            "fraction_of_bandwidth": gbs / peaks["bandwidth_gbs"] if peaks["bandwidth_gbs"] else 0.0,
            "bound": "memory" if name in MEMORY_BOUND or gflop == 0 else "compute",
        })  # fmt: skip
    lengths = [examples[i].n for i in idx]
    total = sum(flops.values()) / 1e9
    return {
        "phase": phase,
        "sentences": len(idx),
        "max_length": max(lengths),
        "cells": len(idx) * max(lengths) ** 2,
        "step_ms": 1000 * seconds,
        "sent_per_s": len(idx) / seconds,
        "dense_gflop": total,
        "dense_gflops": total / seconds,
        "fraction_of_fp32_peak": total / seconds / peaks["fp32_gflops"],
        "groups": groups,
    }


def run_roofline(
    widths: list[str], models: list[str], n_sentences: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The peaks, then every (width, model, phase) step, in this process."""
    import logging

    from crener.tools.workload import bench_config

    log = logging.getLogger(__name__)
    peaks = machine_peaks()
    log.info("peaks: %s", {k: round(v, 1) for k, v in peaks.items()})
    steps = []
    for width in widths:
        for model in models:
            cfg = bench_config(width, model, "full", overrides)
            for phase in ("train", "eval"):
                r = profile_step(cfg, phase, n_sentences, peaks)
                steps.append({"model": model, "variant": "full", "widths": width, **r})
                log.info("roofline %s %s %s: %.1f sent/s, %.1f%% of the fp32 peak", width, model, phase,
                         r["sent_per_s"], 100 * r["fraction_of_fp32_peak"])  # fmt: skip
    return {"peaks": peaks, "steps": steps}


def roofline_tables(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    p = result["peaks"]
    out = [f"peaks: fp32 matmul {p['fp32_gflops']:.1f} GFLOP/s, bf16 matmul {p['bf16_gflops']:.1f} GFLOP/s, "
           f"copy bandwidth {p['bandwidth_gbs']:.1f} GB/s"]  # fmt: skip
    for s in result["steps"]:
        out.append(
            f"{s['widths']} {s['model']} {s['variant']} {s['phase']}: {s['sentences']} sentences of up to "
            f"{s['max_length']} characters, {s['step_ms']:.0f} ms a step ({s['sent_per_s']:.1f} sent/s), "
            f"{s['dense_gflop']:.2f} dense GFLOP at {s['dense_gflops']:.1f} GFLOP/s = "
            f"{100 * s['fraction_of_fp32_peak']:.1f}% of the fp32 matmul peak"
        )
        rows = [[g["group"], f"{100 * g['share']:.1f}", f"{g['ms']:.1f}", f"{g['gflop']:.3f}", f"{g['gflops']:.1f}",
                 f"{100 * g['fraction_of_peak']:.1f}", f"{g['read_gbs']:.1f}", f"{100 * g['fraction_of_bandwidth']:.1f}"]
                for g in s["groups"]]  # fmt: skip
        headers = [
            "group",
            "time %",
            "ms",
            "GFLOP",
            "GFLOP/s",
            "% of matmul peak",
            "GB/s read",
            "% of bandwidth",
        ]
        out.append(tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    return "\n\n".join(out)
