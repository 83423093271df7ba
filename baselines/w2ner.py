"""Faithful W2NER baseline (Li et al., AAAI 2022; method.md §2.7), built from crener's shared blocks.

Figure-order forward, matching ljynlp/W2NER ``Model.forward``:
BERT characters -> Dropout(emb) -> BiLSTM (input d_bert, no projection first) -> conditional
layer norm with the LSTM output as both row and column (code orientation) -> [distance; region;
CLN] -> Dropout2d, 1x1 conv, GELU -> chained depthwise dilated convs -> co-predictor (biaffine on
the LSTM output + MLP over the conv output, summed).

The task is :class:`crener.tasks.GridTask` (W2NER scheme NNW + THW-τ, softmax CE, W2NER decoding:
its settings in ``[families.w2ner]`` of crener/families.toml), so this file only builds the model
and registers it. The context layer is always the BiLSTM (``model.context`` is not read); the grid
knobs (orientation, chaining, embedding flags, dilations, predictor halves) are read from the
config, so W2NER-side ablations work too.

Deliberate difference from the released code: crener's grid module zeroes padded cells before each
dilated conv (W2NER masks only before the 1x1 conv and after the last conv), so padding cannot
leak into real cells near the sentence end; predictions are then independent of batch padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crener import search
from crener.config import ModelConfig, RunConfig, RuntimeConfig
from crener.data.batching import Batch
from crener.encoder import CharEncoder
from crener.identity import ENCODER_FIELDS, GRID_FIELDS, GRID_TASK_FIELDS
from crener.layers import BiLSTM, CoPredictor, GridConvModule
from crener.registry import ModelFamily
from crener.tasks import GridTask, Task


class W2NER(nn.Module):
    """``forward(batch) -> {"logits": (B, N, N, C)}``, C = 1 (none) + 1 (NNW) + M types."""

    def __init__(
        self, cfg: ModelConfig, num_labels: int, encoder: CharEncoder, runtime: RuntimeConfig | None = None
    ):
        super().__init__()
        runtime = runtime or RuntimeConfig()
        self.encoder = encoder  # the name puts its parameters in the encoder learning-rate group
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.lstm = BiLSTM(encoder.out_dim, cfg.lstm_hidden)
        d = self.lstm.out_dim
        self.grid = GridConvModule(
            d, cfg.conv_channels,
            dist_dim=cfg.dist_dim if cfg.use_distance_embedding else 0,
            region_dim=cfg.region_dim if cfg.use_region_embedding else 0,
            dropout=cfg.conv_dropout,
            dilations=cfg.dilations if cfg.use_dilated_conv else None,
            chain=cfg.dconv_chain, orientation=cfg.cln_orientation,
            input_form=runtime.grid_input, space_to_batch=runtime.space_to_batch,
            fused_conv=runtime.fused_conv,
        )  # fmt: skip
        self.predictor = CoPredictor(
            num_labels, char_dim=d, grid_dim=self.grid.out_dim, biaffine_dim=cfg.biaffine_dim,
            ffn_dim=cfg.ffn_dim, dropout=cfg.out_dropout, use_biaffine=cfg.use_biaffine, use_mlp=cfg.use_grid_mlp,
            fast_dropout=cfg.fast_dropout,
        )  # fmt: skip

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.encoder(batch.input_ids, batch.attention_mask, batch.n)  # (B, N, d_bert)
        h = self.lstm(self.emb_dropout(x), batch.lengths)  # (B, N, d_lstm)
        q = self.grid(h, h, batch.grid_mask)  # (B, N, N, rates * d_c)
        return {"logits": self.predictor(h, h, q)}  # (B, N, N, C)


def build_model(cfg: ModelConfig, task: Task, encoder: CharEncoder, runtime: RuntimeConfig) -> nn.Module:
    return W2NER(cfg, task.num_labels, encoder, runtime)


def search_space(trial: Any, base: RunConfig) -> dict[str, Any]:
    """W2NER: learning rates, BiLSTM/conv/biaffine widths, dropouts, batch budget."""
    m = base.model
    return {
        **search.learning_rates(trial, base),
        "model.lstm_hidden": search.width(trial, "model.lstm_hidden", m.lstm_hidden, 2),
        "model.conv_channels": search.width(trial, "model.conv_channels", m.conv_channels),
        "model.biaffine_dim": search.width(trial, "model.biaffine_dim", m.biaffine_dim),
        "model.emb_dropout": search.dropout(trial, "model.emb_dropout", m.emb_dropout),
        "model.conv_dropout": search.dropout(trial, "model.conv_dropout", m.conv_dropout),
        "model.out_dropout": search.dropout(trial, "model.out_dropout", m.out_dropout),
        **search.batch_budget(trial, base),
    }


FAMILY = ModelFamily(
    name="w2ner",
    build_model=build_model,
    build_task=GridTask,
    # BiLSTM context (model.context is not read), no relation enhancement, no attention matrix
    fields=frozenset(ENCODER_FIELDS + GRID_FIELDS + GRID_TASK_FIELDS + ("lstm_hidden",)),
    # its faithful settings and its check: [families.w2ner] of crener/families.toml
    search_space=search_space,
    label="W²NER",
    order=1,
    paper_row=True,
)
