"""TENER baseline (Yan et al., 2019): character embeddings -> adapted Transformer -> CRF.

Forward: Embedding(chars) -> Dropout(emb) -> Linear(CHAR_EMB_DIM -> d_model) -> adapted
Transformer (relative, direction-aware, unscaled, post-norm: :class:`crener.layers.AdaptedTransformer`)
-> Dropout(fc) -> Linear -> log-softmax -> BIOES CRF with transition constraints, as in TENER's code.

No BERT runs in the forward: TENER is a non-pretrained model. The character vocabulary is the
tokenizer's (``[CLS] chars [SEP]`` ids of the batch, so the shared data pipeline is reused); its
size and padding id are read from ``encoder.bert``'s input embeddings, and the encoder itself is
not kept as a submodule (so its weights are neither trained nor saved with this model). Every
parameter here trains at ``train.lr``.

Config fields read: ``hidden`` (d_model), ``tf_layers``/``tf_heads``/``tf_ff``/``tf_dropout``,
``key_proj``/``attn_out_proj``/``attn_scale``/``rel_pos`` (TENER's code: no key projection, no
output projection, unscaled), ``emb_dropout`` (embedding dropout) and ``out_dropout`` (TENER's
``fc_dropout``). TENER started its character embeddings from pretrained 50-d vectors (Gigaword's);
here ``model.char_vectors`` (``default`` in this family, crener/families.toml: the People's Daily
50-d vectors in ``shared/pretrained``) is loaded by :func:`init_char_embeddings`. Not reproduced:
TENER's Chinese bigram embeddings and its SGD recipe (the shared AdamW loop is used).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.sequence import SequenceTask, TagSet
from crener import search
from crener.config import ModelConfig, RunConfig, RuntimeConfig
from crener.data.batching import Batch
from crener.encoder import CharEncoder
from crener.errors import DataError
from crener.identity import ENCODER_FIELDS, TRANSFORMER_FIELDS
from crener.layers import AdaptedTransformer
from crener.registry import ModelFamily
from crener.tools.pretrain import VECTOR_SPECIALS, read_vectors

log = logging.getLogger(__name__)

CHAR_EMB_DIM = 50  # TENER's Chinese unigram width (Gigaword 50-d); also the People's Daily vectors'


class TENER(nn.Module):
    """``forward(batch) -> {"logits": (B, N, T) log-probabilities, "crf_*": CRF potentials}``."""

    def __init__(self, cfg: ModelConfig, tags: TagSet, vocab_size: int, pad_id: int):
        super().__init__()
        self.char_embed = nn.Embedding(vocab_size, CHAR_EMB_DIM, padding_idx=pad_id)
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.in_fc = nn.Linear(CHAR_EMB_DIM, cfg.hidden)
        self.transformer = AdaptedTransformer(
            cfg.hidden, cfg.tf_layers, cfg.tf_heads, cfg.tf_ff, cfg.tf_dropout,
            key_proj=cfg.key_proj, out_proj=cfg.attn_out_proj, scale=cfg.attn_scale, rel_pos=cfg.rel_pos,
        )  # fmt: skip
        self.fc_dropout = nn.Dropout(cfg.out_dropout)
        self.out_fc = nn.Linear(cfg.hidden, len(tags))
        self.crf = tags.build_crf()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        ids = batch.input_ids[:, 1 : batch.n + 1]  # (B, N): drop [CLS]; positions past a sentence are masked
        x = self.in_fc(self.emb_dropout(self.char_embed(ids)))  # (B, N, d_model)
        h, _ = self.transformer(x, batch.char_mask)  # (B, N, d_model)
        logits = F.log_softmax(self.out_fc(self.fc_dropout(h)), dim=-1)  # (B, N, T), as TENER feeds its CRF
        return {"logits": logits, **self.crf.outputs()}

    def init_char_vectors(self, vocab: Mapping[str, int], path: str | Path) -> float:
        """``model.char_vectors``: see :func:`init_char_embeddings`."""
        return init_char_embeddings(self, vocab, path)


def build_task(cfg: ModelConfig, types: Sequence[str]) -> SequenceTask:
    return SequenceTask(types, decoder="crf")


def build_model(
    cfg: ModelConfig, task: SequenceTask, encoder: CharEncoder, runtime: RuntimeConfig
) -> nn.Module:
    del runtime  # its runtime fields are the grid module's; a tagger has none to apply
    emb = encoder.bert.get_input_embeddings()
    pad_id = encoder.bert.config.pad_token_id
    return TENER(cfg, task.tags, emb.num_embeddings, 0 if pad_id is None else int(pad_id))


def search_space(trial: Any, base: RunConfig) -> dict[str, Any]:
    """TENER: learning rates, width, depth, Transformer dropout, batch budget."""
    m = base.model
    return {
        **search.learning_rates(trial, base),
        "model.hidden": search.width(trial, "model.hidden", m.hidden, m.tf_heads),
        "model.tf_layers": trial.suggest_int("model.tf_layers", 1, max(2, m.tf_layers)),
        "model.tf_dropout": search.dropout(trial, "model.tf_dropout", m.tf_dropout),
        **search.batch_budget(trial, base),
    }


FAMILY = ModelFamily(
    name="tener",
    build_model=build_model,
    build_task=build_task,
    # its own character embeddings (the encoder gives the vocabulary) -> adapted Transformer -> CRF
    fields=frozenset(ENCODER_FIELDS + TRANSFORMER_FIELDS + ("out_dropout", "char_vectors")),
    # its faithful settings (key unprojected, started from character vectors), its rate in quick
    # and that no encoder runs in its forward: [families.tener] of crener/families.toml
    search_space=search_space,
    label="TENER",
    order=4,
)


def init_char_embeddings(model: TENER, vocab: Mapping[str, int], path: str | Path) -> float:
    """Copy pretrained character vectors into ``model.char_embed`` for the tokens of ``vocab``.

    ``vocab`` maps tokens to ids (``tokenizer.get_vocab()``); ``path`` is a word2vec text file,
    read strictly (a malformed line is an error naming it). Vectors are copied as they are (the
    People's Daily ones have a mean norm near the sqrt(50) of the N(0, 1) rows that tokens without a
    vector keep). Returns the fraction of vocabulary tokens covered.
    """
    vectors = read_vectors(Path(path))
    weight = model.char_embed.weight
    if not vectors:
        raise DataError("no character vectors in the file", str(path))
    dim = next(iter(vectors.values())).shape[0]
    if dim != weight.size(1):
        raise DataError(f"{dim}-d vectors; TENER's character embeddings are {weight.size(1)}-d", str(path))
    # The file's own specials under the tokenizer's names, as `crener pretrain` maps them.
    named = {VECTOR_SPECIALS.get(tok, tok): vec for tok, vec in vectors.items()}
    hits = [(idx, named[tok]) for tok, idx in vocab.items() if tok in named and idx < weight.size(0)]
    if hits:
        rows = torch.tensor([i for i, _ in hits], dtype=torch.long)
        with torch.no_grad():
            weight[rows] = torch.from_numpy(np.stack([v for _, v in hits])).to(weight.dtype)
    coverage = len(hits) / max(len(vocab), 1)
    log.info("initialised %d of %d character embeddings from %s", len(hits), len(vocab), path)
    return coverage
