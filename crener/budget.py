"""``--time-budget MINUTES``: what a run reaches in so many minutes on the machine at hand.

The minutes become a step count before the run is keyed. A probe times what the run will do, on
its own config and data, and the plan keeps the profile's epochs, capping each at the steps that
fit (``train.max_steps``). The resolved steps are part of the run's identity (a slower machine gets
fewer: another experiment); the minutes are recorded with the run as ``runtime.time_budget``,
which is not.

The budget B covers the whole command, every second of it measured here (:func:`measure`):

- T0, the time the command had spent before the probe: for ``crener train`` from the start of its
  process (interpreter, imports, argument checks; :func:`process_started`). ``crener reproduce``
  and ``crener tune`` take theirs, with their probes, off the minutes before they share them out
  (experiments/budget_plan.py, experiments/tune.py), so their runs plan with T0 = 0;
- P, the probe itself (it pays the one-off costs: lazy imports, files hashed and parsed once a
  process, an encoder's first load);
- u, the run's own set-up after the probe: the probe builds the run's parts a second time and
  times that build (:func:`crener.train.build_parts` and the optimiser, the data's digest), which
  repeats exactly what the run repeats; tracked, also the store's lookups and the writes that
  start the run;
- s, one optimiser step, the mean of steps sampled across the epoch's batch sizes (fixed-size
  batches of long and short sentences cost very differently), plus its share of a learning-start
  curve row where ``runtime.eval_every`` asks for them. The machine's speed wanders over tens of
  seconds, so steps are timed until they fill :data:`PROBE_WINDOW_S` (at most
  :data:`PROBE_MAX_STEPS`), not for the few seconds six steps take;
- e, an epoch's dev scoring (:func:`crener.train.calibrate_on_dev`, calibrated where
  ``model.calibrate``);
- c, an epoch's other costs: its batches drawn, its training pass's own start (a data loader's
  workers), its checkpoints (both the last and the best, as an improving epoch writes them) and,
  tracked, its metrics' write;
- f, the end: :func:`crener.train.final_test` run as the run runs it (the best checkpoint loaded,
  dev scored at every threshold shift, test scored, the result files written) and, tracked, the
  writes that log the summary and upload the files.

::

    steps = floor((B - T0 - P - u - f - epochs * (e + c)) / s),  split evenly over the epochs

When an epoch has fewer batches than its share, the run takes whole epochs of every batch (each
with its evaluation and checkpoints), as many as fit: ``floor((B - T0 - P - u - f) / (e + c +
batches * s))``. A tracked run's store costs are one measured write (a write that changes nothing)
times the writes it makes (:func:`crener.tracking.run_store_writes`). No safety margin is added:
each term is an exact repeat of the run's work or bounds it from above (every epoch writes both
checkpoints), and what is left unmeasured, the interpreter's exit, takes well under a second.
A frozen encoder's features are cached for the whole process (``train.caches_features``): a sentence
is encoded the first time it is seen, so the probe times its steps, the dev scoring and the end a
second time, as the run meets them, and counts in u the encoding of the training sentences it has
not seen (per sentence: its steps' first pass less their second). Times are measured, so a plan
holds for this machine and load only.

A cell that runs beside others (``crener reproduce --jobs``) runs slower than it does alone: the
cores share their caches and memory. ``beside`` names the configs of the cells it will run beside:
a process for each trains that config's steps while the probe times everything after its one-off
costs (reports/decisions.md has what this changed), so each term is what a cell pays beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crener.config import RunConfig
from crener.errors import CrenerError

log = logging.getLogger(__name__)

PROBE_WARMUP, PROBE_STEPS = 2, 6  # untimed steps (allocator, kernel choice), then timed ones
# Steps are timed until they fill this many seconds, as many as this at most (the first six give
# the step's size): six steps of a few seconds sampled a machine whose speed drifts.
PROBE_WINDOW_S, PROBE_MAX_STEPS = 30.0, 40
BESIDE_READY_S = 600.0  # the neighbours' set-up (an encoder loaded, data read) must end within this


@dataclass(frozen=True)
class Costs:
    """Measured seconds of one run's parts, named as in the module docstring's formula."""

    probe: float  # P
    step: float  # s
    dev_eval: float  # e
    end_eval: float  # f
    batches_per_epoch: int
    before: float = 0.0  # T0 (0 where the budget's clock starts with the probe)
    setup: float = 0.0  # u
    epoch: float = 0.0  # c

    @property
    def fixed(self) -> float:
        """What the run pays once, whatever its steps: T0 + P + u + f."""
        return self.before + self.probe + self.setup + self.end_eval

    @property
    def per_epoch(self) -> float:
        """What each epoch pays besides its steps: e + c."""
        return self.dev_eval + self.epoch


def plan_steps(minutes: float, epochs: int, costs: Costs, *, what: str = "") -> tuple[int, int]:
    """``(epochs, steps per epoch)`` that fit ``minutes`` (the module docstring's rule); ``what``
    names the budget in the error (default ``--time-budget MINUTES``), e.g. a cell's share of one."""
    budget = minutes * 60 - costs.fixed
    total = math.floor((budget - epochs * costs.per_epoch) / costs.step)
    if total < epochs:
        need = costs.fixed + epochs * (costs.per_epoch + costs.step)
        raise CrenerError(
            f"{what or f'--time-budget {minutes:g}'}: too short here: {costs.before:.0f} s spent before "
            f"the probe, the probe took {costs.probe:.0f} s, the run's set-up takes {costs.setup:.1f} s and "
            f"its end {costs.end_eval:.1f} s, an epoch's evaluation and checkpoints "
            f"{costs.per_epoch:.1f} s and a step {costs.step:.2f} s, so {epochs} epochs need at least "
            f"{math.ceil(need / 60)} min"
        )
    if total // epochs <= costs.batches_per_epoch:
        return epochs, total // epochs
    # Each epoch's share is more than its batches: whole epochs of every batch, as many as fit
    # (at least ``epochs``, since ``epochs`` of them fit with time to spare).
    whole = math.floor(budget / (costs.per_epoch + costs.batches_per_epoch * costs.step))
    return whole, costs.batches_per_epoch


def process_started() -> float | None:
    """When this process started, on :func:`time.time`'s clock: from the kernel's record where there
    is one (Linux's ``/proc``), else when crener's command line was loaded (``crener.cli.LOADED``),
    else None (then nothing before the probe is counted)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            # Split after the command's name, which is in parentheses and may hold spaces.
            fields = fh.read().rsplit(")", 1)[1].split()
        # Field 22 (the 20th after the name): clock ticks from boot to the process's start.
        after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - after_boot)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no CLOCK_BOOTTIME
        return getattr(sys.modules.get("crener.cli"), "LOADED", None)


def since(started: float | None) -> float:
    """Seconds since ``started`` (:func:`time.time`'s clock); 0 for None."""
    return max(time.time() - started, 0.0) if started is not None else 0.0


def spread_sample(batches: Sequence[Sequence[int]], lengths: Sequence[int], k: int) -> list[int]:
    """Positions of ``k`` of ``batches`` spread over their sizes, in epoch order: ranked by grid
    cells (B * N_max^2), the middle one of each of ``k`` equal strata, so their mean time is the
    epoch's mean (cell-budget batches cost about the same, fixed-size ones do not); all of them
    when there are no more than ``k``."""
    from crener.data.batching import batch_cells

    if len(batches) <= k:
        return list(range(len(batches)))
    ranked = sorted(range(len(batches)), key=lambda i: (batch_cells(batches[i], lengths), i))
    return sorted(ranked[(2 * j + 1) * len(batches) // (2 * k)] for j in range(k))


def measure(
    cfg: RunConfig,
    *,
    started: float | None = None,
    experiment: str | None = None,
    folder: str | Path | None = None,
    beside: Sequence[RunConfig] = (),
) -> Costs:
    """Time ``cfg``'s run here: the module docstring's terms.

    ``started``: when the budget's clock started (:func:`time.time`; None: with this probe).
    ``experiment``: the MLflow experiment the run will log to (None: an untracked run, no store
    costs). ``folder``: where the run will write (its runs folder or workdir): the probe writes in
    a temporary folder beside it, so checkpoints are timed on the run's file system (None: the
    system's temporary folder). ``beside``: the configs whose steps other processes train while the
    run is timed, one process each (the cells a plan runs beside it).
    """
    clock = time.perf_counter()
    before = since(started)
    parent = _writable_parent(folder)
    with (
        tempfile.TemporaryDirectory(prefix="crener-probe-", dir=parent) as tmp,
        _beside(beside, parent) as ready,
    ):
        _set_up(cfg, Path(tmp) / "first")  # the one-off costs; dropped to free its memory
        ready()  # the neighbours set up while the one-off costs were paid: now they train
        t0 = time.perf_counter()
        parts, opt, device = _set_up(cfg, Path(tmp) / "run")  # a fresh folder: the encoder is built again
        setup = time.perf_counter() - t0
        write, (start_writes, end_writes) = 0.0, (0, 0)
        if experiment is not None:
            reads, write = _store_costs(cfg, experiment)
            from crener.tracking import run_store_writes

            start_writes, end_writes = run_store_writes(cfg)
            setup += reads + start_writes * write
        step, epoch, batches, encode = _time_steps(cfg, parts, opt, device)
        setup += encode
        if cfg.runtime.eval_every:
            step += (_time_curve_row(cfg, parts, device) + write) / cfg.runtime.eval_every
        dev_eval, epoch_end, end = _time_epoch_and_end(cfg, parts, opt, device, Path(tmp) / "run")
    return Costs(
        probe=time.perf_counter() - clock, step=step, dev_eval=dev_eval, end_eval=end + end_writes * write,
        batches_per_epoch=batches, before=before, setup=setup, epoch=epoch + epoch_end + write,
    )  # fmt: skip


def _writable_parent(folder: str | Path | None) -> Path | None:
    """``folder`` or its nearest existing parent, if it can be written: on the file system the run
    writes to, with nothing made that the run would not make (None: the system's temporary folder)."""
    if folder is None:
        return None
    path = Path(folder).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path if os.access(path, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def _beside(configs: Sequence[RunConfig], parent: Path | None) -> Iterator[Callable[[], None]]:
    """A process for each of ``configs`` that trains its steps until the block ends; yields a call
    that waits until every one of them has set up and trains (nothing to wait for without configs)."""
    if not configs:
        yield lambda: None
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state shared with ours
    stop, ready = ctx.Event(), [ctx.Event() for _ in configs]
    procs = [
        ctx.Process(target=_train_beside, args=(cfg, str(parent or ""), r, stop), daemon=True)
        for cfg, r in zip(configs, ready, strict=True)
    ]
    for proc in procs:
        proc.start()

    def wait() -> None:
        deadline = time.monotonic() + BESIDE_READY_S
        for cfg, proc, r in zip(configs, procs, ready, strict=True):
            while not r.wait(1.0):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise CrenerError(
                        f"--time-budget: a process training {cfg.label} beside the probe "
                        f"{'failed' if not proc.is_alive() else 'did not start'} (exit code {proc.exitcode}); "
                        "its error is above. Run the cells one at a time (--jobs 1) to plan without neighbours"
                    )

    try:
        yield wait
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _train_beside(cfg: RunConfig, parent: str, ready: Any, stop: Any) -> None:
    """A neighbour (:func:`_beside`): ``cfg``'s run set up in a folder of its own, then its batches
    trained in epoch order, round and round, until ``stop``. A constant learning rate: it may take
    more steps than the run's schedule holds."""
    import numpy as np
    import torch

    from crener.data.batching import training_batches

    with tempfile.TemporaryDirectory(prefix="crener-probe-beside-", dir=parent or None) as tmp:
        parts, opt, device = _set_up(cfg, Path(tmp))
        constant = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda _: 1.0)
        lengths = [e.n for e in parts.train_examples]
        batches = training_batches(lengths, cfg.train, np.random.default_rng([cfg.train.seed, 2]))
        ready.set()
        step = 0
        while not stop.is_set():
            _run_steps(cfg, parts, opt, device, [batches[step % len(batches)]], scheduler=constant)
            step += 1


def _run_steps(
    cfg: RunConfig, parts: Any, opt: Any, device: Any, chosen: list[list[int]], scheduler: Any = None
) -> float:
    """Seconds of one training pass over ``chosen`` batches, as the run trains them (``scheduler``:
    the run's, unless another is given)."""
    from crener.train import train_one_epoch

    t0 = time.perf_counter()
    train_one_epoch(parts.model, parts.task, parts.train_examples, chosen, opt.optimizer,
                    scheduler or opt.scheduler, device, cfg, epoch=1, unk_probs=opt.unk_probs,
                    unk_id=parts.tokenizer.unk_id)  # fmt: skip
    return time.perf_counter() - t0


def _set_up(cfg: RunConfig, workdir: Path) -> tuple[Any, Any, Any]:
    """``(parts, optimisation, device)``: what :func:`crener.train.fit` sets up before its first
    step, in ``workdir``."""
    from crener import train
    from crener.data.digest import dataset_digest
    from crener.identity import run_key

    # The run's own process settings (threads, allocator, seed, device) and optimisation ([UNK]
    # replacement included), so the probe times the steps the run will take.
    device = train.prepare_process(cfg)
    run_key(cfg, data_digest=dataset_digest(cfg.data, cfg.runtime.data_root))
    parts = train.build_parts(cfg, cfg.runtime.data_root, workdir, device)
    return parts, train.build_optimisation(cfg, parts), device


def _store_costs(cfg: RunConfig, experiment: str) -> tuple[float, float]:
    """``(lookups, one write)`` on the tracking store: the lookups a tracked run repeats before it
    starts (a client, its key's runs, its experiment, made if missing as the run would), timed the
    second time so the store's one-off opening is left out, and one write."""
    from crener.identity import run_key
    from crener.tracking import Tracker

    def lookups() -> tuple[Tracker, str]:
        tracker = Tracker()
        tracker.find_runs(run_key(cfg))
        return tracker, tracker.experiment_id(experiment)

    lookups()
    t0 = time.perf_counter()
    tracker, exp_id = lookups()
    reads = time.perf_counter() - t0
    return reads, tracker.time_one_write(exp_id)


def _time_steps(cfg: RunConfig, parts: Any, opt: Any, device: Any) -> tuple[float, float, int, float]:
    """``(a step, an epoch's batching and training-pass start, batches an epoch, encoding once each
    training sentence the probe did not)``: PROBE_STEPS of the first epoch's batches spread over their
    sizes (:func:`spread_sample`), after PROBE_WARMUP others; then, spread the same way, as many more
    as fill PROBE_WINDOW_S of steps in all (at most PROBE_MAX_STEPS)."""
    import numpy as np

    from crener.data.batching import training_batches

    def run(chosen: list[list[int]]) -> float:
        return _run_steps(cfg, parts, opt, device, chosen)

    def timed(chosen: list[list[int]]) -> tuple[float, float]:
        """``(first pass, the pass a step costs)``: a frozen encoder encodes a sentence the first time
        it is seen and then reads its cached features, so there the second pass is the step's cost
        and the difference is paid once a sentence."""
        first = run(chosen)
        return first, (run(chosen) if cfg.train.caches_features else first)

    lengths = [e.n for e in parts.train_examples]
    t0 = time.perf_counter()
    batches = training_batches(lengths, cfg.train, np.random.default_rng([cfg.train.seed, 1]))
    batching = time.perf_counter() - t0
    sample = spread_sample(batches, lengths, PROBE_STEPS)
    others = sorted(set(range(len(batches))) - set(sample))
    warm = [batches[i] for i in (others or sample)[:PROBE_WARMUP]]
    run(warm)
    # A training pass's own start (model.train(), a data loader's worker processes): once an epoch.
    start = run([])
    chosen = [batches[i] for i in sample]
    first, steps = timed(chosen)
    sentences = sum(len(b) for b in chosen)
    per_sentence_encode = max(first - steps, 0.0) / max(sentences, 1)
    # More steps, spread over the sizes the same way, until they fill the window.
    pilot = max((steps - start) / max(len(sample), 1), 1e-6)
    want = min(PROBE_MAX_STEPS, math.ceil(PROBE_WINDOW_S / pilot))
    extra = [others[j] for j in spread_sample([batches[i] for i in others], lengths, want - len(sample))]
    total, count = steps - start, len(sample)
    if extra:
        total += timed([batches[i] for i in extra])[1] - start
        count += len(extra)
    # Per sentence, for those the probe has not encoded (its warm-up's and its samples').
    encoded = {s for b in [*warm, *chosen, *(batches[i] for i in extra)] for s in b}
    encode_left = per_sentence_encode * max(len(parts.train_examples) - len(encoded), 0)
    # At least a microsecond: the plan divides by it, and timing noise may eat a tiny step.
    return max(total / count, 1e-6), batching + start, len(batches), encode_left


def _time_curve_row(cfg: RunConfig, parts: Any, device: Any) -> float:
    """Seconds of one learning-start curve row (``runtime.eval_every``), taken as the run takes it."""
    from crener.train import curve_recorder

    on_step = curve_recorder(cfg, parts, device, [], cfg.runtime.eval_every - 1, None)
    t0 = time.perf_counter()
    on_step(0.0)  # the eval_every-th step: a row
    return time.perf_counter() - t0


def _time_epoch_and_end(
    cfg: RunConfig, parts: Any, opt: Any, device: Any, workdir: Path
) -> tuple[float, float, float]:
    """``(dev scoring, checkpoints, the end)`` as the run's epoch and end run them, in ``workdir``."""
    from crener.train import Progress, calibrate_on_dev, final_test, save_epoch_checkpoints

    metrics = {"train/loss": 0.0, "train/sentences_per_s": 0.0, "epoch_seconds": 0.0}
    shift, dev_eval = _as_the_run_meets_it(cfg, lambda: calibrate_on_dev(cfg, parts, device, metrics))
    progress = Progress()
    improved = progress.record(1, metrics, shift)
    t0 = time.perf_counter()
    ckpt_dir = workdir / "checkpoints"
    save_epoch_checkpoints(cfg, "probe", parts, opt, device, 1, progress, ckpt_dir, improved=improved)
    checkpoints = time.perf_counter() - t0
    _, end = _as_the_run_meets_it(
        cfg, lambda: final_test(cfg, workdir, "probe", parts, device, progress, time.perf_counter())
    )
    return dev_eval, checkpoints, end


def _as_the_run_meets_it(cfg: RunConfig, work: Callable[[], Any]) -> tuple[Any, float]:
    """``(work(), its seconds)`` as the run will pay them. Through the feature cache (process-wide,
    so the run finds what the probe encoded) the probe's first call encodes dev or test in its own
    seconds: there the call is timed a second time."""
    for _ in range(2 if cfg.train.caches_features else 1):
        t0 = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - t0
    return out, seconds


def apply_budget(
    cfg: RunConfig, minutes: float, *, started: float | None = None, experiment: str | None = None,
    folder: str | Path | None = None,
) -> RunConfig:  # fmt: skip
    """``cfg`` with its steps fixed to fit ``minutes`` here (and ``runtime.time_budget`` recorded);
    ``started``, ``experiment`` and ``folder`` as :func:`measure` takes them."""
    if not minutes > 0:
        raise CrenerError(f"--time-budget {minutes:g}: must be > 0 minutes")
    costs = measure(cfg, started=started, experiment=experiment, folder=folder)
    epochs, per_epoch = plan_steps(minutes, cfg.train.epochs, costs)
    log.info(
        "--time-budget %g min: %.1f s before the probe, the probe %.1f s, the run's set-up %.1f s, a step "
        "%.3f s, an epoch's evaluation %.1f s and other costs %.2f s, the end %.1f s -> %d epochs of at most "
        "%d steps (%d batches an epoch)", minutes, costs.before, costs.probe, costs.setup, costs.step,
        costs.dev_eval, costs.epoch, costs.end_eval, epochs, per_epoch, costs.batches_per_epoch,
    )  # fmt: skip
    return with_plan(cfg, {"epochs": epochs, "max_steps": per_epoch, "share_minutes": float(minutes)})


# Saved plans. Probe timings are noisy, and the steps enter the run key: planned afresh, a rerun
# of the same command would get other steps, so another key, and train again from the start
# instead of resuming (or finding the run finished). So a plan is measured once and saved as a
# small JSON file under ``<runs-dir>/<profile>/.budgets/``, named by the run's key before the
# budget, the minutes, the machine (crener.device.machine_label) and the command that planned it.

PLAN_DIR_NAME = ".budgets"


def plan_path(
    cfg: RunConfig, minutes: float, machine: str, runs_dir: str | Path | None = None, *,
    command: str = "reproduce", workdir: str | Path | None = None,
) -> Path:  # fmt: skip
    """Where the plan of ``cfg`` (before its budget) for ``minutes`` on ``machine`` is saved.
    ``command``: ``"reproduce"`` (a plan's share; its digests predate the others, so they are kept)
    or ``"train"`` (``crener train --time-budget``: the whole command's minutes). A run in a
    ``workdir`` of its own (``--no-track --workdir``) keeps its plans there."""
    from crener.identity import run_key
    from crener.workspace import resolve_runs_dir

    name = [run_key(cfg), float(minutes), machine] + ([] if command == "reproduce" else [command])
    digest = hashlib.sha256(json.dumps(name).encode()).hexdigest()[:20]
    folder = Path(workdir) if workdir is not None else resolve_runs_dir(runs_dir) / cfg.profile
    return folder / PLAN_DIR_NAME / f"{digest}.json"


def read_plan(path: Path) -> dict[str, Any] | None:
    """The saved plan at ``path``; None where there is none (or the file is not a plan)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        int(entry["epochs"]), int(entry["max_steps"]), float(entry["share_minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry


def with_plan(cfg: RunConfig, entry: dict[str, Any]) -> RunConfig:
    """``cfg`` with a plan's steps and the minutes it was planned for."""
    return cfg.with_overrides({
        "train.epochs": int(entry["epochs"]), "train.max_steps": int(entry["max_steps"]),
        "runtime.time_budget": float(entry["share_minutes"]),
    })  # fmt: skip
