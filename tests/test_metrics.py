"""Entity-level metrics (method.md §5), values checked by hand."""

from __future__ import annotations

import json

import pytest

from crener.data.schema import Entity
from crener.metrics import Counts, by_length, score, sentence_counts

E = Entity.span


def test_counts_by_hand():
    c = Counts(correct=2, predicted=3, gold=4)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(1 / 2)
    assert c.f1 == pytest.approx(4 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert c + Counts(1, 1, 1) == Counts(3, 4, 5)


@pytest.mark.parametrize(
    "counts",
    [Counts(0, 0, 5), Counts(0, 5, 0), Counts(0, 0, 0), Counts(0, 3, 4)],
)
def test_counts_zero_conventions(counts):
    assert counts.f1 == 0.0
    if counts.predicted == 0:
        assert counts.precision == 0.0
    if counts.gold == 0:
        assert counts.recall == 0.0


def test_score_two_of_three_predicted_four_gold():
    gold = [[E(0, 2, "PER"), E(3, 5, "LOC")], [E(0, 1, "ORG"), E(2, 6, "ORG")]]
    pred = [[E(0, 2, "PER"), E(3, 4, "LOC")], [E(2, 6, "ORG")]]
    s = score(gold, pred)
    assert s.micro == Counts(2, 3, 4)
    assert s.micro.f1 == pytest.approx(4 / 7)
    assert s.per_type == {"LOC": Counts(0, 1, 1), "ORG": Counts(1, 1, 2), "PER": Counts(1, 1, 1)}
    assert list(s.per_type) == sorted(s.per_type)


def test_type_mismatch_is_an_error_not_a_match():
    s = score([[E(0, 2, "PER")]], [[E(0, 2, "LOC")]])
    assert s.micro == Counts(0, 1, 1)
    assert s.per_type == {"LOC": Counts(0, 1, 0), "PER": Counts(0, 0, 1)}


def test_index_tuple_must_match_exactly():
    # Same head and tail but a different path is wrong too.
    s = score([[Entity((0, 1, 2), "PER")]], [[Entity((0, 2), "PER")]])
    assert s.micro == Counts(0, 1, 1)


def test_duplicates_collapse_per_sentence():
    gold = [[E(0, 2, "PER"), E(0, 2, "PER")], [E(0, 2, "PER")]]
    pred = [[E(0, 2, "PER")] * 3, [E(0, 2, "PER"), E(0, 2, "PER")]]
    # ...but the same entity in two different sentences counts twice.
    assert score(gold, pred).micro == Counts(2, 2, 2)


def test_empty_predictions_and_empty_gold():
    gold = [[E(0, 2, "PER")], []]
    s = score(gold, [set(), set()])
    assert s.micro == Counts(0, 0, 1)
    assert (s.micro.precision, s.micro.recall, s.micro.f1) == (0.0, 0.0, 0.0)
    assert score([[], []], [[], []]).micro == Counts(0, 0, 0)
    assert score([[]], [[E(0, 1, "LOC")]]).micro == Counts(0, 1, 0)


def test_listed_types_get_zero_rows():
    s = score([[E(0, 1, "PER")]], [[E(0, 1, "PER")]], types=("PER", "ORG"))
    assert s.per_type == {"ORG": Counts(), "PER": Counts(1, 1, 1)}


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        score([[]], [[], []])
    with pytest.raises(ValueError):
        by_length([[], []], [[]])


def test_to_dict_is_flat_and_json_friendly():
    s = score([[E(0, 2, "PER"), E(3, 4, "LOC")]], [[E(0, 2, "PER")]])
    d = json.loads(json.dumps(s.to_dict()))
    assert d["correct"] == 1 and d["predicted"] == 1 and d["gold"] == 2
    assert d["precision"] == 1.0 and d["recall"] == 0.5 and d["f1"] == pytest.approx(2 / 3)
    assert set(d) == {"precision", "recall", "f1", "correct", "predicted", "gold", "per_type"}
    assert d["per_type"]["LOC"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "correct": 0,
        "predicted": 0,
        "gold": 1,
    }


def test_by_length_buckets():
    gold = [[E(0, 1, "A"), E(1, 3, "A"), E(3, 8, "A"), E(8, 20, "A")]]
    pred = [[E(0, 1, "A"), E(1, 4, "A"), E(3, 8, "A"), E(8, 20, "B")]]
    out = by_length(gold, pred, buckets=(1, 2, 3, 4, 5))
    assert list(out) == ["1", "2", "3", "4", "5+"]
    assert out["1"] == Counts(1, 1, 1)
    assert out["2"] == Counts(0, 0, 1)  # gold length decides recall
    assert out["3"] == Counts(0, 1, 0)  # predicted length decides precision
    assert out["4"] == Counts()
    assert out["5+"] == Counts(1, 2, 2)  # lengths 5 and 12; the type-mismatched 12 is wrong
    ranged = by_length(gold, pred, buckets=(1, 2, 6))
    assert list(ranged) == ["1", "2-5", "6+"]
    assert ranged["2-5"] == Counts(1, 2, 2)
    assert sum(ranged.values(), Counts()) == score(gold, pred).micro
    reports = by_length(gold, pred)  # the default: the buckets of the reports
    assert list(reports) == ["1", "2", "3", "4", "5-6", "7-9", "10+"]
    assert (reports["5-6"], reports["10+"]) == (Counts(1, 1, 1), Counts(0, 1, 1))
    assert sum(sentence_counts(gold, pred), Counts()) == score(gold, pred).micro


@pytest.mark.parametrize("buckets", [(), (2, 3), (1, 3, 3), (1, 0)])
def test_by_length_rejects_bad_buckets(buckets):
    with pytest.raises(ValueError):
        by_length([[]], [[]], buckets=buckets)
