"""Predict and score a split: what training (dev every epoch, test once), ``crener evaluate``,
``crener predict`` and ``crener bench`` share.

An evaluation split is cut blind to its gold (:func:`crener.data.split.split_blind`), predicted
chunk by chunk under the evaluation cell budget, merged back and scored on the original
sentences (:mod:`crener.metrics`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crener.config import RunConfig
from crener.data.batching import Example, collate, make_batches
from crener.data.schema import Entity, Sentence
from crener.data.split import Chunk, merge_predictions, split_blind
from crener.encoder import CharTokenizer
from crener.errors import CrenerError
from crener.metrics import Scores, score
from crener.tasks import Task

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrenerError(f"runtime.device={name} but CUDA is not available; use runtime.device=cpu")
    return device


# Where bf16 matmuls run at least this many times faster than fp32 ones, `train.bf16=auto` picks
# bf16: on CPUs with AMX the whole step then runs well above its fp32 speed, while where bf16
# matmuls are emulated (slower than fp32) every bf16 step is slower.
BF16_MIN_MATMUL_RATIO = 2.0


@functools.cache
def bf16_pays(device_name: str = "auto") -> bool:
    """Whether bf16 autocast should be used on ``runtime.device`` (what ``train.bf16=auto`` means).

    CUDA: if the device supports bf16. CPU: if bf16 matmuls at the grid's shapes measure at least
    :data:`BF16_MIN_MATMUL_RATIO` times the fp32 rate, in this process (about a second, once).
    """
    device = resolve_device(device_name)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    from crener.roofline import matmul_gflops

    shapes = ((16384, 512, 96), (4096, 512, 512))
    fp32 = matmul_gflops(torch.float32, shapes, reps=3)
    bf16 = matmul_gflops(torch.bfloat16, shapes, reps=3)
    pays = bf16 >= BF16_MIN_MATMUL_RATIO * fp32
    log.info(
        "train.bf16=auto: bf16 matmuls at %.1fx fp32 on this CPU: %s", bf16 / fp32, "bf16" if pays else "fp32"
    )
    return pays


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Split:
    """One evaluation split: original sentences, their chunks and featurised examples."""

    name: str
    sentences: list[Sentence]
    chunks: list[Chunk]
    examples: list[Example]


def featurize(chunks: Sequence[Chunk], task: Task, tokenizer: CharTokenizer) -> list[Example]:
    out = []
    for k, chunk in enumerate(chunks):
        s = chunk.sentence
        ids = np.asarray(tokenizer.encode(s.chars), dtype=np.int64)
        out.append(Example(index=k, token_ids=ids, targets=task.featurize(s.entities, len(s)), n=len(s)))
    return out


def build_split(
    name: str, sentences: list[Sentence], max_len: int, task: Task, tokenizer: CharTokenizer
) -> Split:
    """An evaluation split, cut blind to its gold (crener.data.split): its examples carry no
    targets, and its gold is only read when scoring against the original sentences."""
    chunks = split_blind(sentences, max_len)
    return Split(name, sentences, chunks, featurize(chunks, task, tokenizer))


# Decision-threshold shifts of the diagnostic (logit units; positive = more positive cells).
THRESHOLD_SHIFTS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0)


@torch.inference_mode()
def predict_shifted(
    model: nn.Module, task: Task, examples: Sequence[Example], device: torch.device, cfg: RunConfig,
    shifts: Sequence[float] = (0.0,),
) -> dict[float, list[set[Entity]]]:  # fmt: skip
    """Predicted entities per example (chunk), in example order, for each decision-threshold shift:
    one forward pass a batch, one decode a shift (``task.shifted``; 0 decodes the outputs as they are)."""
    model.eval()
    preds = {d: [set() for _ in examples] for d in shifts}
    lengths = [e.n for e in examples]
    for idx in make_batches(lengths, max_cells=cfg.runtime.eval_max_cells, batch_size=cfg.train.batch_size):
        batch = collate([examples[i] for i in idx], "none", task.num_labels).to(device)
        with autocast(device, cfg.train.bf16):
            outputs = model(batch)
        for d in shifts:
            moved = outputs if d == 0 else task.shifted(outputs, d, task.target)
            for i, entities in zip(idx, task.decode(moved, batch)):
                preds[d][i] = entities
    return preds


def predict_examples(
    model: nn.Module, task: Task, examples: Sequence[Example], device: torch.device, cfg: RunConfig,
    shift: float = 0.0,
) -> list[set[Entity]]:  # fmt: skip
    """Predicted entities per example (chunk), in example order, decoded with the decision
    threshold moved by ``shift`` (a calibrated checkpoint's, see :func:`calibrate`)."""
    return predict_shifted(model, task, examples, device, cfg, (shift,))[shift]


def score_split(split: Split, chunk_preds: Sequence[set[Entity]]) -> tuple[Scores, list[set[Entity]]]:
    """Scores on the original (unsplit) sentences of ``split``, and the per-sentence predictions."""
    preds = merge_predictions(split.chunks, chunk_preds, len(split.sentences))
    gold = [set(s.entities) for s in split.sentences]
    return score(gold, preds), preds


def evaluate(
    model: nn.Module, task: Task, split: Split, device: torch.device, cfg: RunConfig, shift: float = 0.0
):  # fmt: skip
    """Scores on the original (unsplit) sentences, and the per-sentence predictions."""
    return score_split(split, predict_examples(model, task, split.examples, device, cfg, shift))


def shifted_scores(
    model: nn.Module, task: Task, split: Split, device: torch.device, cfg: RunConfig,
    shifts: Sequence[float] = THRESHOLD_SHIFTS,
) -> dict[float, Scores]:  # fmt: skip
    """Scores of ``split`` with every decision threshold moved by each shift (``predict_shifted``).

    F1 at the best shift far above F1 at 0 means the model ranks entity cells above the rest but
    is not calibrated yet; both at 0 means it has learned nothing. Grid tasks only."""
    per_shift = predict_shifted(model, task, split.examples, device, cfg, shifts)
    return {d: score_split(split, p)[0] for d, p in per_shift.items()}


# Candidate shifts of `model.calibrate`: finer than the diagnostic's near 0, where the best shift of
# a trained model lies, and bounded above because a large shift floods the decoder with candidates.
CALIBRATION_SHIFTS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def calibrate(
    model: nn.Module, task: Task, split: Split, device: torch.device, cfg: RunConfig,
    shifts: Sequence[float] = CALIBRATION_SHIFTS,
) -> tuple[float, Scores]:  # fmt: skip
    """The decision-threshold shift with the best F1 on ``split`` (dev; ties go to the smallest
    move), and its scores: one forward pass, one decode a shift. Grid tasks only."""
    per_shift = shifted_scores(model, task, split, device, cfg, shifts)
    best = max(per_shift, key=lambda d: (per_shift[d].micro.f1, -abs(d)))
    return float(best), per_shift[best]
