"""Entity-level precision, recall and F1 (method.md §5); no torch.

An entity is correct only if its full index tuple *and* its type equal a gold entity of the same
sentence: a right span with the wrong type is one false positive and one false negative. Per
sentence, gold and predictions are sets (duplicates collapse); correct/predicted/gold counts are
summed over the split (micro average), and P, R, F1 are zero when their denominator is zero
(W2NER's convention).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from crener.data.schema import Entity

# Lower bounds of the entity-length buckets of the reports: lengths 1, 2, 3, 4, 5-6, 7-9 and 10+.
LENGTH_BUCKETS = (1, 2, 3, 4, 5, 7, 10)


@dataclass(frozen=True)
class Counts:
    """Summed counts of one group of entities (all, one type, one length bucket)."""

    correct: int = 0
    predicted: int = 0
    gold: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        # 2c / (p + g) equals 2PR / (P + R) and avoids a 0/0 when c = 0.
        if not self.predicted or not self.gold:
            return 0.0
        return 2 * self.correct / (self.predicted + self.gold)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.correct + other.correct, self.predicted + other.predicted, self.gold + other.gold)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "correct": self.correct,
            "predicted": self.predicted,
            "gold": self.gold,
        }


@dataclass(frozen=True)
class Scores:
    """Micro counts over all entities plus counts per entity type (sorted by type name)."""

    micro: Counts
    per_type: dict[str, Counts] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"precision", "recall", "f1", "correct", "predicted", "gold", "per_type": {type: {...}}}``."""
        return {**self.micro.to_dict(), "per_type": {t: c.to_dict() for t, c in self.per_type.items()}}


def score(
    gold: Sequence[Iterable[Entity]],
    pred: Sequence[Iterable[Entity]],
    types: Iterable[str] = (),
) -> Scores:
    """Entity-level scores of ``pred`` against ``gold``, one item per sentence, same order.

    ``per_type`` holds every type seen in gold or predictions, plus any listed in ``types``
    (so a type that never occurs still gets a zero row).
    """
    _check_lengths(gold, pred)
    tally: dict[str, list[int]] = {t: [0, 0, 0] for t in types}
    for g_items, p_items in zip(gold, pred):
        g, p = set(g_items), set(p_items)
        for e in g & p:
            tally.setdefault(e.type, [0, 0, 0])[0] += 1
        for e in p:
            tally.setdefault(e.type, [0, 0, 0])[1] += 1
        for e in g:
            tally.setdefault(e.type, [0, 0, 0])[2] += 1
    per_type = {t: Counts(*tally[t]) for t in sorted(tally)}
    micro = sum(per_type.values(), Counts())
    return Scores(micro, per_type)


def by_length(
    gold: Sequence[Iterable[Entity]],
    pred: Sequence[Iterable[Entity]],
    buckets: Sequence[int] = LENGTH_BUCKETS,
) -> dict[str, Counts]:
    """Counts per entity length (number of characters), for reports.

    ``buckets`` are increasing lower bounds starting at 1: bucket b_k holds lengths
    b_k .. b_{k+1} - 1 and the last one everything from its bound up. Keys are ``"3"`` for a
    one-length bucket, ``"6-10"`` for a range and ``"5+"`` for the last. Recall of a bucket uses
    gold lengths and precision predicted lengths; a correct entity has one length, so it lands
    in the same bucket on both sides.
    """
    _check_lengths(gold, pred)
    bounds = list(buckets)
    names = bucket_names(bounds)
    # lookup[L - 1] = bucket of length L, for L up to the last bound; longer ones go to the last.
    lookup = [k for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])) for _ in range(lo, hi)]

    def bucket(e: Entity) -> int:
        n = len(e.indices)
        return lookup[n - 1] if n <= len(lookup) else len(bounds) - 1

    tally = [[0, 0, 0] for _ in bounds]
    for g_items, p_items in zip(gold, pred):
        g, p = set(g_items), set(p_items)
        for e in g & p:
            tally[bucket(e)][0] += 1
        for e in p:
            tally[bucket(e)][1] += 1
        for e in g:
            tally[bucket(e)][2] += 1
    return {name: Counts(*t) for name, t in zip(names, tally)}


def sentence_counts(gold: Sequence[Iterable[Entity]], pred: Sequence[Iterable[Entity]]) -> list[Counts]:
    """The counts of each sentence, whose sums are :func:`score`'s micro counts (the paired
    bootstrap of the reports resamples sentences)."""
    _check_lengths(gold, pred)
    out = []
    for g_items, p_items in zip(gold, pred):
        g, p = set(g_items), set(p_items)
        out.append(Counts(len(g & p), len(p), len(g)))
    return out


def bucket_names(buckets: Sequence[int] = LENGTH_BUCKETS) -> list[str]:
    """The names :func:`by_length` gives its buckets, in order."""
    bounds = list(buckets)
    if not bounds or bounds[0] != 1 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"buckets must be increasing lower bounds starting at 1, got {tuple(bounds)}")
    return [_bucket_name(lo, hi) for lo, hi in zip(bounds, [*bounds[1:], None])]


def _bucket_name(lo: int, hi: int | None) -> str:
    if hi is None:
        return f"{lo}+"
    return str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"


def _check_lengths(gold: Sequence[Any], pred: Sequence[Any]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
