"""Load a trained checkpoint (:mod:`crener.checkpoint`) and use it: score a dataset split, or
tag raw text."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crener.checkpoint import load_checkpoint
from crener.config import RunConfig
from crener.data.schema import Sentence
from crener.data.split import merge_predictions, split_blind
from crener.device import resolve_device
from crener.encoder import CharTokenizer
from crener.errors import CheckpointError, DataError
from crener.evaluation import build_split, evaluate, featurize, predict_examples
from crener.files import read_text
from crener.tasks import Task
from crener.train import build_parts

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    cfg: RunConfig
    model: nn.Module
    task: Task
    tokenizer: CharTokenizer
    types: tuple[str, ...]
    shift: float = 0.0  # decision-threshold shift chosen on dev (model.calibrate)


def load_for_inference(path: str | Path, device: str = "cpu") -> Loaded:
    state = load_checkpoint(Path(path))
    cfg = RunConfig.from_flat(json.loads(state["config"]))
    parts = build_parts(cfg, None, None, torch.device(device), checkpoint=state)
    try:
        parts.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored configuration: {exc}") from exc
    shift = float(state.get("threshold_shift", 0.0))
    return Loaded(cfg, parts.model.eval(), parts.task, parts.tokenizer, tuple(state["types"]), shift)


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, split: str = "test",
                        data_root: str | None = None, whole_split: bool = False) -> dict[str, Any]:  # fmt: skip
    """Scores of the checkpoint on ``split``. Test (and MSRA's lineage dev, which is test) is
    scored on the checkpoint profile's fixed sample (``data.test_limit``), the sentences its
    training run reported, unless ``whole_split``; train and dev always whole. The result says
    how many sentences were scored (``sentences``), of how many (``split_sentences``), and
    whether they are a ``sample``."""
    from crener.data.datasets import get_spec, load_dataset

    loaded = load_for_inference(path)
    cfg = loaded.cfg
    name = dataset or cfg.data.dataset
    # The sample applies to test, and to a dev that is test (no dev split, lineage protocol).
    sampled = split == "test" or (
        split == "dev" and "dev" not in get_spec(name).files and cfg.data.msra_protocol == "lineage"
    )
    root = data_root or cfg.runtime.data_root
    data_cfg = dataclasses.replace(
        cfg.data, dataset=name,
        train_limit=0, eval_limit=0, test_limit=cfg.data.test_limit if sampled and not whole_split else 0,
    )  # fmt: skip
    data = load_dataset(data_cfg, seed=cfg.train.seed, data_root=root)
    sentences = getattr(data, split)
    total = len(sentences)
    if data_cfg.test_limit > 0:  # the same split, unsampled (files are read once per process)
        total = len(
            getattr(
                load_dataset(
                    dataclasses.replace(data_cfg, test_limit=0), seed=cfg.train.seed, data_root=root
                ),
                split,
            )
        )
    sample = len(sentences) < total
    if sample:
        log.info(
            "scoring %d of %d %s sentences: the fixed sample (data.test_limit=%d) the checkpoint's "
            "profile scores; --whole-split scores them all",
            len(sentences), total, split, data_cfg.test_limit,
        )  # fmt: skip
    unknown = {e.type for s in sentences for e in s.entities} - set(loaded.types)
    if unknown:  # types come from train + dev; the model cannot predict these: scored as misses
        log.warning(
            "split %s of %s has types the checkpoint never saw (counted as misses): %s",
            split, data_cfg.dataset, sorted(unknown),
        )  # fmt: skip
    device = resolve_device("auto")
    loaded.model.to(device)
    ev = build_split(split, sentences, cfg.data.max_len, loaded.task, loaded.tokenizer)
    scores, _ = evaluate(loaded.model, loaded.task, ev, device, cfg, loaded.shift)
    return {
        "checkpoint": str(path), "dataset": data_cfg.dataset, "split": split,
        "sentences": len(sentences), "split_sentences": total, "sample": sample, **scores.to_dict(),
    }  # fmt: skip


TEXT_HINT = "if it is plain text (one sentence a line), pass --format text"


def read_inputs(source: str, fmt: str = "auto") -> list[Sentence]:
    """Raw text (one sentence a line, any length) or a CoNLL file (gold tags are ignored)."""
    if source == "-":
        if sys.stdin is None or sys.stdin.isatty():
            # Nothing is piped in: reading the terminal would wait, silently, for typed text.
            raise DataError(
                "no input: pass a text or CoNLL file (crener predict --checkpoint C input.txt), "
                "or pipe text in (echo 张三在北京工作 | crener predict --checkpoint C)"
            )
        text, name = sys.stdin.read(), "<stdin>"
    else:
        text, name = read_text(source, "an input file"), source
    lines = text.splitlines()
    looks_conll = all(len(ln.split()) == 2 and len(ln.split()[0]) == 1 for ln in lines if ln.strip())
    guessed = fmt == "auto" and looks_conll and any(ln.strip() for ln in lines)
    if fmt == "conll" or guessed:
        from crener.data.readers import read_conll

        if source == "-":
            raise DataError("CoNLL input must be a file, not stdin" + (f"; {TEXT_HINT}" if guessed else ""))
        try:
            sentences = list(read_conll(source).sentences)
        except DataError as exc:
            if guessed:
                raise DataError(
                    f"{exc}; read as CoNLL because every line looks like 'character tag': {TEXT_HINT}"
                ) from exc
            raise
        if guessed:
            log.warning(
                "%s looks like CoNLL (every line is a character and a tag): read as CoNLL, "
                "sentences separated by blank lines, tags ignored; %s",
                name, TEXT_HINT,
            )  # fmt: skip
        return sentences
    sentences = [Sentence(tuple(ln), (), name, i) for i, ln in enumerate(lines, 1) if ln.strip()]
    if not sentences:
        log.warning("%s has no text to tag (no non-blank line)", name)
    return sentences


class Predictor:
    """Tags sentences of any length: long ones are split (data.max_len) and merged back."""

    def __init__(self, loaded: Loaded, device: str = "auto"):
        self.loaded = loaded
        self.device = resolve_device(device)
        loaded.model.to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Predictor:
        return cls(load_for_inference(path))

    def predict(self, sentences: Iterable[Sentence]) -> Iterator[dict[str, Any]]:
        sentences = list(sentences)
        chunks = split_blind(sentences, self.loaded.cfg.data.max_len)
        examples = featurize(chunks, self.loaded.task, self.loaded.tokenizer)
        preds = predict_examples(
            self.loaded.model, self.loaded.task, examples, self.device, self.loaded.cfg, self.loaded.shift
        )
        merged = merge_predictions(chunks, preds, len(sentences))
        for s, ents in zip(sentences, merged):
            yield {
                "text": s.text,
                "line": s.line,
                "entities": [
                    {
                        "start": e.start,
                        "end": e.end,
                        "type": e.type,
                        "text": e.text(s.chars),
                        **({} if e.is_contiguous else {"indices": list(e.indices)}),
                    }
                    for e in sorted(ents)
                ],  # fmt: skip
            }
