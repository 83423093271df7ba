"""Long-sentence rule: cut preferences, never inside an entity, exact merge back."""

from __future__ import annotations

import pytest

from crener.config import DataConfig
from crener.data.schema import Entity, Sentence
from crener.data.split import Chunk, merge_predictions, split_all, split_blind, split_sentence
from crener.errors import DataError


def sent(text: str, *spans: tuple[int, int, str], line: int | None = 10) -> Sentence:
    return Sentence(tuple(text), tuple(Entity.span(a, b, t) for a, b, t in spans), "f.bmes", line)


def pieces(chunks: list[Chunk]) -> list[str]:
    return [c.sentence.text for c in chunks]


def roundtrip(sentences: list[Sentence], max_len: int) -> list[Chunk]:
    chunks = split_all(sentences, max_len)
    assert all(len(c.sentence) <= max_len for c in chunks)
    merged = merge_predictions(chunks, [set(c.sentence.entities) for c in chunks], len(sentences))
    assert merged == [set(s.entities) for s in sentences]
    texts = [""] * len(sentences)
    for c in chunks:
        assert texts[c.index] == "" or c.offset == len(texts[c.index])
        texts[c.index] += c.sentence.text
    assert texts == [s.text for s in sentences]
    return chunks


def test_short_sentence_is_returned_whole():
    s = sent("张三在北京", (0, 2, "PER"))
    (chunk,) = split_sentence(s, 5, index=3)
    assert chunk == Chunk(s, 0, 3)


def test_prefers_sentence_final_then_comma_then_anywhere():
    assert pieces(split_sentence(sent("甲乙。丙丁，戊己庚"), 6)) == ["甲乙。", "丙丁，戊己庚"]
    assert pieces(split_sentence(sent("甲乙，丙丁戊己庚"), 6)) == ["甲乙，", "丙丁戊己庚"]
    assert pieces(split_sentence(sent("甲乙丙丁戊己庚辛"), 6)) == ["甲乙丙丁戊己", "庚辛"]
    # the last final punctuation in reach wins over a later comma
    assert pieces(split_sentence(sent("甲!乙？丙，丁戊己"), 6)) == ["甲!乙？", "丙，丁戊己"]


def test_never_cuts_inside_an_entity_and_shifts_entities():
    # the cut after "。" would split the ORG, so the last legal cut in reach is used
    s = sent("甲乙丙。丁戊己庚辛", (2, 6, "ORG"), (7, 9, "PER"), line=100)
    chunks = split_sentence(s, 6, index=4)
    assert pieces(chunks) == ["甲乙丙。丁戊", "己庚辛"]
    assert [c.offset for c in chunks] == [0, 6] and {c.index for c in chunks} == {4}
    assert chunks[0].sentence.entities == (Entity.span(2, 6, "ORG"),)
    assert chunks[1].sentence.entities == (Entity.span(1, 3, "PER"),)
    assert [c.sentence.line for c in chunks] == [100, 106]  # one character per line
    roundtrip([s], 6)
    # an entity across the longest cut moves the cut before it
    assert pieces(split_sentence(sent("甲乙丙丁戊己庚辛", (4, 8, "X")), 6)) == ["甲乙丙丁", "戊己庚辛"]


def test_eval_splits_are_cut_blind_to_gold(tiny_encoder):
    # Dev and test are cut as `crener predict` cuts raw text: without reading gold. Avoiding
    # a gold entity there would use the labels being scored; a split entity is a miss instead.
    from crener.config import ModelConfig
    from crener.evaluation import build_split
    from crener.metrics import score
    from crener.registry import build_task

    s = sent("甲乙丙丁戊己庚辛", (4, 8, "X"))
    assert pieces(split_all([s], 6)) == ["甲乙丙丁", "戊己庚辛"]  # training chunks may use gold
    task = build_task(ModelConfig(), ("X",))
    test = build_split("test", [s], 6, task, tiny_encoder[1])
    assert pieces(test.chunks) == pieces(split_blind([s], 6)) == ["甲乙丙丁戊己", "庚辛"]
    assert all(c.sentence.entities == () for c in test.chunks)
    assert all(e.targets.size == 0 for e in test.examples)  # no gold behind the examples
    # The best any model can do on those chunks is the two halves: the entity is a miss.
    halves = [{Entity.span(4, 6, "X")}, {Entity.span(0, 2, "X")}]
    merged = merge_predictions(test.chunks, halves, 1)
    counts = score([set(s.entities)], merged).micro
    assert (counts.correct, counts.gold) == (0, 1)


def test_non_contiguous_entity_hull_is_not_cut():
    s = Sentence(tuple("甲乙丙丁戊己"), (Entity((1, 4), "X"),))
    chunks = roundtrip([s], 4)
    assert pieces(chunks) == ["甲", "乙丙丁戊", "己"]


def test_entity_longer_than_max_len_names_source_and_line():
    s = sent("甲乙丙丁戊己庚辛", (1, 7, "ORG"), line=40)
    with pytest.raises(DataError, match="ORG '乙丙丁戊己庚'.*raise max_len") as info:
        split_sentence(s, 5)
    assert info.value.path == "f.bmes" and info.value.line == 41
    assert "f.bmes:41:" in str(info.value)


def test_merge_predictions_unions_and_checks():
    s0, s1 = sent("甲乙丙丁戊己"), sent("子丑")
    chunks = split_all([s0, s1], 3)
    assert [(c.index, c.offset) for c in chunks] == [(0, 0), (0, 3), (1, 0)]
    predicted = [{Entity.span(1, 3, "A")}, {Entity.span(0, 1, "B"), Entity.span(1, 3, "A")}, set()]
    merged = merge_predictions(chunks, predicted, 2)
    assert merged == [{Entity.span(1, 3, "A"), Entity.span(3, 4, "B"), Entity.span(4, 6, "A")}, set()]
    with pytest.raises(ValueError, match="prediction sets"):
        merge_predictions(chunks, predicted[:2], 2)
    with pytest.raises(ValueError, match="only 1 sentences"):
        merge_predictions(chunks, predicted, 1)


@pytest.mark.parametrize("max_len", [8, 13, 50])
def test_random_sentences_roundtrip(max_len):
    import random

    rng = random.Random(max_len)
    alphabet = "甲乙丙丁。，、！abc"
    sentences = []
    for _ in range(200):
        n = rng.randint(1, 120)
        text = "".join(rng.choice(alphabet) for _ in range(n))
        entities, i = [], 0
        while i < n:
            length = rng.randint(1, min(8, n - i))
            if rng.random() < 0.3:
                entities.append(Entity.span(i, i + length, rng.choice("XY")))
            i += length + rng.randint(0, 3)
        sentences.append(Sentence(tuple(text), tuple(entities)))
    roundtrip(sentences, max_len)


@pytest.mark.slow
@pytest.mark.parametrize("max_len", [64, DataConfig.max_len, 510])
def test_msra_split_merge_reproduces_gold(shared_data, max_len):
    from crener.data.datasets import load_dataset

    splits = load_dataset(DataConfig(dataset="msra"))
    assert max(len(s) for s in splits.test) == 1_475
    for sentences in (splits.train, splits.test):
        chunks = roundtrip(sentences, max_len)
        assert len(chunks) > len(sentences)
