"""BIOES conversion (hand cases, lenient rule, whole datasets) and the sequence task."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from baselines.sequence import SequenceTask, TagSet, bioes_names, entities_to_tags, tags_to_entities
from crener.data.batching import Example, collate
from crener.data.readers import lenient_chunks
from crener.data.schema import Entity

E = Entity.span


def test_layout() -> None:
    assert bioes_names(["LOC", "PER"]) == (
        "O",
        "B-LOC",
        "I-LOC",
        "E-LOC",
        "S-LOC",
        "B-PER",
        "I-PER",
        "E-PER",
        "S-PER",
    )
    with pytest.raises(ValueError):
        bioes_names(["LOC", "LOC"])


@pytest.mark.parametrize(
    ("entities", "n", "tags"),
    [
        (set(), 3, ["O", "O", "O"]),
        ({E(0, 2, "LOC")}, 3, ["B-LOC", "E-LOC", "O"]),
        ({E(1, 2, "PER")}, 3, ["O", "S-PER", "O"]),
        ({E(0, 4, "ORG")}, 4, ["B-ORG", "I-ORG", "I-ORG", "E-ORG"]),
        # adjacent entities, same and different types
        ({E(0, 2, "LOC"), E(2, 3, "LOC"), E(3, 5, "PER")}, 5, ["B-LOC", "E-LOC", "S-LOC", "B-PER", "E-PER"]),
        ({E(0, 1, "LOC"), E(1, 2, "LOC")}, 2, ["S-LOC", "S-LOC"]),
    ],
)
def test_hand_cases_round_trip(entities: set[Entity], n: int, tags: list[str]) -> None:
    assert entities_to_tags(entities, n) == tags
    assert tags_to_entities(tags) == entities
    ts = TagSet(["LOC", "ORG", "PER"])
    assert ts.decode(ts.encode(entities, n)) == entities


def test_unencodable_entities_raise() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        entities_to_tags({E(0, 3, "ORG"), E(0, 2, "LOC")}, 4)
    with pytest.raises(ValueError, match="overlaps"):
        entities_to_tags({E(0, 2, "ORG"), E(0, 2, "LOC")}, 4)
    with pytest.raises(ValueError, match="non-contiguous"):
        entities_to_tags({Entity((0, 2), "LOC")}, 4)
    with pytest.raises(ValueError, match="outside"):
        entities_to_tags({E(2, 5, "LOC")}, 4)
    with pytest.raises(ValueError, match="not one of"):
        TagSet(["LOC"]).encode({E(0, 1, "PER")}, 2)


@pytest.mark.parametrize(
    ("tags", "entities"),
    [
        (["I-LOC", "I-LOC"], {E(0, 2, "LOC")}),  # no B: starts at the first I
        (["B-LOC", "I-LOC", "O"], {E(0, 2, "LOC")}),  # no E: closed by O
        (["B-LOC", "I-LOC"], {E(0, 2, "LOC")}),  # closed by the end of the sentence
        (["B-LOC", "I-PER", "E-PER"], {E(0, 1, "LOC"), E(1, 3, "PER")}),  # type change
        (["B-LOC", "B-LOC", "E-LOC"], {E(0, 1, "LOC"), E(1, 3, "LOC")}),  # B closes the open chunk
        (["E-LOC", "S-LOC", "E-LOC"], {E(0, 1, "LOC"), E(1, 2, "LOC"), E(2, 3, "LOC")}),
        (["B-LOC", "S-LOC"], {E(0, 1, "LOC"), E(1, 2, "LOC")}),
        (["O", "E-PER", "O"], {E(1, 2, "PER")}),
    ],
)
def test_lenient_rule_on_malformed_sequences(tags: list[str], entities: set[Entity]) -> None:
    assert tags_to_entities(tags) == entities


def test_lenient_rule_agrees_with_the_conll_reader() -> None:
    """Same rule as the reader applies to malformed gold files, on random tag soup."""
    names = bioes_names(["LOC", "PER"])
    info = {t: (t[0], t[2:]) for t in names if t != "O"}
    rng = random.Random(0)
    for _ in range(2000):
        tags = [rng.choice(names) for _ in range(rng.randint(1, 9))]
        positions = [i for i, t in enumerate(tags) if t != "O"]
        ref = (
            {E(s, e, ty) for s, e, ty, _ in lenient_chunks(positions, tags, info, False)}
            if positions
            else set()
        )
        assert tags_to_entities(tags) == ref, tags


def test_bad_tags_raise() -> None:
    for bad in (["X-LOC"], ["B"], ["B-"], ["M-LOC"]):
        with pytest.raises(ValueError, match="not a BIOES tag"):
            tags_to_entities(bad)


def _batch(task: SequenceTask, sentences: list[tuple[int, set[Entity]]]):
    examples = [
        Example(k, np.arange(n + 2, dtype=np.int64), task.featurize(list(ents), n), n)
        for k, (n, ents) in enumerate(sentences)
    ]
    return collate(examples, task.target, task.num_labels)


@pytest.mark.parametrize("decoder", ["softmax", "crf"])
def test_sequence_task_loss_and_decode(decoder: str) -> None:
    task = SequenceTask(["LOC", "PER"], decoder=decoder)
    gold = [(4, {E(0, 2, "LOC"), E(3, 4, "PER")}), (2, {E(0, 2, "PER")})]
    batch = _batch(task, gold)
    assert batch.targets.tolist()[1][2:] == [-100, -100]
    # One-hot logits of the gold tags decode to the gold entities; padding is ignored.
    targets = batch.targets.clamp(min=0)
    logits = torch.nn.functional.one_hot(targets, task.num_labels).float() * 20
    outputs = {"logits": logits}
    if decoder == "crf":
        outputs.update(task.tags.build_crf().outputs())
    assert task.decode(outputs, batch) == [ents for _, ents in gold]
    loss = task.loss(outputs, batch)["loss"]
    assert torch.isfinite(loss) and loss.item() < 0.1
    with pytest.raises(ValueError):
        SequenceTask(["LOC"], decoder="beam")


def test_crf_task_needs_potentials() -> None:
    task = SequenceTask(["LOC"], decoder="crf")
    batch = _batch(task, [(2, {E(0, 2, "LOC")})])
    with pytest.raises(ValueError, match="crf_start"):
        task.loss({"logits": torch.zeros(1, 2, task.num_labels)}, batch)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["weibo", "resume", "ontonotes4", "msra"])
def test_round_trip_on_every_sentence(dataset: str) -> None:
    from crener.config import DataConfig
    from crener.data.datasets import load_dataset

    data = load_dataset(DataConfig(dataset=dataset))
    tagset = TagSet(data.types)
    count = 0
    for split in (data.train, data.dev, data.test):
        for s in split:
            ids = tagset.encode(s.entities, len(s))
            assert tagset.decode(ids) == set(s.entities), (s.source, s.line)
            count += 1
    assert count > 0
