"""``--time-budget MINUTES``: what a run reaches in so many minutes on the machine at hand.

The minutes become a step count before the run is keyed. A probe builds the run's parts
(:func:`crener.train.build_parts`), times a few optimiser steps and one dev evaluation, and the
plan keeps the profile's epochs, capping each at the steps that fit (``train.max_steps``). The
resolved steps are part of the run's identity (a slower machine gets fewer: another experiment);
the minutes are recorded with the run as ``runtime.time_budget``, which is not.

The budget B covers the whole command: the probe itself (its one-off costs, such as loading the
encoder and, for a frozen one, encoding every sentence, which the run then finds cached), one dev
evaluation an epoch (e each), the final dev and test evaluation (e_end), and the training steps
(s each)::

    steps = floor((B - probe - e_end - epochs * e) / s),  split evenly over the epochs

When an epoch has fewer batches than its share, the run takes whole epochs of every batch (each
with its evaluation), as many as fit. Times are measured, so a plan holds for this machine and load only.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crener.config import RunConfig
from crener.errors import CrenerError

log = logging.getLogger(__name__)

PROBE_WARMUP, PROBE_STEPS = 2, 6  # untimed steps (allocator, kernel choice), then timed ones


@dataclass(frozen=True)
class Costs:
    """Measured seconds: the probe, one optimiser step, one dev evaluation, the final evaluations."""

    probe: float
    step: float
    dev_eval: float
    end_eval: float
    batches_per_epoch: int


def plan_steps(minutes: float, epochs: int, costs: Costs, *, what: str = "") -> tuple[int, int]:
    """``(epochs, steps per epoch)`` that fit ``minutes`` (the module docstring's rule); ``what``
    names the budget in the error (default ``--time-budget MINUTES``), e.g. a cell's share of one."""
    budget = minutes * 60 - costs.probe - costs.end_eval
    total = math.floor((budget - epochs * costs.dev_eval) / costs.step)
    if total < epochs:
        need = costs.probe + costs.end_eval + epochs * (costs.dev_eval + costs.step)
        raise CrenerError(
            f"{what or f'--time-budget {minutes:g}'}: too short here: the probe took {costs.probe:.0f} s, an "
            f"evaluation takes {costs.dev_eval:.1f} s and a step {costs.step:.2f} s, so {epochs} epochs "
            f"need at least {math.ceil(need / 60)} min"
        )
    if total // epochs <= costs.batches_per_epoch:
        return epochs, total // epochs
    # Each epoch's share is more than its batches: whole epochs of every batch, as many as fit
    # (at least ``epochs``, since ``epochs`` of them fit with time to spare).
    whole = math.floor(budget / (costs.dev_eval + costs.batches_per_epoch * costs.step))
    return whole, costs.batches_per_epoch


def measure(cfg: RunConfig) -> Costs:
    """Time ``cfg``'s run here: set-up, PROBE_STEPS steps after PROBE_WARMUP, one dev evaluation."""
    import numpy as np

    from crener.data.batching import training_batches
    from crener.evaluation import evaluate
    from crener.train import build_optimisation, build_parts, prepare_process, train_one_epoch

    started = time.perf_counter()
    # The run's own process settings (threads, allocator, seed, device) and optimisation ([UNK]
    # replacement included), so the probe times the steps the run will take.
    device = prepare_process(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(cfg, cfg.runtime.data_root, Path(tmp), device)
    lengths = [e.n for e in parts.train_examples]
    batches = training_batches(lengths, cfg.train, np.random.default_rng([cfg.train.seed, 1]))
    opt = build_optimisation(cfg, parts)

    def steps(chosen: list[list[int]]) -> float:
        t0 = time.perf_counter()
        train_one_epoch(parts.model, parts.task, parts.train_examples, chosen, opt.optimizer, opt.scheduler,
                        device, cfg, epoch=1, unk_probs=opt.unk_probs, unk_id=parts.tokenizer.unk_id)  # fmt: skip
        return time.perf_counter() - t0

    steps(batches[:PROBE_WARMUP])
    timed = batches[PROBE_WARMUP : PROBE_WARMUP + PROBE_STEPS] or batches[:PROBE_STEPS]
    step = steps(timed) / len(timed)
    t0 = time.perf_counter()
    evaluate(parts.model, parts.task, parts.dev, device, cfg)
    dev_eval = time.perf_counter() - t0
    test_share = len(parts.test.sentences) / max(len(parts.dev.sentences), 1)
    # The end evaluates the best checkpoint on dev again, then on test.
    return Costs(time.perf_counter() - started, step, dev_eval, dev_eval * (1 + test_share), len(batches))


def apply_budget(cfg: RunConfig, minutes: float) -> RunConfig:
    """``cfg`` with its steps fixed to fit ``minutes`` here (and ``runtime.time_budget`` recorded)."""
    if not minutes > 0:
        raise CrenerError(f"--time-budget {minutes:g}: must be > 0 minutes")
    costs = measure(cfg)
    epochs, per_epoch = plan_steps(minutes, cfg.train.epochs, costs)
    log.info(
        "--time-budget %g min: probe %.1f s, a step %.3f s, a dev evaluation %.1f s -> %d epochs of at most "
        "%d steps (%d batches an epoch)", minutes, costs.probe, costs.step, costs.dev_eval, epochs, per_epoch,
        costs.batches_per_epoch,
    )  # fmt: skip
    return cfg.with_overrides(
        {"train.epochs": epochs, "train.max_steps": per_epoch, "runtime.time_budget": float(minutes)}
    )
