"""Checkpoints: the file ``fit`` writes and ``crener evaluate``, ``crener predict`` and
``crener migrate`` read.

A checkpoint is self-contained: besides the weights it carries the resolved config, the entity
types, the encoder's architecture (BERT config) and its vocabulary (:func:`encoder_state`), so it
can be evaluated or used for prediction without the run directory or a model hub. It holds
tensors and plain data only, and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from crener.encoder import CharEncoder, CharTokenizer
from crener.errors import CheckpointError

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (temp file + rename), so a kill mid-save leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_state(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain data, never code) on the CPU; an
    unreadable file is a :class:`~crener.errors.CheckpointError` naming ``what`` it should be."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``fit``, checked to be one (:func:`read_state`)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = read_state(path)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "model" not in state:
        raise CheckpointError(f"{path} is not a crener checkpoint (version {CHECKPOINT_VERSION})")
    return state


def encoder_state(encoder: CharEncoder, tokenizer: CharTokenizer) -> dict[str, str]:
    """What a checkpoint needs to rebuild the encoder without its original files."""
    tok = tokenizer.tokenizer
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return {
        "encoder_config": json.dumps(encoder.bert.config.to_dict()),
        "encoder_vocab": json.dumps([t for t, _ in vocab], ensure_ascii=False),
        "encoder_lowercase": json.dumps(bool(getattr(tok, "do_lower_case", False))),
    }


def rebuild_encoder(state: dict[str, Any], last4_mean: bool) -> tuple[CharEncoder, CharTokenizer]:
    from transformers import BertConfig, BertModel, BertTokenizer

    try:
        bert_cfg = BertConfig.from_dict(json.loads(state["encoder_config"]))
        vocab = json.loads(state["encoder_vocab"])
        lower = json.loads(state.get("encoder_lowercase", "false"))
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks the encoder description ({exc})") from exc
    tokenizer = BertTokenizer(
        vocab=OrderedDict((t, i) for i, t in enumerate(vocab)), do_lower_case=lower, strip_accents=False
    )
    bert = BertModel(bert_cfg, add_pooling_layer=False)
    return CharEncoder(bert, last4_mean), CharTokenizer.from_tokenizer(tokenizer)
