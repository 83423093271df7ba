"""The long-sentence rule (method.md §7): cut sentences longer than ``max_len`` into chunks,
and map chunk predictions back onto the original sentences.

A cut goes right after sentence-final punctuation (``。！？；!?;``) if one is in reach, else
right after a comma (``，,、``), else anywhere. Each chunk is as long as the rule allows (the
last preferred cut within ``max_len`` characters), so a sentence gives as few chunks as the
rule can. Models train and predict on chunks; evaluation is always on the original sentences,
through :func:`merge_predictions`.

Who may read gold when cutting:

- **Training** chunks (:func:`split_all` on labelled sentences) are never cut inside a gold
  entity (between two characters of one entity, or inside the hull of a non-contiguous one):
  training labels may be read, and a cut entity would only teach a wrong fragment.
- **Dev, test and raw text** are cut blind (:func:`split_blind`): the same punctuation rule on
  the characters alone, exactly as ``crener predict`` cuts text it has never seen. Avoiding a
  gold entity there would read the labels being scored. An entity the blind cut splits cannot
  be predicted whole, so it counts as a miss of the original sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crener.config import MAX_LEN  # the longest piece an encoder reads
from crener.data.schema import Entity, Sentence
from crener.errors import DataError

SENTENCE_FINAL = frozenset("。！？；!?;")
COMMAS = frozenset("，,、")


@dataclass(frozen=True)
class Chunk:
    """A piece of an original sentence: ``sentence`` holds chunk-local entities."""

    sentence: Sentence  # the chunk itself (``line`` = line of its first character when known)
    offset: int  # position of the chunk's first character in the original sentence
    index: int  # position of the original sentence in its split


def split_sentence(sentence: Sentence, max_len: int, index: int = 0) -> list[Chunk]:
    """Cut ``sentence`` into chunks of at most ``max_len`` characters (module docstring)."""
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    n = len(sentence)
    if n <= max_len:
        return [Chunk(sentence, 0, index)]
    # blocked[c]: a cut before character c would fall inside an entity.
    blocked = bytearray(n + 1)
    for entity in sentence.entities:
        blocked[entity.start + 1 : entity.end] = b"\x01" * (entity.end - entity.start - 1)
    chars = sentence.chars
    cuts = [0]
    start = 0
    while n - start > max_len:
        cut = _best_cut(chars, blocked, start, start + max_len)
        if cut is None:
            longest = max(
                (e for e in sentence.entities if e.start < start + max_len and e.end > start),
                key=lambda e: e.end - e.start,
            )
            raise DataError(
                f"sentence {index} ({n} characters) cannot be cut into pieces of at most {max_len}: "
                f"entity {longest.type} {longest.text(chars)!r} spans characters "
                f"{longest.start}..{longest.end - 1}; "
                + (
                    f"raise max_len (data.max_len, at most {MAX_LEN})"
                    if max_len < MAX_LEN
                    else f"max_len is already the encoder's limit ({MAX_LEN}): shorten or drop this sentence"
                ),
                sentence.source,
                None if sentence.line is None else sentence.line + longest.start,
            )
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return [_chunk(sentence, a, b, index) for a, b in zip(cuts, cuts[1:])]


def _best_cut(chars: Sequence[str], blocked: bytearray, start: int, limit: int) -> int | None:
    """The last legal cut in ``(start, limit]`` after final punctuation, else a comma, else any."""
    fallback_comma = fallback_any = None
    for cut in range(limit, start, -1):
        if blocked[cut]:
            continue
        before = chars[cut - 1]
        if before in SENTENCE_FINAL:
            return cut
        if fallback_comma is None and before in COMMAS:
            fallback_comma = cut
        if fallback_any is None:
            fallback_any = cut
    return fallback_comma if fallback_comma is not None else fallback_any


def _chunk(sentence: Sentence, a: int, b: int, index: int) -> Chunk:
    entities = tuple(e.shifted(-a) for e in sentence.entities if a <= e.start and e.end <= b)
    line = None if sentence.line is None else sentence.line + a  # one character per line
    return Chunk(Sentence(sentence.chars[a:b], entities, sentence.source, line), a, index)


def split_all(sentences: Sequence[Sentence], max_len: int) -> list[Chunk]:
    """:func:`split_sentence` over a split; chunks keep the order of their sentences."""
    return [chunk for i, s in enumerate(sentences) for chunk in split_sentence(s, max_len, i)]


def split_blind(sentences: Sequence[Sentence], max_len: int) -> list[Chunk]:
    """Cut sentences without looking at their gold (module docstring): :func:`split_all` over
    copies with no entities. For dev, test and raw text; the chunks carry no entities."""
    bare = [Sentence(s.chars, (), s.source, s.line) for s in sentences]
    return split_all(bare, max_len)


def merge_predictions(
    chunks: Sequence[Chunk], predicted: Sequence[set[Entity]], n_sentences: int
) -> list[set[Entity]]:
    """Per original sentence, the union of its chunks' predictions in sentence coordinates."""
    if len(chunks) != len(predicted):
        raise ValueError(f"{len(chunks)} chunks but {len(predicted)} prediction sets")
    merged: list[set[Entity]] = [set() for _ in range(n_sentences)]
    for chunk, entities in zip(chunks, predicted):
        if not 0 <= chunk.index < n_sentences:
            raise ValueError(f"chunk of sentence {chunk.index} but only {n_sentences} sentences")
        merged[chunk.index].update(e.shifted(chunk.offset) for e in entities)
    return merged
