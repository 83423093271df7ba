"""Checkpoints: the file ``fit`` writes and ``crener evaluate``, ``crener predict`` and
``crener migrate`` read.

A checkpoint is self-contained: besides the weights it carries the resolved config, the entity
types, the encoder's architecture (BERT config) and its vocabulary (:func:`encoder_state`), so it
can be evaluated or used for prediction without the run directory or a model hub. It holds
tensors and plain data only, and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from crener.encoder import CharEncoder, CharTokenizer
from crener.errors import CheckpointError
from crener.files import write_atomic

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic write (:func:`crener.files.write_atomic`): a kill mid-save or a full disk leaves the
    previous checkpoint and no partial file."""
    write_atomic(path, lambda fh: torch.save(state, fh))


# How a checkpoint file starts: torch's zip format (since 1.6) or its legacy pickle.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
TEXT_PROBE_BYTES = 4096


def describe_unreadable(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be a ``what`` when that shows without loading it (a folder, an empty or
    a text file), in words that say what to pass instead; None if it looks like one."""
    hint = "write it again"
    if what == "checkpoint":
        hint = "pass the best.pt or last.pt that `crener train` wrote (runs/<profile>/<key>/checkpoints/)"
    if path.is_dir():
        inside = path / "checkpoints" / "best.pt"
        return f"{path}: it is a folder, not a {what}; " + (f"pass {inside}" if inside.is_file() else hint)
    with open(path, "rb") as fh:
        head = fh.read(TEXT_PROBE_BYTES)
    if not head:
        return f"{path}: it is empty (0 bytes), not a {what} (a copy or a save that did not finish?); {hint}"
    if head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the probe's end
            return None
    return f"{path}: it is a text file, not a {what}; {hint}"


def read_state(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain data, never code) on the CPU; an
    unreadable file is a :class:`~crener.errors.CheckpointError` naming ``what`` it should be and
    what to pass instead."""
    reason = describe_unreadable(path, what)
    if reason is not None:
        raise CheckpointError(f"cannot read {what} {reason}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read {what} {path}: it is cut short or damaged ({detail}); write it again"
        ) from exc


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
