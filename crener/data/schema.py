"""Plain data records shared by every layer of crener: characters, entities, sentences.

No torch and no numpy here, so the data layer, the metrics and the reports can use these
records without pulling in the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Entity:
    """A typed entity as the ordered character positions it covers.

    All gold entities of the four benchmark datasets are contiguous, but the grid decoder can
    emit any increasing path, so an entity is its index tuple, not a (start, end) pair.
    Two entities are equal iff their indices and type are equal (method.md §5).
    """

    indices: tuple[int, ...]
    type: str

    def __post_init__(self) -> None:
        if not self.indices:
            raise ValueError("an entity covers at least one character")
        if any(b <= a for a, b in zip(self.indices, self.indices[1:])):
            raise ValueError(f"entity indices must be strictly increasing: {self.indices}")

    @classmethod
    def span(cls, start: int, end: int, type: str) -> Entity:
        """Contiguous entity over characters ``start .. end - 1`` (end exclusive)."""
        return cls(tuple(range(start, end)), type)

    @property
    def start(self) -> int:
        return self.indices[0]

    @property
    def end(self) -> int:
        """One past the last character (exclusive), as in Python slices."""
        return self.indices[-1] + 1

    @property
    def is_contiguous(self) -> bool:
        return self.indices[-1] - self.indices[0] + 1 == len(self.indices)

    def shifted(self, offset: int) -> Entity:
        return Entity(tuple(i + offset for i in self.indices), self.type)

    def text(self, chars: tuple[str, ...] | str) -> str:
        return "".join(chars[i] for i in self.indices)


@dataclass(frozen=True)
class Sentence:
    """One sentence: its characters and gold entities, plus where it came from.

    ``source`` and ``line`` (1-based line of the first character) let every error and every
    prediction point back to the input file.
    """

    chars: tuple[str, ...]
    entities: tuple[Entity, ...] = ()
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def text(self) -> str:
        return "".join(self.chars)
