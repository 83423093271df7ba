"""Read character-level CoNLL files (BMES, BIO, BIOES) into :class:`~crener.data.schema.Sentence`.

File format: one token per line, ``<one character><whitespace><tag>``; a blank (or
whitespace-only) line ends a sentence; the final blank line is optional. Tags are ``O`` or
``<prefix>-<type>`` with the prefixes of the format: BMES ``B M E S``, BIO ``B I``, BIOES
``B I E S``. With ``fmt="auto"`` the format is detected from the prefixes that occur.

Malformed spans follow ONE rule, the conlleval "lenient" rule of the data README:

* a chunk **starts** at ``B``/``S``, at an ``M``/``E``/``I`` when no chunk is open (after
  ``O``, after a chunk closed by ``E``/``S``, or at the start of a sentence), or where the
  type changes;
* a chunk **ends** at ``E``/``S``, at ``O``, where the type changes, at a following ``B``/``S``,
  or at the end of the sentence.

A chunk that is not well formed in its scheme (BMES/BIOES: not ``B (M|I)* E`` or ``S``; BIO:
not ``B I*``) is still returned as an entity and counted in :attr:`ReadResult.repaired`, with
its line in :attr:`ReadResult.repairs`; nothing is silently dropped. With this rule the entity
counts equal the "lenient" columns of ``shared/data/README.md`` and ``repaired`` equals
lenient minus strict.

Bad input (bytes that are not UTF-8, a line without a tag, three or more columns, a token of
more than one character, an unknown tag or a prefix not of the format, an empty file, a file
with no sentence) raises :class:`~crener.errors.DataError` naming the file and line, or, with
``errors="collect"``, is gathered in :attr:`ReadResult.problems` so ``crener data check`` can
report every problem at once.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crener.data.schema import Entity, Sentence
from crener.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("bmes", "bio", "bioes")
# Prefixes each format allows (besides the bare tag "O").
PREFIXES: dict[str, frozenset[str]] = {
    "bmes": frozenset("BMES"),
    "bio": frozenset("BI"),
    "bioes": frozenset("BIES"),
}
OUTSIDE = "O"
_KNOWN_PREFIXES = frozenset("BMEIS")
_STARTS = frozenset("BS")  # prefixes that always open a new chunk
_ENDS = frozenset("ES")  # prefixes that close the chunk they are in
# A sentence block of well-formed "<char> <tag>" lines only (the common case, parsed in C).
_FAST_BLOCK = re.compile(r"(?:\S \S+\n)*\S \S+\n?")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes under surrogateescape


@dataclass(frozen=True)
class Repair:
    """One malformed span that the lenient rule turned into an entity."""

    line: int  # 1-based line of the span's first character
    sentence: int  # index of the sentence in the file
    message: str


@dataclass
class ReadResult:
    """What :func:`read_conll` returns."""

    sentences: list[Sentence]
    fmt: str  # the format used ("bmes", "bio" or "bioes"), detected when asked for "auto"
    repaired: int = 0  # number of malformed spans repaired by the lenient rule
    repairs: list[Repair] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)  # only filled with errors="collect"


def read_conll(
    path: str | Path,
    fmt: str = "auto",
    coarse_types: bool = False,
    errors: str = "raise",
) -> ReadResult:
    """Read one CoNLL file.

    Args:
        path: the file.
        fmt: ``"auto"`` (detect from the tags), ``"bmes"``, ``"bio"`` or ``"bioes"``.
        coarse_types: drop the ``.NAM``/``.NOM`` suffix of Weibo types (``PER.NAM`` -> ``PER``);
            applied to the tags before chunking, so ``B-PER.NAM E-PER.NOM`` is one ``PER``.
        errors: ``"raise"`` (first problem raises :class:`DataError`) or ``"collect"`` (bad
            lines are skipped and every problem is returned in ``problems``).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors={errors!r} is not one of raise, collect")
    return _Reader(Path(path), fmt, coarse_types, errors == "collect").read()


class _Reader:
    def __init__(self, path: Path, fmt: str, coarse: bool, collect: bool):
        self.path = path
        self.name = str(path)
        self.fmt = fmt
        self.coarse = coarse
        self.collect = collect
        self.problems: list[DataError] = []
        self.text = ""
        self.bad_lines: frozenset[int] = frozenset()  # lines with undecodable bytes (collect mode)

    @functools.cached_property
    def lines(self) -> list[str]:
        """The file's lines; only error paths need them."""
        return self.text.split("\n")

    def problem(self, message: str, line: int | None = None) -> None:
        err = DataError(message, self.name, line)
        if not self.collect:
            raise err
        self.problems.append(err)

    def read(self) -> ReadResult:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # millions of new objects, no cycles: collection passes are pure overhead
        try:
            text, bad_bytes = self._decode()
            self.text = text
            self.bad_lines = self._bad_byte_lines() if bad_bytes else frozenset()
            raw = self._split_sentences(text, self.bad_lines)
            if not raw:
                n = text.count("\n") + (not text.endswith("\n"))
                self.problem(f"no sentences: all {n} lines are blank or unreadable")
                return ReadResult([], "bmes" if self.fmt == "auto" else self.fmt, problems=self.problems)
            tag_info = self._parse_tags({t for _, _, tags in raw for t in set(tags)})
            sentences, repairs = self._chunk(raw, tag_info)
        finally:
            if gc_was_enabled:
                gc.enable()
        self.problems.sort(key=lambda err: err.line or 0)
        return ReadResult(sentences, self.fmt, len(repairs), repairs, self.problems)

    # --- bytes -> text ---------------------------------------------------------------------
    def _decode(self) -> tuple[str, bool]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise DataError("file not found", self.name) from None
        except IsADirectoryError:
            raise DataError("is a directory, expected a CoNLL file", self.name) from None
        except OSError as exc:
            raise DataError(f"cannot read: {exc.strerror}", self.name) from None
        if not data:
            raise DataError("file is empty (0 bytes)", self.name)
        try:
            text = data.decode("utf-8")
            bad = False
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            message = f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}"
            if not self.collect:
                raise DataError(message, self.name, line) from None
            text, bad = data.decode("utf-8", errors="surrogateescape"), True
        return (text[1:] if text.startswith("\ufeff") else text), bad

    def _bad_byte_lines(self) -> frozenset[int]:
        bad = set()
        for lineno, line in enumerate(self.lines, 1):
            if _SURROGATE.search(line):
                bad.add(lineno)
                self.problem("not UTF-8: undecodable bytes on this line", lineno)
        return frozenset(bad)

    def _first_lines(self, tags: set[str] | dict[str, str]) -> dict[str, int]:
        """First line of each of ``tags`` (a scan of the file; only on error paths)."""
        first: dict[str, int] = {}
        for lineno, line in enumerate(self.lines, 1):
            parts = line.split()
            if len(parts) == 2 and parts[1] in tags and parts[1] not in first:
                first[parts[1]] = lineno
                if len(first) == len(tags):
                    break
        return first

    # --- text -> (first line, chars, tags) per sentence --------------------------------------
    def _split_sentences(
        self, text: str, bad_lines: frozenset[int]
    ) -> list[tuple[int, list[str], list[str]]]:
        """Cut the text into sentences. The hot path: MSRA train is 2.2M lines.

        Blocks between blank lines that are exactly ``<char> <tag>`` lines (one regex match)
        are split in C; anything else (tabs, CRLF, whitespace-only lines, errors) goes line by
        line through :meth:`_parse_lines`, which knows every problem and its line.
        """
        sentences: list[tuple[int, list[str], list[str]]] = []
        intern = {}.setdefault  # one str object per distinct character (saves ~150 MB on MSRA)
        lineno = 1  # line of the block's first line
        for block in text.split("\n\n"):
            if not bad_lines and _FAST_BLOCK.fullmatch(block):
                tokens = block.split()
                chars = tokens[0::2]
                sentences.append((lineno, list(map(intern, chars, chars)), tokens[1::2]))
            elif block:
                self._parse_lines(block.split("\n"), lineno, bad_lines, intern, sentences)
            lineno += block.count("\n") + 2
        return sentences

    def _parse_lines(self, lines, first_line, bad_lines, intern, sentences) -> None:
        chars: list[str] = []
        tags: list[str] = []
        start = 0
        for lineno, line in enumerate(lines, first_line):
            parts = line.split()
            if lineno in bad_lines:
                continue
            if len(parts) == 2:
                ch, tag = parts
                if len(ch) != 1:
                    self.problem(f"token {ch!r} has {len(ch)} characters; expected one character", lineno)
                    continue
                if not chars:
                    start = lineno
                chars.append(intern(ch, ch))
                tags.append(tag)
            elif not parts:
                if chars:
                    sentences.append((start, chars, tags))
                    chars, tags = [], []
            elif len(parts) == 1:
                self.problem(f"no tag: expected '<char> <tag>', found only {parts[0]!r}", lineno)
            else:
                self.problem(f"{len(parts)} columns: expected '<char> <tag>', found {line.strip()!r}", lineno)
        if chars:
            sentences.append((start, chars, tags))

    # --- tags -> (prefix, type), format detection ------------------------------------------
    def _parse_tags(self, distinct: set[str]) -> dict[str, tuple[str, str] | None]:
        """Map each distinct tag to ``(prefix, type)``; ``None`` for ``O`` and for bad tags."""
        info: dict[str, tuple[str, str] | None] = {}
        bad: dict[str, str] = {}  # tag -> message
        for tag in distinct:
            if tag == OUTSIDE:
                info[tag] = None
                continue
            prefix, sep, type_ = tag.partition("-")
            if not sep or prefix not in _KNOWN_PREFIXES:
                bad[tag] = f"unknown tag {tag!r}: expected O or a B-/M-/E-/S-/I- prefix and a type"
            elif not type_:
                bad[tag] = f"tag {tag!r} has no entity type after {prefix}-"
            else:
                info[tag] = (prefix, type_.split(".", 1)[0] if self.coarse else type_)
        self._resolve_format(info, bad)
        if bad:
            first = self._first_lines(bad)
            if not self.collect:
                tag = min(bad, key=first.__getitem__)
                raise DataError(bad[tag], self.name, first[tag])
            for lineno, line in enumerate(self.lines, 1):
                parts = line.split()
                if len(parts) == 2 and parts[1] in bad and lineno not in self.bad_lines:
                    self.problem(bad[parts[1]], lineno)
            for tag in bad:
                info[tag] = None  # collect mode: a bad tag reads as O
        return info

    def _resolve_format(self, info: dict[str, tuple[str, str] | None], bad: dict[str, str]) -> None:
        prefixes = {value[0] for value in info.values() if value is not None}
        detected = ""
        if self.fmt == "auto":
            if prefixes <= {"B"}:
                self.fmt = "bio"
            elif prefixes <= PREFIXES["bmes"]:
                self.fmt = "bmes"
            elif prefixes <= PREFIXES["bio"]:
                self.fmt = "bio"
            elif prefixes <= PREFIXES["bioes"]:
                self.fmt = "bioes"
            else:  # both M- and I- occur: the one seen first decides, the other is the error
                marked = {t: v[0] for t, v in info.items() if v is not None and v[0] in "MI"}
                first = self._first_lines(marked)
                first_tag = min(first, key=first.__getitem__)
                self.fmt = "bmes" if marked[first_tag] == "M" else "bioes"
                detected = f"; format {self.fmt.upper()} detected from {first_tag} at line {first[first_tag]}"
            log.debug("%s: format %s", self.name, self.fmt)
        allowed = PREFIXES[self.fmt]
        for tag, value in list(info.items()):
            if value is not None and value[0] not in allowed:
                bad[tag] = (
                    f"tag {tag!r}: prefix {value[0]}- is not part of {self.fmt.upper()} "
                    f"(prefixes {'/'.join(sorted(allowed))} and O){detected}"
                )
                info[tag] = None

    # --- tags -> entities (the lenient rule) -----------------------------------------------
    def _chunk(self, raw, tag_info) -> tuple[list[Sentence], list[Repair]]:
        bio = self.fmt == "bio"
        source = self.name
        sentences: list[Sentence] = []
        repairs: list[Repair] = []
        for sent_index, (start_line, chars, tags) in enumerate(raw):
            entities: list[Entity] = []
            positions = [i for i, t in enumerate(tags) if t != OUTSIDE]
            if positions:
                for start, end, type_, well_formed in lenient_chunks(positions, tags, tag_info, bio):
                    entities.append(Entity(tuple(range(start, end)), type_))
                    if not well_formed:
                        span = " ".join(tags[start:end])
                        message = f"malformed span [{span}] read as one {type_} entity"
                        repairs.append(Repair(start_line + start, sent_index, message))
                        log.debug("%s:%d: %s", source, start_line + start, message)
            sentences.append(Sentence(tuple(chars), tuple(entities), source, start_line))
        return sentences, repairs


def lenient_chunks(
    positions: Sequence[int],
    tags: Sequence[str],
    tag_info: Mapping[str, tuple[str, str] | None],
    bio: bool,
) -> list[tuple[int, int, str, bool]]:
    """``(start, end, type, well_formed)`` of every chunk of one sentence: THE lenient rule (module
    docstring), for gold files here and for the sequence taggers' predicted BIOES tags.

    ``positions`` are the indices of the non-``O`` tags; a gap between two of them is an ``O``.
    ``tag_info`` maps each tag to its ``(prefix, type)`` (None: a bad tag, read as ``O``); ``bio``:
    a chunk closed without ``E``/``S`` is well formed (BIO has neither).
    """
    chunks: list[tuple[int, int, str, bool]] = []
    open_start = -1  # start of the open chunk, -1 when none is open
    open_type = ""
    open_ok = False  # the open chunk started with B/S
    prev = -2
    for i in positions:
        parsed = tag_info[tags[i]]
        if parsed is None:  # a bad tag in collect mode reads as O
            continue
        prefix, type_ = parsed
        if open_start >= 0 and (prev != i - 1 or type_ != open_type or prefix in _STARTS):
            # closed by O, a type change or a new B/S, without E: well formed in BIO only
            chunks.append((open_start, prev + 1, open_type, open_ok and bio))
            open_start = -1
        if open_start < 0:
            open_start, open_type, open_ok = i, type_, prefix in _STARTS
        if prefix in _ENDS:
            chunks.append((open_start, i + 1, open_type, open_ok))
            open_start = -1
        prev = i
    if open_start >= 0:  # closed by the end of the sentence
        chunks.append((open_start, prev + 1, open_type, open_ok and bio))
    return chunks
