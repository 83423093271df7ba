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

from torch import nn

from crener.checkpoint import load_checkpoint, rebuild_encoder
from crener.config import RunConfig
from crener.data.schema import Sentence
from crener.data.split import merge_predictions, split_blind
from crener.encoder import CharTokenizer
from crener.errors import CheckpointError, DataError
from crener.evaluation import build_split, evaluate, featurize, predict_examples, resolve_device
from crener.registry import build_model, build_task
from crener.tasks import Task

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
    types = tuple(state["types"])
    task = build_task(cfg.model, types)
    encoder, tokenizer = rebuild_encoder(state, cfg.model.last4_mean)
    model = build_model(cfg.model, task, encoder)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored configuration: {exc}") from exc
    shift = float(state.get("threshold_shift", 0.0))
    return Loaded(cfg, model.to(device).eval(), task, tokenizer, types, shift)


def evaluate_checkpoint(path: str | Path, *, dataset: str | None = None, split: str = "test",
                        data_root: str | None = None) -> dict[str, Any]:  # fmt: skip
    from crener.data.datasets import load_dataset

    loaded = load_for_inference(path)
    cfg = loaded.cfg
    data_cfg = dataclasses.replace(
        cfg.data, dataset=dataset or cfg.data.dataset, data_root=data_root or cfg.data.data_root,
        train_limit=0, eval_limit=0,
    )  # fmt: skip
    data = load_dataset(data_cfg, seed=cfg.train.seed)
    unknown = {e.type for s in getattr(data, split) for e in s.entities} - set(loaded.types)
    if unknown:  # types come from train + dev; the model cannot predict these: scored as misses
        log.warning(
            "split %s of %s has types the checkpoint never saw (counted as misses): %s",
            split, data_cfg.dataset, sorted(unknown),
        )  # fmt: skip
    device = resolve_device("auto")
    loaded.model.to(device)
    ev = build_split(split, getattr(data, split), cfg.data.max_len, loaded.task, loaded.tokenizer)
    scores, _ = evaluate(loaded.model, loaded.task, ev, device, cfg, loaded.shift)
    return {"checkpoint": str(path), "dataset": data_cfg.dataset, "split": split, **scores.to_dict()}


def read_inputs(source: str, fmt: str = "auto") -> list[Sentence]:
    """Raw text (one sentence a line, any length) or a CoNLL file (gold tags are ignored)."""
    if source == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        p = Path(source)
        try:
            text, name = p.read_text(encoding="utf-8"), str(p)
        except FileNotFoundError as exc:
            raise DataError("input file not found", path=source) from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 ({exc.reason} at byte {exc.start})", path=source) from exc
    lines = text.splitlines()
    looks_conll = all(len(ln.split()) == 2 and len(ln.split()[0]) == 1 for ln in lines if ln.strip())
    if fmt == "conll" or (fmt == "auto" and looks_conll and any(ln.strip() for ln in lines)):
        from crener.data.readers import read_conll

        if source == "-":
            raise DataError("CoNLL input must be a file, not stdin")
        return list(read_conll(source).sentences)
    return [Sentence(tuple(ln), (), name, i) for i, ln in enumerate(lines, 1) if ln.strip()]


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
