"""BERT-Softmax baseline: character encoder -> Dropout -> Linear to BIOES tag scores.

Trained with token-level cross-entropy and decoded by argmax plus the lenient chunking rule of
:mod:`baselines.sequence`. :class:`BertTagger` also serves BERT-CRF (:mod:`baselines.bert_crf`),
which adds a CRF on the same emissions. ``model.emb_dropout`` is the dropout before the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from baselines.crf import CRF
from baselines.sequence import SequenceTask
from crener import search
from crener.config import ModelConfig, RunConfig, RuntimeConfig
from crener.data.batching import Batch
from crener.encoder import CharEncoder
from crener.identity import ENCODER_FIELDS
from crener.registry import ModelFamily


class BertTagger(nn.Module):
    """``forward(batch) -> {"logits": (B, N, T)}`` plus the CRF potentials when ``crf`` is given."""

    def __init__(self, cfg: ModelConfig, num_tags: int, encoder: CharEncoder, crf: CRF | None = None):
        super().__init__()
        self.encoder = encoder  # the name puts its parameters in the encoder learning-rate group
        self.dropout = nn.Dropout(cfg.emb_dropout)
        self.classifier = nn.Linear(encoder.out_dim, num_tags)
        self.crf = crf

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Start each tag's score at ``bias`` (its training log prior: ``model.prior_bias``)."""
        self.classifier.bias.copy_(bias.to(self.classifier.bias))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.encoder(batch.input_ids, batch.attention_mask, batch.n)  # (B, N, d_bert)
        out = {"logits": self.classifier(self.dropout(x))}  # (B, N, T)
        if self.crf is not None:
            out.update(self.crf.outputs())
        return out


def build_task(cfg: ModelConfig, types: Sequence[str]) -> SequenceTask:
    return SequenceTask(types, decoder="softmax")


def build_model(
    cfg: ModelConfig, task: SequenceTask, encoder: CharEncoder, runtime: RuntimeConfig
) -> nn.Module:
    del runtime  # its runtime fields are the grid module's; a tagger has none to apply
    return BertTagger(cfg, task.num_labels, encoder)


def search_space(trial: Any, base: RunConfig) -> dict[str, Any]:
    """BERT-Softmax / BERT-CRF: learning rates, dropout, batch budget."""
    return {
        **search.learning_rates(trial, base),
        "model.emb_dropout": search.dropout(trial, "model.emb_dropout", base.model.emb_dropout),
        **search.batch_budget(trial, base),
    }


FAMILY = ModelFamily(
    name="bert_softmax",
    build_model=build_model,
    build_task=build_task,
    # encoder -> dropout -> linear over BIOES tags, whose bias starts at the tag priors (prior_bias)
    fields=frozenset(ENCODER_FIELDS + ("prior_bias",)),
    # its settings (no context layer; the encoder fine-tuned in quick): crener/families.toml
    search_space=search_space,
    label="BERT-Softmax",
    order=2,
)
