"""CoNLL reader: formats, the lenient repair rule, every bad-input error, real-data counts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crener.data.readers import read_conll
from crener.data.schema import Entity
from crener.errors import DataError


def write(tmp_path: Path, text: str | bytes, name: str = "f.bmes") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def conll(*sentences: str) -> str:
    """``conll("张 B-PER|三 E-PER", ...)``: one string per sentence, tokens separated by ``|``."""
    return "".join("\n".join(s.split("|")) + "\n\n" for s in sentences)


def spans(sentence) -> list[tuple[int, int, str]]:
    return [(e.start, e.end, e.type) for e in sentence.entities]


def raises_at(path: Path, line: int | None, match: str, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        read_conll(path, **kw)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert err.line == line
    if line is not None:
        assert f"{path}:{line}:" in str(err)
    return err


# --- formats ----------------------------------------------------------------------------------


def test_bmes_entities_sources_and_lines(tmp_path):
    path = write(tmp_path, conll("张 B-PER|三 E-PER|在 O|京 S-LOC", "你 O|好 O") + "\n\n王 S-PER\n")
    result = read_conll(path)
    assert result.fmt == "bmes" and result.repaired == 0 and not result.problems
    first, second, third = result.sentences
    assert first.text == "张三在京" and spans(first) == [(0, 2, "PER"), (3, 4, "LOC")]
    assert second.entities == () and third.entities == (Entity.span(0, 1, "PER"),)
    assert [s.line for s in result.sentences] == [1, 6, 11]
    assert all(s.source == str(path) for s in result.sentences)


def test_final_blank_line_optional_tabs_crlf_and_bom(tmp_path):
    a = read_conll(write(tmp_path, "a B-X\nb E-X", "a.bmes"))
    b = read_conll(write(tmp_path, "\ufeffa\tB-X\r\nb  E-X\r\n\r\n", "b.bmes"))
    assert [spans(s) for s in a.sentences] == [spans(s) for s in b.sentences] == [[(0, 2, "X")]]


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        ("北 B-LOC|京 I-LOC|人 O|王 B-PER", "bio"),
        ("北 B-LOC|京 E-LOC|人 O|王 S-PER|五 B-PER|六 I-PER|七 E-PER", "bioes"),
        ("北 B-LOC|京 E-LOC|人 O|王 S-PER|五 B-PER|六 M-PER|七 E-PER", "bmes"),
    ],
)
def test_format_detected(tmp_path, text, fmt):
    result = read_conll(write(tmp_path, conll(text)))
    assert result.fmt == fmt and result.repaired == 0
    assert read_conll(write(tmp_path, conll(text)), fmt=fmt).sentences == result.sentences
    assert spans(result.sentences[0])[0] == (0, 2, "LOC")


def test_bio_adjacent_b_b_are_two_entities(tmp_path):
    result = read_conll(write(tmp_path, conll("a B-X|b B-X|c I-X|d O")))
    assert spans(result.sentences[0]) == [(0, 1, "X"), (1, 3, "X")] and result.repaired == 0


def test_coarse_types_merge_before_chunking(tmp_path):
    path = write(tmp_path, conll("a B-PER.NAM|b E-PER.NOM|c S-GPE.NAM"))
    assert spans(read_conll(path).sentences[0]) == [(0, 1, "PER.NAM"), (1, 2, "PER.NOM"), (2, 3, "GPE.NAM")]
    coarse = read_conll(path, coarse_types=True)
    assert spans(coarse.sentences[0]) == [(0, 2, "PER"), (2, 3, "GPE")] and coarse.repaired == 0


# --- the lenient rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "expected", "repaired"),
    [
        ("O M-X E-X O", [(1, 3, "X")], 1),  # starts with M after O
        ("M-X E-X O O", [(0, 2, "X")], 1),  # starts with M at the sentence start
        ("E-X O O O", [(0, 1, "X")], 1),  # a lone E
        ("B-X O O O", [(0, 1, "X")], 1),  # B closed by O
        ("B-X M-X O O", [(0, 2, "X")], 1),  # B M closed by O
        ("O O B-X M-X", [(2, 4, "X")], 1),  # closed by the end of the sentence
        ("B-X M-X M-Y E-Y", [(0, 2, "X"), (2, 4, "Y")], 2),  # type change (Weibo train)
        ("B-X E-X M-X E-X", [(0, 2, "X"), (2, 4, "X")], 1),  # M right after E opens a new chunk
        ("B-X B-X E-X O", [(0, 1, "X"), (1, 3, "X")], 1),  # B closed by B
        ("B-X S-Y O O", [(0, 1, "X"), (1, 2, "Y")], 1),  # B closed by S
        ("S-X E-X O O", [(0, 1, "X"), (1, 2, "X")], 1),  # E after S
    ],
)
def test_lenient_rule_bmes(tmp_path, tags, expected, repaired):
    text = "|".join(f"{c} {t}" for c, t in zip("abcd", tags.split()))
    result = read_conll(write(tmp_path, conll(text)), fmt="bmes")
    assert spans(result.sentences[0]) == expected
    assert result.repaired == repaired == len(result.repairs)


def test_lenient_rule_bio_and_repair_lines(tmp_path):
    path = write(tmp_path, conll("x O", "a O|b I-X|c I-X|d O|e B-Y|f I-Z"), "f.bio")
    result = read_conll(path)
    assert result.fmt == "bio"
    assert spans(result.sentences[1]) == [(1, 3, "X"), (4, 5, "Y"), (5, 6, "Z")]
    assert result.repaired == 2
    assert [(r.line, r.sentence) for r in result.repairs] == [(4, 1), (8, 1)]


# --- bad input --------------------------------------------------------------------------------


def test_non_utf8_names_line_of_first_bad_byte(tmp_path):
    path = write(tmp_path, "张 B-PER\n三 E-PER\n\n".encode() + b"\xff\xfe O\n" + "好 O\n".encode())
    raises_at(path, 4, "not UTF-8")


def test_line_without_tag(tmp_path):
    raises_at(write(tmp_path, "a O\n\nb O\nc\nd O\n"), 4, "no tag")


def test_three_columns(tmp_path):
    raises_at(write(tmp_path, "a O\nb O\nc O extra\n"), 3, "3 columns")


def test_unknown_prefix(tmp_path):
    raises_at(write(tmp_path, "a O\nb B-PER\nc E-PER\n\nd X-PER\n"), 5, "unknown tag 'X-PER'")


def test_tag_without_type(tmp_path):
    raises_at(write(tmp_path, "a O\nb B-\n"), 2, "no entity type")


def test_prefix_not_of_the_detected_format(tmp_path):
    err = raises_at(write(tmp_path, "a B-PER\nb M-PER\nc E-PER\n\nd B-LOC\ne I-LOC\n"), 6, "not part of BMES")
    assert "detected from M-PER at line 2" in str(err)


def test_prefix_not_of_the_named_format(tmp_path):
    raises_at(write(tmp_path, "a O\nb S-PER\n"), 2, "prefix S- is not part of BIO", fmt="bio")


def test_multi_character_token(tmp_path):
    raises_at(write(tmp_path, "a O\nb O\n\nc O\n科0 O\n"), 5, "2 characters")


def test_empty_file(tmp_path):
    raises_at(write(tmp_path, b""), None, "empty")


def test_file_with_no_sentences(tmp_path):
    raises_at(write(tmp_path, "\n \n\t\n"), None, "no sentences")


def test_missing_file(tmp_path):
    raises_at(tmp_path / "nope.bmes", None, "not found")


def test_collect_mode_reports_every_problem_sorted(tmp_path):
    path = write(tmp_path, b"a O\nbc O\nd\n" + b"\xff O\n" + b"e O x\nf X-Y\ng Q\n\nh X-Y\n")
    result = read_conll(path, errors="collect")
    assert [p.line for p in result.problems] == [2, 3, 4, 5, 6, 7, 9]
    assert all(str(path) in str(p) for p in result.problems)
    assert [s.text for s in result.sentences] == ["afg", "h"]


# --- real data (counts of shared/data/README.md) ----------------------------------------------

# split -> (sentences, characters, lenient entities, repaired = lenient - strict)
README_COUNTS = {
    ("weibo", "train.all.bmes"): (1_350, 73_778, 1_895, 11),
    ("weibo", "dev.all.bmes"): (270, 14_509, 389, 0),
    ("weibo", "test.all.bmes"): (270, 14_842, 418, 4),
    ("resume", "train.char.bmes"): (3_821, 124_099, 13_440, 4),
    ("resume", "dev.char.bmes"): (463, 13_890, 1_497, 0),
    ("resume", "test.char.bmes"): (477, 15_100, 1_630, 0),
    ("ontonotes4", "train.char.bmes"): (15_744, 491_903, 13_372, 0),
    ("ontonotes4", "dev.char.bmes"): (4_301, 200_505, 6_950, 0),
    ("ontonotes4", "test.char.bmes"): (4_346, 208_066, 7_684, 0),
    ("msra", "train.char.bmes"): (46_364, 2_169_879, 74_703, 0),
    ("msra", "test.char.bmes"): (4_365, 172_601, 6_181, 0),
}
WEIBO_TRAIN_TYPES = {
    "PER.NAM": 578, "PER.NOM": 772, "ORG.NAM": 183, "ORG.NOM": 42,
    "LOC.NAM": 56, "LOC.NOM": 51, "GPE.NAM": 205, "GPE.NOM": 8,
}  # fmt: skip
FAST = {"weibo", "resume"}


def _counts(path: Path) -> tuple[int, int, int, int]:
    result = read_conll(path)
    return (
        len(result.sentences),
        sum(len(s) for s in result.sentences),
        sum(len(s.entities) for s in result.sentences),
        result.repaired,
    )


@pytest.mark.parametrize(
    ("dataset", "file"),
    [
        pytest.param(d, f, marks=() if d in FAST else pytest.mark.slow, id=f"{d}/{f}")
        for d, f in README_COUNTS
    ],
)
def test_counts_equal_data_readme(shared_data, dataset, file):
    assert _counts(shared_data / dataset / file) == README_COUNTS[(dataset, file)]


def test_weibo_train_types_and_repairs(shared_data):
    result = read_conll(shared_data / "weibo" / "train.all.bmes")
    types: dict[str, int] = {}
    for s in result.sentences:
        for e in s.entities:
            types[e.type] = types.get(e.type, 0) + 1
    assert types == WEIBO_TRAIN_TYPES
    # 9 spans start with M- after O, and one span changes type midway (two repairs)
    assert sum("[M-" in r.message for r in result.repairs) == 10
    coarse = read_conll(shared_data / "weibo" / "train.all.bmes", coarse_types=True)
    assert {e.type for s in coarse.sentences for e in s.entities} == {"PER", "ORG", "LOC", "GPE"}


@pytest.mark.slow
def test_msra_train_is_fast(shared_data):
    start = time.perf_counter()
    read_conll(shared_data / "msra" / "train.char.bmes")
    assert time.perf_counter() - start < 10  # ~1.5 s on a laptop core; generous for shared CI
