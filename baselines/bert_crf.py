"""BERT-CRF baseline: character encoder -> Dropout -> Linear -> linear-chain CRF over BIOES tags.

The CRF has BIOES transition constraints (:func:`baselines.crf.bioes_constraints`), so Viterbi
only emits well-formed tag sequences. Its potentials train at the head learning rate
(``train.lr``); the encoder at ``train.encoder_lr``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from baselines.bert_softmax import BertTagger, search_space
from baselines.sequence import SequenceTask
from crener.config import ModelConfig, RuntimeConfig
from crener.encoder import CharEncoder
from crener.identity import ENCODER_FIELDS
from crener.registry import ModelFamily


def build_task(cfg: ModelConfig, types: Sequence[str]) -> SequenceTask:
    return SequenceTask(types, decoder="crf")


def build_model(
    cfg: ModelConfig, task: SequenceTask, encoder: CharEncoder, runtime: RuntimeConfig
) -> nn.Module:
    del runtime  # its runtime fields are the grid module's; a tagger has none to apply
    return BertTagger(cfg, task.num_labels, encoder, crf=task.tags.build_crf())


FAMILY = ModelFamily(
    name="bert_crf",
    build_model=build_model,
    build_task=build_task,
    fields=frozenset(ENCODER_FIELDS),  # encoder -> dropout -> linear -> CRF over BIOES tags
    # its settings, those of bert_softmax: [families.bert_crf] of crener/families.toml
    search_space=search_space,
    label="BERT-CRF",
    order=3,
)
