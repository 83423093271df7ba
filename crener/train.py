"""Training loop shared by CRENER and every baseline (method.md §4, §5).

``fit(cfg, workdir)`` is the whole protocol: seed, load and split the data, build (or load)
the encoder, train with AdamW (separate encoder and head learning rates, linear warm-up and
decay, clipping), evaluate dev after every epoch, keep the best-dev checkpoint, evaluate test
once with it, and write everything a report needs into ``workdir``. A checkpoint is written
after each epoch; ``resume=True`` continues from it to exactly the result of an uninterrupted
run (model, optimiser, scheduler and RNG states are restored; the data order of an epoch is a
pure function of (seed, epoch)). No tracking library is imported here: a callback receives
the per-epoch metrics. Predicting and scoring a split live in :mod:`crener.evaluation`, the
checkpoint format in :mod:`crener.checkpoint`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crener import registry
from crener.checkpoint import (
    CHECKPOINT_VERSION,
    encoder_state,
    load_checkpoint,
    rebuild_encoder,
    save_checkpoint,
)
from crener.config import ModelConfig, RunConfig
from crener.data.batching import Example, collate, training_batches
from crener.data.datasets import load_dataset
from crener.data.digest import dataset_digest
from crener.data.schema import Entity, Sentence
from crener.data.split import Chunk, split_all
from crener.device import BF16_MIN_MATMUL_RATIO, autocast, bf16_pays, resolve_device
from crener.encoder import (
    EMBEDDED,
    CharEncoder,
    CharTokenizer,
    build_embedded_encoder,
    feature_cache,
    load_pretrained,
    replace_with_unk,
    unk_rates,
    vectors_path,
)
from crener.errors import CheckpointError, CrenerError
from crener.evaluation import (
    THRESHOLD_SHIFTS,
    Split,
    build_split,
    calibrate,
    evaluate,
    featurize,
    shifted_scores,
)
from crener.files import write_atomic
from crener.identity import run_key
from crener.registry import build_model, build_task
from crener.tasks import Task

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# set-up helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_large_tensors_on_heap(enabled: bool = True) -> bool:
    """Serve large allocations from the malloc heap and keep freed memory mapped (glibc only).

    glibc hands every block above its mmap threshold (at most 32 MiB, so every big grid tensor)
    a fresh ``mmap`` and unmaps it on free, so each new (B, N, N, d) tensor pays page faults on
    first touch (a large ``zeros`` took over twice as long, measured when written). Turning
    mmap off for malloc (M_MMAP_MAX = 0) and trimming off lets freed grids be reused. Raising
    only the mmap threshold, tried first, does nothing for tensors above its 32 MiB cap. The
    price is fragmentation: the heap's high-water mark is the peak, and with batches of very
    different sizes it grows (see ``runtime.heap_tensors`` for why it is off by default).
    Process-wide and idempotent; returns whether it took effect (False off glibc, e.g. macOS or
    musl).
    """
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # -1: never trim, so the high-water mark of a long batch stays mapped for the next one
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    return ok


def embedded_encoder_key(chars: Sequence[str], model: ModelConfig, seed: int) -> str:
    """Short hash of an embedded encoder's inputs: vocabulary characters, widths and seed."""
    inputs = {
        "chars": "".join(sorted(set(chars))),
        "widths": [model.embedded_hidden, model.embedded_layers, model.embedded_heads, model.embedded_ff],
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(inputs, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def load_encoder(
    cfg: RunConfig, train_sentences: Sequence[Sentence], workdir: Path
) -> tuple[CharEncoder, CharTokenizer]:
    """The embedded default (built from the training characters into workdir) or a checkpoint.

    The embedded encoder's directory is keyed by everything it is built from, so a reused
    workdir never hands an encoder built for other data, widths or seed to a new run.
    """
    name = cfg.model.encoder
    if name == EMBEDDED:
        chars = sorted({c for s in train_sentences for c in s.chars})
        out_dir = workdir / f"encoder-{embedded_encoder_key(chars, cfg.model, cfg.train.seed)}"
        name = build_embedded_encoder(chars, cfg.model, out_dir, seed=cfg.train.seed)
    bert, tokenizer = load_pretrained(name)
    encoder = CharEncoder(bert, cfg.model.last4_mean)
    encoder.source = str(name)  # where the weights came from (keys the frozen-feature cache)
    return encoder, tokenizer


@dataclass
class RunParts:
    """What a run trains and scores: its data, task, encoder, features and model.

    ``data``, ``dev`` and ``test`` are None where :func:`build_parts` read no data (a checkpoint's
    model) or built only a sample of training examples (the measuring tools)."""

    data: Any  # crener.data.datasets.DatasetSplits
    task: Task
    encoder: CharEncoder
    tokenizer: CharTokenizer
    train_examples: list[Example]
    dev: Split | None
    test: Split | None
    model: nn.Module


def build_parts(
    cfg: RunConfig,
    data_root: str | None,
    workdir: Path | None,
    device: torch.device,
    *,
    sample: Callable[[list[Sentence]], list[Chunk]] | None = None,
    data: Any = None,
    checkpoint: dict[str, Any] | None = None,
) -> RunParts:
    """The one setup of a run: data, task, encoder (built into ``workdir``), features and model on
    ``device``. Seed first: the model's initialisation draws.

    Two variants share it, so a task and an encoder are built in one place only:

    - ``sample`` (the measuring tools): only the training chunks it picks from the training
      sentences are featurised, no dev or test; the model's draws are seeded with ``train.seed``
      just before it is built, and it gets none of training's initialisation (character vectors,
      prior biases, a frozen encoder), so it costs what a fresh model costs. ``data`` is a dataset
      in hand (a synthetic one) instead of ``cfg.data`` read from ``data_root``.
    - ``checkpoint`` (a loaded checkpoint's state; inference): its labels and encoder, no data;
      the caller loads its weights into ``model``.
    """
    if checkpoint is not None:
        data, types = None, tuple(checkpoint["types"])
    else:
        data = data if data is not None else load_dataset(cfg.data, seed=cfg.train.seed, data_root=data_root)
        types = data.types
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)  # once the data reads: a bad file leaves no run folder
    task = build_task(cfg.model, types)
    if checkpoint is not None:
        encoder, tokenizer = rebuild_encoder(checkpoint, cfg.model.last4_mean)
    else:
        encoder, tokenizer = load_encoder(cfg, data.train, workdir)
    train_examples, dev, test = build_features(cfg, data, task, tokenizer, sample)
    if sample is not None:
        torch.manual_seed(cfg.train.seed)  # the embedded encoder's build moved the generator
    model = build_model(cfg.model, task, encoder, cfg.runtime)
    parts = RunParts(data, task, encoder, tokenizer, train_examples, dev, test, model)
    if checkpoint is None and sample is None:
        prepare_for_training(cfg, parts, data_root, device)
    parts.model = parts.model.to(device)
    return parts


def build_features(
    cfg: RunConfig, data: Any, task: Task, tokenizer: CharTokenizer, sample: Callable | None = None
) -> tuple[list[Example], Split | None, Split | None]:
    """Training examples, dev and test of ``data`` (:func:`build_parts`): nothing without data,
    only the training chunks ``sample`` picks with it."""
    if data is None:
        return [], None, None
    if sample is not None:
        return featurize(sample(data.train), task, tokenizer), None, None
    max_len = cfg.data.max_len
    train_examples = featurize(split_all(data.train, max_len), task, tokenizer)
    dev = build_split("dev", data.dev, max_len, task, tokenizer)
    # Under the MSRA lineage protocol dev is the test set; reuse it unless dev was cut shorter.
    same = data.dev_is_test and len(data.dev) == len(data.test)
    test = dev if same else build_split("test", data.test, max_len, task, tokenizer)
    return train_examples, dev, test


def prepare_for_training(
    cfg: RunConfig, parts: RunParts, data_root: str | None, device: torch.device
) -> None:
    """Training's initialisation of a freshly built model, moved to ``device`` (in place)."""
    vectors = vectors_path(cfg.model.char_vectors, data_root)
    if vectors is not None:  # only a family with its own character embeddings reads it (registry.check_model)
        parts.model.init_char_vectors(parts.tokenizer.tokenizer.get_vocab(), vectors)
    parts.model = parts.model.to(device)
    # Only a family that reads the field (so has it in its run key) may act on it.
    if cfg.model.prior_bias and registry.reads(cfg.model.name, "prior_bias"):
        start_from_priors(parts.model, parts.task, parts.train_examples)
    if cfg.train.caches_features:
        # A frozen encoder (or its frozen lower part) is a fixed feature extractor (dropout off): no
        # gradient, no optimiser state, and every distinct sentence encoded once per process,
        # whatever the cell of a sweep.
        top = cfg.train.encoder_top_layers
        parts.encoder.freeze(feature_cache(parts.encoder.source, cfg.model.last4_mean, top), top_layers=top)


def parameter_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """Two learning rates: the (pre)trained encoder, and everything built on top of it."""
    enc, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (enc if name.startswith("encoder.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.train.lr}]
    if enc:
        groups.append({"params": enc, "lr": cfg.train.encoder_lr})
    return groups


def start_from_priors(model: nn.Module, task: Task, examples: Sequence[Example]) -> torch.Tensor | None:
    """Set a model's output biases to the training label priors; returns them (None: nothing to set).

    A grid model's predictor: positive cells are rare (log-odds -4 to -12), so scores that start
    at 0 spend the first hundreds of steps only pushing every cell down (the "all-negative
    plateau"). A softmax tagger's classifier: the tags' log priors (``O`` dominates)."""
    target = getattr(model, "predictor", model)
    if not (hasattr(task, "output_prior") and hasattr(target, "set_output_bias")):
        return None
    prior = task.output_prior([e.targets for e in examples], [e.n for e in examples])
    target.set_output_bias(prior)
    return prior


def unk_replacement_probs(
    examples: Sequence[Example], vocab_size: int, alpha: float, special_ids: Sequence[int]
) -> torch.Tensor | None:
    """Per token id, the probability that fine-tuning feeds ``[UNK]`` instead (``unk_rates``, the rule
    ``crener pretrain`` uses), counted over the training examples; None when ``alpha`` is 0."""
    if alpha <= 0:
        return None
    counts = np.zeros(vocab_size, dtype=np.float64)
    for e in examples:
        counts += np.bincount(e.token_ids[1:-1], minlength=vocab_size)[:vocab_size]
    return unk_rates(counts, alpha, special_ids)


def linear_schedule(total_steps: int, warmup: float):
    warm = int(total_steps * warmup)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


# --------------------------------------------------------------------------------------------
# one epoch, evaluation


def train_one_epoch(
    model: nn.Module,
    task: Task,
    examples: Sequence[Example],
    batches: Sequence[list[int]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    cfg: RunConfig,
    *,
    epoch: int,
    max_steps: int = 0,
    unk_probs: torch.Tensor | None = None,
    unk_id: int = 0,
    on_step: Any = None,
    sync_every: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; ``on_step(loss)`` is called after every optimiser step.

    ``sync_every`` (default: every step on CPU, where ops run synchronously anyway, every
    :data:`DEVICE_SYNC_EVERY` steps on an accelerator) is how often the host waits for the device
    to read the losses: in between, losses and the non-finite check stay on the device, so the
    host queues the next steps without stalling. ``on_step`` then receives the losses of the
    steps since the last read, in order, at the read.
    """
    model.train()
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else DEVICE_SYNC_EVERY
    batches = list(batches)[:max_steps] if max_steps else list(batches)
    total, count, sentences = 0.0, 0, 0
    start = time.perf_counter()
    bar = progress_bar(len(batches), f"epoch {epoch}", cfg.runtime.progress)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read

    def read_pending() -> None:
        nonlocal total, count
        if not pending:
            return
        values = torch.stack([loss for _, loss in pending]).float().cpu()  # one host sync
        for (step, _), value in zip(pending, values.tolist()):
            if not math.isfinite(value):
                raise CrenerError(
                    f"non-finite loss ({value}) at epoch {epoch}, step {step}: lower train.lr / "
                    "train.encoder_lr, or turn off train.bf16; the run was stopped, not saved as a NaN model"
                )
            size = len(batches[step])
            total += value * size
            count += size
            if on_step is not None:
                on_step(value)
        if bar is not None:
            rate = sentences / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{values[-1].item():.4f}", sent_s=f"{rate:.1f}")
            bar.update(len(pending))
        pending.clear()

    for step, batch in enumerate(host_batches(examples, batches, task, cfg.runtime.loader_workers, device)):
        if unk_probs is not None:
            batch.input_ids = replace_with_unk(batch.input_ids, unk_probs, unk_id)
        batch = batch.pin_memory() if device.type == "cuda" and not batch.input_ids.is_pinned() else batch
        batch = batch.to(device)
        with autocast(device, cfg.train.bf16):
            outputs = model(batch)
        terms = task.loss(outputs, batch)
        loss = terms["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
        optimizer.step()
        scheduler.step()
        pending.append((step, loss.detach()))
        sentences += len(batches[step])
        if len(pending) >= sync_every:
            read_pending()
    read_pending()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    # Seconds and steps beside the rate: with batches of varying size the rate alone cannot say
    # how an epoch's time splits between training and scoring dev (what --time-budget plans).
    return {"train/loss": total / max(count, 1), "train/sentences_per_s": sentences / max(seconds, 1e-9),
            "train/seconds": seconds, "train/steps": float(len(batches))}  # fmt: skip


# Steps between two reads of the losses on an accelerator (see train_one_epoch).
DEVICE_SYNC_EVERY = 25


def host_batches(
    examples: Sequence[Example], batches: Sequence[list[int]], task: Task, workers: int, device: torch.device
):  # fmt: skip
    """The collated batches of ``batches``, in order: in this process, or (``workers`` > 0) by a
    ``DataLoader`` whose worker processes collate ahead of the step, pinning memory for CUDA.
    Collation is deterministic, so both give the same batches."""
    collate_fn = functools.partial(collate, target=task.target, num_labels=task.num_labels)
    if workers <= 0:
        for idx in batches:
            yield collate_fn([examples[i] for i in idx])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(
        examples, batch_sampler=[list(b) for b in batches], collate_fn=collate_fn, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        # Its own generator: the workers' base seed would otherwise be drawn from the global
        # torch RNG and move every later dropout draw of the run.
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    yield from loader


# --------------------------------------------------------------------------------------------
# fit


def _call(callback: Any, name: str, *args: Any) -> None:
    fn = getattr(callback, name, None) if callback is not None else None
    if fn is not None:
        fn(*args)


def _entities_json(entities: set[Entity]) -> list[list[Any]]:
    return [[list(e.indices), e.type] for e in sorted(entities)]


def _prf(scores) -> dict[str, float]:  # noqa: ANN001 - metrics.Scores
    return {"precision": scores.micro.precision, "recall": scores.micro.recall, "f1": scores.micro.f1}


@dataclass
class Optimisation:
    """How a run's model is trained: optimiser, schedule, steps an epoch, [UNK] replacement."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    unk_probs: torch.Tensor | None  # per token id (unk_replacement_probs); None: no replacement


@dataclass
class Progress:
    """Where training stands: what the epoch checkpoint restores and the summary reports."""

    history: list[dict[str, float]] = field(default_factory=list)  # one row of metrics an epoch
    curve: list[dict[str, float]] = field(default_factory=list)  # dev F1 every runtime.eval_every steps
    best_f1: float = -1.0
    best_epoch: int = 0
    best_shift: float = 0.0  # threshold shift of the best epoch (model.calibrate)
    start_epoch: int = 1  # the first epoch this process trains (> 1 when resumed)

    def record(self, epoch: int, metrics: dict[str, float], shift: float) -> bool:
        """Add an epoch's metrics; whether its dev F1 is the best so far."""
        improved = metrics["dev/f1"] > self.best_f1
        if improved:
            self.best_f1, self.best_epoch, self.best_shift = metrics["dev/f1"], epoch, shift
        self.history.append({"epoch": epoch, **metrics})
        return improved


def fit(
    cfg: RunConfig,
    workdir: str | Path,
    *,
    callback: Any = None,
    resume: bool = True,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir`` and return the summary (also written to summary.json)."""
    workdir = Path(workdir)
    started = time.perf_counter()
    device = prepare_process(cfg)
    root = cfg.runtime.data_root if data_root is None else data_root
    key = run_key(cfg, data_digest=dataset_digest(cfg.data, root))  # of the files this run reads
    ckpt_dir = workdir / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    # Read before the data, the encoder and the model are built: a damaged checkpoint fails at once.
    resumed = resume_state(last_path, key) if resume and last_path.exists() else None
    parts = build_parts(cfg, root, workdir, device)  # makes workdir once the data reads
    opt = build_optimisation(cfg, parts)
    progress = resume_progress(resumed, parts.model, opt, device) if resumed is not None else Progress()
    announce(cfg, parts, progress, device, callback)
    write_atomic(workdir / "config.json", json.dumps(cfg.flatten(), indent=2, default=list))
    first_step = (progress.start_epoch - 1) * opt.steps_per_epoch
    on_step = curve_recorder(cfg, parts, device, progress.curve, first_step, callback)
    for epoch in range(progress.start_epoch, cfg.train.epochs + 1):
        if stops_early(
            cfg.train.patience, epoch - 1, progress.best_epoch
        ):  # a resumed run stops where it did
            break
        t0 = time.perf_counter()
        metrics = train_epoch(cfg, parts, opt, device, epoch, on_step)
        t1 = time.perf_counter()
        shift = calibrate_on_dev(cfg, parts, device, metrics)
        metrics["dev/seconds"] = time.perf_counter() - t1
        metrics["epoch_seconds"] = time.perf_counter() - t0
        improved = progress.record(epoch, metrics, shift)
        save_epoch_checkpoints(cfg, key, parts, opt, device, epoch, progress, ckpt_dir, improved=improved)
        log.info(
            "epoch %d/%d loss %.4f dev P %.4f R %.4f F1 %.4f%s (%.1fs, train %.1f sent/s)",
            epoch, cfg.train.epochs, metrics["train/loss"], metrics["dev/precision"], metrics["dev/recall"],
            metrics["dev/f1"], " *" if improved else "", metrics["epoch_seconds"], metrics["train/sentences_per_s"],
        )  # fmt: skip
        _call(callback, "on_epoch_end", epoch, metrics)
        if stops_early(cfg.train.patience, epoch, progress.best_epoch):
            log.info("no better dev F1 for %d epochs: stopping after epoch %d", cfg.train.patience, epoch)
    return final_test(cfg, workdir, key, parts, device, progress, started)


def prepare_process(cfg: RunConfig) -> torch.device:
    """Threads, allocator, seeds, then the device; seeded before the bf16 probe and the setup draw."""
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    keep_large_tensors_on_heap(cfg.runtime.heap_tensors)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.runtime.device)
    if cfg.train.bf16 and device.type == "cpu" and not bf16_pays("cpu"):
        log.warning(
            "train.bf16 on a CPU whose bf16 matmuls are not fast (below %.0fx its fp32 rate, measured "
            "now): bf16 slows training here; set train.bf16=false or auto", BF16_MIN_MATMUL_RATIO,
        )  # fmt: skip
    return device


def build_optimisation(cfg: RunConfig, parts: RunParts) -> Optimisation:
    """AdamW over :func:`parameter_groups` with the linear schedule over every step of the run."""
    encoder, tokenizer = parts.encoder, parts.tokenizer
    # [UNK] replacement trains the encoder's [UNK] vector: nothing to train in a frozen encoder.
    unk_probs = None if encoder.frozen else unk_replacement_probs(
        parts.train_examples, int(encoder.bert.config.vocab_size), cfg.train.unk_alpha,
        (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.unk_id),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(parameter_groups(parts.model, cfg), weight_decay=cfg.train.weight_decay)
    # Batch count depends only on lengths and the budget, so the step total is known up front.
    lengths = [e.n for e in parts.train_examples]
    steps_per_epoch = len(training_batches(lengths, cfg.train, np.random.default_rng(0)))
    if cfg.train.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps)
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, cfg.train.warmup))
    return Optimisation(optimizer, scheduler, steps_per_epoch, unk_probs)


def resume_state(last_path: Path, key: str) -> dict[str, Any]:
    """The checkpoint a run resumes from, checked to be this run's; its errors say how to start over."""
    start_over = f"; to start this run over, pass --no-resume (or delete {last_path})"
    try:
        state = load_checkpoint(last_path)
    except CheckpointError as exc:  # a kill or a full disk mid-copy; resuming cannot help
        raise CheckpointError(f"{exc}{start_over}") from exc
    if state.get("key") != key:
        raise CheckpointError(
            f"{last_path} belongs to another configuration (key {state.get('key')}){start_over}"
        )
    return state


def resume_progress(
    state: dict[str, Any], model: nn.Module, opt: Optimisation, device: torch.device
) -> Progress:
    """Restore model, optimiser, schedule and RNG states from an epoch checkpoint's ``state``
    (:func:`resume_state`)."""
    model.load_state_dict(state["model"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    log.info("resuming from the checkpoint of epoch %d", state["epoch"])
    return Progress(
        history=json.loads(state["history"]),
        curve=json.loads(state.get("curve", "[]")),
        best_f1=state["best_f1"],
        best_epoch=state["best_epoch"],
        best_shift=float(state.get("threshold_shift", 0.0)),
        start_epoch=state["epoch"] + 1,
    )


def announce(
    cfg: RunConfig, parts: RunParts, progress: Progress, device: torch.device, callback: Any
) -> None:
    """Log the run's shape and tell the callback: ``on_start``, then the epochs a resumed run replays."""
    task, n_params = parts.task, sum(p.numel() for p in parts.model.parameters())
    n_train, n_dev, n_test = len(parts.train_examples), len(parts.dev.sentences), len(parts.test.sentences)
    info = {
        "num_labels": task.num_labels,
        "labels": list(task.names),
        "parameters": n_params,
        "resumed_from_epoch": progress.start_epoch - 1,
        "train_examples": n_train,
        "dev_sentences": n_dev,
        "test_sentences": n_test,
    }
    log.info(
        "%s/%s on %s: %d train chunks, %d dev, %d test sentences, %d labels, %.2fM parameters, device %s",
        cfg.model.name, cfg.variant, cfg.data.dataset, n_train, n_dev, n_test, task.num_labels, n_params / 1e6,
        device,
    )  # fmt: skip
    _call(callback, "on_start", info)
    for past in progress.history:  # replay, so a logger that missed them (killed process) catches up
        _call(callback, "on_epoch_end", int(past["epoch"]), {k: v for k, v in past.items() if k != "epoch"})


def curve_recorder(
    cfg: RunConfig, parts: RunParts, device: torch.device, curve: list[dict[str, float]], step: int, callback: Any
):  # fmt: skip
    """The ``on_step`` of :func:`train_one_epoch`: every ``runtime.eval_every`` steps (counted from
    ``step``), the mean training loss since the last row and the dev diagnostic, added to ``curve``."""
    state = {"step": step, "losses": []}

    def on_step(loss_value: float) -> None:
        state["step"] += 1
        state["losses"].append(loss_value)
        if not cfg.runtime.eval_every or state["step"] % cfg.runtime.eval_every:
            return
        row = {"step": state["step"], "train/loss": float(np.mean(state["losses"]))}
        row.update(_dev_diagnostic(parts.model, parts.task, parts.dev, device, cfg)[1])
        state["losses"] = []
        curve.append(row)
        parts.model.train()
        log.info(
            "step %d loss %.4f dev F1 %.4f (best shift %+.1f: %.4f)", row["step"], row["train/loss"],
            row["dev/f1"], row["dev/best_shift"], row["dev/f1_best_shift"],
        )  # fmt: skip
        _call(callback, "on_step_eval", row["step"], {k: v for k, v in row.items() if k != "step"})

    return on_step


def train_epoch(
    cfg: RunConfig, parts: RunParts, opt: Optimisation, device: torch.device, epoch: int, on_step: Any
) -> dict[str, float]:
    """Epoch ``epoch`` of the run, its batches a pure function of (seed, epoch) so a resumed run
    trains the same ones."""
    rng = np.random.default_rng([cfg.train.seed, epoch])
    batches = training_batches([e.n for e in parts.train_examples], cfg.train, rng)
    return train_one_epoch(
        parts.model, parts.task, parts.train_examples, batches, opt.optimizer, opt.scheduler, device, cfg,
        epoch=epoch, max_steps=cfg.train.max_steps, unk_probs=opt.unk_probs, unk_id=parts.tokenizer.unk_id,
        on_step=on_step,
    )  # fmt: skip


def calibrate_on_dev(
    cfg: RunConfig, parts: RunParts, device: torch.device, metrics: dict[str, float]
) -> float:
    """Score dev after an epoch, at the threshold shift that is best on it (``model.calibrate``);
    adds ``dev/*`` to ``metrics`` and returns the shift (0 when not calibrated)."""
    shift, dev_scores = _dev_scores(parts.model, parts.task, parts.dev, device, cfg)
    metrics.update({f"dev/{k}": v for k, v in _prf(dev_scores).items()})
    if _calibrates(cfg, parts.task):
        metrics["dev/threshold_shift"] = shift
    return shift


def checkpoint_state(
    cfg: RunConfig, key: str, parts: RunParts, opt: Optimisation, device: torch.device, epoch: int,
    progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    """The epoch checkpoint: everything :func:`resume_progress` and inference read back."""
    return {
        "version": CHECKPOINT_VERSION,
        "key": key,
        "config": json.dumps(cfg.flatten(), default=list),
        "model": parts.model.state_dict(),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "epoch": epoch,
        "history": json.dumps(progress.history),
        "curve": json.dumps(progress.curve),
        "best_f1": progress.best_f1,
        "best_epoch": progress.best_epoch,
        "threshold_shift": progress.best_shift,  # of the best checkpoint; decoders apply it
        "labels": list(parts.task.names),
        "types": list(parts.data.types),
        **encoder_state(parts.encoder, parts.tokenizer),
    }


def save_epoch_checkpoints(
    cfg: RunConfig, key: str, parts: RunParts, opt: Optimisation, device: torch.device, epoch: int,
    progress: Progress, ckpt_dir: Path, *, improved: bool,
) -> None:  # fmt: skip
    """An epoch's checkpoints in ``ckpt_dir``: the last one (what a resumed run continues from) and,
    when the epoch ``improved`` dev F1, the best one, without the optimiser and schedule that only
    resuming reads (what the end and inference load). :mod:`crener.budget` times this too."""
    state = checkpoint_state(cfg, key, parts, opt, device, epoch, progress)
    if improved:
        save_checkpoint(ckpt_dir / "best.pt", {**state, "optimizer": {}, "scheduler": {}})
    save_checkpoint(ckpt_dir / "last.pt", state)


def final_test(
    cfg: RunConfig, workdir: Path, key: str, parts: RunParts, device: torch.device, progress: Progress,
    started: float,
) -> dict[str, Any]:  # fmt: skip
    """Test once, with the best-dev checkpoint (method.md §5); write the predictions, per-type
    scores, history, curve and (last: its presence means finished) the summary, and return it."""
    model, task, dev, test = parts.model, parts.task, parts.dev, parts.test
    best_state = load_checkpoint(workdir / "checkpoints" / "best.pt")
    model.load_state_dict(best_state["model"])
    best_shift = float(best_state.get("threshold_shift", 0.0))
    dev_scores, diagnostic = _dev_diagnostic(model, task, dev, device, cfg, best_shift)
    test_scores, test_preds = evaluate(model, task, test, device, cfg, best_shift)
    history, curve = progress.history, progress.curve
    first_positive = next((int(r["step"]) for r in curve if r["dev/f1"] > 0), None)
    summary = {
        "dev": _prf(dev_scores),
        "test": _prf(test_scores),
        "best_epoch": progress.best_epoch,
        "epochs": cfg.train.epochs,
        "epochs_run": len(history),  # fewer than planned when train.patience stopped the run
        "seconds": (time.perf_counter() - started)
        + sum(h["epoch_seconds"] for h in history[: progress.start_epoch - 1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_labels": task.num_labels,
        "key": key,
        "model": cfg.model.name,
        "variant": cfg.variant,
        "dataset": cfg.data.dataset,
        "profile": cfg.profile,
        "seed": cfg.train.seed,
        "encoder": cfg.model.encoder,
        "dev_is_test": parts.data.dev_is_test,
        # Diagnostic: dev F1 of the best checkpoint with the decision threshold moved (grid models).
        "dev_best_shift": {"shift": diagnostic["dev/best_shift"], "f1": diagnostic["dev/f1_best_shift"]},
        # The shift dev and test were decoded with (model.calibrate; 0 otherwise).
        "threshold_shift": best_shift,
        "first_step_dev_f1_positive": first_positive,  # from the curve (runtime.eval_every), else None
    }
    rows = (
        {"index": i, "text": s.text, "gold": _entities_json(set(s.entities)), "pred": _entities_json(p)}
        for i, (s, p) in enumerate(zip(test.sentences, test_preds))
    )
    write_atomic(
        workdir / "predictions" / "test.jsonl",
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
    )
    write_atomic(workdir / "per_type.json", json.dumps(test_scores.to_dict(), indent=2, ensure_ascii=False))
    write_atomic(workdir / "history.json", json.dumps(history, indent=2))
    if curve:
        write_atomic(workdir / "curve.json", json.dumps(curve, indent=1))
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))  # last: its presence means finished
    return summary


def stops_early(patience: int, epoch: int, best_epoch: int) -> bool:
    """Whether training ends after ``epoch``: ``patience`` > 0 epochs since the best (by dev F1)."""
    return patience > 0 and epoch - best_epoch >= patience


def _calibrates(cfg: RunConfig, task: Task) -> bool:
    return cfg.model.calibrate and hasattr(task, "shifted")  # sequence taggers have no threshold


def _dev_scores(model: nn.Module, task: Task, dev: Split, device: torch.device, cfg: RunConfig):
    """``(shift, dev scores)``: at the calibrated shift (``model.calibrate``), else at 0."""
    if _calibrates(cfg, task):
        return calibrate(model, task, dev, device, cfg)
    return 0.0, evaluate(model, task, dev, device, cfg)[0]


def _dev_diagnostic(
    model: nn.Module, task: Task, dev: Split, device: torch.device, cfg: RunConfig, shift: float = 0.0
):  # fmt: skip
    """Dev scores at the learned thresholds moved by ``shift``, and F1 at the best single shift
    (``shifted_scores``), from one forward pass over dev."""
    if hasattr(task, "shifted"):
        per_shift = shifted_scores(model, task, dev, device, cfg, sorted({*THRESHOLD_SHIFTS, shift}))
    else:  # sequence taggers have no threshold to move
        per_shift = {0.0: evaluate(model, task, dev, device, cfg)[0]}
    f1s = {d: sc.micro.f1 for d, sc in per_shift.items()}
    best = max(f1s, key=lambda d: (f1s[d], -abs(d)))
    return per_shift[shift], {"dev/f1": f1s[shift], "dev/f1_best_shift": f1s[best], "dev/best_shift": best}


def progress_bar(total: int, desc: str, enabled: bool):
    # Only on a terminal: redirected to a file, a bar is thousands of carriage-return lines; the
    # per-epoch log line carries the same loss and speed.
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; stay quiet without it
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
