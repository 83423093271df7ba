"""Unlabelled text and starting vectors of `crener pretrain` (crener/tools/pretrain.py): the streamed corpus
reader (plain and .xz, blank lines, byte-order mark, bad bytes, empty files), splitting long lines at
punctuation, the dev/test overlap filter, the evenly spread fraction, the packaged vector readers, the
concatenation of several sources, and the per-dataset dev accuracy written to the card."""

from __future__ import annotations

import json
import lzma
import struct
from collections import Counter

import numpy as np
import pytest
import torch

import crener.tools.pretrain as pretrain_mod
from crener.config import DataConfig
from crener.data.datasets import load_dataset
from crener.errors import CrenerError, DataError
from crener.tools.pretrain import (
    OVERLAP_N,
    PretrainConfig,
    build_corpus,
    evenly_kept,
    iter_text_lines,
    load_start_vectors,
    read_paddle_matrix,
    split_at_punctuation,
    text_path,
    vector_sources,
)
from tests.test_pretrain import TINY, tiny_cfg


def test_xz_and_plain_files_read_alike(tmp_path):
    text = "\ufeff天地玄黄\n\n  宇宙洪荒 \r\n日月盈昃\n"
    plain, packed = tmp_path / "a.txt", tmp_path / "a.txt.xz"
    plain.write_text(text, encoding="utf-8")
    packed.write_bytes(lzma.compress(text.encode("utf-8")))
    expected = [(1, "天地玄黄"), (3, "宇宙洪荒"), (4, "日月盈昃")]
    assert list(iter_text_lines(plain)) == list(iter_text_lines(packed)) == expected


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("bad.txt", "第一行\n".encode() + b"\xff\n", r"bad\.txt:2: not UTF-8"),
        ("bad.txt.xz", lzma.compress("第一行\n".encode() + b"\xc3\x28\n"), r"bad\.txt\.xz:2: not UTF-8"),
        ("blank.txt", b"\n \n\t\n", r"blank\.txt: text file has no non-blank line"),
        ("empty.txt.xz", lzma.compress(b""), r"empty\.txt\.xz: text file has no non-blank line"),
        ("broken.txt.xz", b"not xz at all", r"broken\.txt\.xz: not a readable \.xz file"),
    ],
)
def test_bad_text_files_give_one_error_naming_the_file(tmp_path, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        list(iter_text_lines(path))


def test_a_folder_or_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        list(iter_text_lines(tmp_path))
    with pytest.raises(DataError, match="text file not found"):
        list(iter_text_lines(tmp_path / "missing.txt"))


def test_long_lines_split_after_punctuation_and_join_back():
    line = "今天天气很好，我们去公园散步。" * 3 + "无标点" * 20
    pieces = split_at_punctuation(line, 32)
    assert "".join(pieces) == line
    assert all(len(p) <= 32 for p in pieces)
    # Cut after the last mark of each window: "...散步。" ends the first piece (two clauses fit in 32).
    assert pieces[0] == "今天天气很好，我们去公园散步。今天天气很好，我们去公园散步。"
    # A window with no mark in its second half (the last clause, then unpunctuated text) is cut at
    # the width rather than after the early mark, which would leave a piece of 15 characters.
    assert [len(p) for p in pieces] == [30, 32, 32, 11]
    assert split_at_punctuation("短句。", 32) == ["短句。"]


@pytest.mark.parametrize("fraction", [0.25, 0.1, 1 / 3, 1.0])
def test_fraction_keeps_an_evenly_spread_share(fraction):
    kept = [i for i in range(1000) if evenly_kept(i, fraction)]
    assert len(kept) == int(1000 * fraction)
    gaps = np.diff(kept)
    assert gaps.max() - gaps.min() <= 1  # evenly spread, not the first lines


def test_text_lines_that_overlap_dev_or_test_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_mod, "_cut", lambda text, max_len: [text])
    dev = load_dataset(DataConfig(dataset="resume")).dev
    long_dev = next(s.text for s in dev if len(s.text) >= 20)
    test = load_dataset(DataConfig(dataset="resume")).test
    short_test = next(s.text for s in test if 3 < len(s.text) < OVERLAP_N)
    clean = "天地玄黄宇宙洪荒日月盈昃辰宿列张"
    lines = [
        clean,
        "前缀" + long_dev[3 : 3 + OVERLAP_N] + "后缀",  # shares one 10-character substring: dropped
        "前缀" + long_dev[3 : 3 + OVERLAP_N - 1] + "后缀",  # shares only 9 in a row: kept
        short_test,  # a whole short test sentence: dropped
    ]
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = build_corpus(PretrainConfig(out="unused", datasets=("resume",)))
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("resume",), text=(str(extra),)))
    assert corpus.pieces[len(base.pieces) :] == [lines[0], lines[2]]
    assert corpus.dropped == base.dropped + 2
    assert corpus.text_lines == {"text/extra.txt": 4}


def test_the_shared_corpus_is_known_by_name():
    path = text_path("xwlb")
    assert path.parts[-3:] == ("corpus", "xwlb-news", "xwlb.txt.xz")
    assert text_path("some/file.txt").as_posix() == "some/file.txt"


def test_vector_specs_name_sources_in_order():
    assert vector_sources(None) == vector_sources("none") == []
    assert vector_sources("default") == ["people"]
    assert vector_sources("lac+default+my.vec") == ["lac", "people", "my.vec"]


def test_paddle_matrix_reader_skips_the_header(tmp_path):
    matrix = np.arange(12, dtype="<f4").reshape(3, 4)
    desc = b"\x08\x05\x10\x03\x10\x04"  # a TensorDesc: FP32, dims 3 x 4 (its bytes are skipped)
    header = struct.pack("<IQIi", 0, 0, 0, len(desc)) + desc
    (tmp_path / "emb").write_bytes(header + matrix.tobytes())
    np.testing.assert_array_equal(read_paddle_matrix(tmp_path / "emb", 3), matrix)
    with pytest.raises(DataError, match="not 5 float32 rows"):
        read_paddle_matrix(tmp_path / "emb", 5)


def _w2v(path, rows: dict[str, list[float]]) -> str:
    dim = len(next(iter(rows.values())))
    body = "".join(f"{t} {' '.join(map(str, v))}\n" for t, v in rows.items())
    path.write_text(f"{len(rows)} {dim}\n{body}", encoding="utf-8")
    return str(path)


def test_sources_concatenate_with_zeros_where_one_lacks_a_token(tmp_path):
    a = _w2v(tmp_path / "a.vec", {"甲": [3.0, 4.0], "乙": [6.0, 8.0], "<UNK>": [0.0, 5.0]})  # mean norm 20/3
    b = _w2v(tmp_path / "b.vec", {"乙": [1.0, 0.0, 0.0], "丙": [0.0, 0.0, 1.0]})  # mean norm 1
    start = load_start_vectors(f"{a}+{b}")
    assert sorted(start.vectors) == ["[UNK]", "丙", "乙", "甲"]  # <UNK> becomes BERT's [UNK]
    np.testing.assert_allclose(start.vectors["甲"], [0.45, 0.6, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(start.vectors["乙"], [0.9, 1.2, 1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(start.vectors["丙"], [0, 0, 0, 0, 1], atol=1e-6)
    assert start.vocab_tokens == {"甲", "乙", "丙", "<UNK>"}
    assert list(start.files) == ["vectors/" + a, "vectors/" + b]


def test_packaged_sources_are_read_when_installed():
    pytest.importorskip("jieba")
    lac = load_start_vectors("lac")
    assert len(lac.vectors) > 20_000 and lac.vectors["北"].shape == (128,)
    assert lac.vocab_tokens == set()  # packaged sources start characters; they add none
    sim = {c: float(lac.vectors["北"] @ lac.vectors[c]) for c in ("南", "猫")}
    assert sim["南"] > sim["猫"]  # a real embedding: directions are neighbours


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(pretrain_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps simplechinese==0\.2\.15"):
        load_start_vectors("wiki")
    with pytest.raises(DataError, match=r"pip install -e '\.\[vectors\]'"):
        load_start_vectors("lac")


def test_card_reports_dev_accuracy_of_each_dataset_and_text_inputs(tmp_path):
    extra = tmp_path / "extra.txt.xz"
    extra.write_bytes(lzma.compress("天地玄黄宇宙洪荒。日月盈昃辰宿列张。\n寒来暑往秋收冬藏。\n".encode()))
    cfg = tiny_cfg(tmp_path / "enc", text=(str(extra),), text_fraction=0.5)
    summary = pretrain_mod.pretrain(cfg, workdir=tmp_path / "wd", track=False, progress=False)
    card = json.loads((tmp_path / "enc" / "card.json").read_text(encoding="utf-8"))
    assert set(summary["dev_mlm_accuracy"]) == {"weibo", "resume", "ontonotes4", "msra"}
    assert all(0 <= v <= 1 for v in summary["dev_mlm_accuracy"].values())
    assert summary["text_lines"] == {"text/extra.txt.xz": 2}
    assert summary["tokens_seen"] > 0 and card["config"]["text_fraction"] == 0.5
    from crener.data.digest import file_digest

    assert card["inputs"]["text/extra.txt.xz"]["sha256"] == file_digest(extra)
    readme = (tmp_path / "enc" / "README.md").read_text(encoding="utf-8")
    assert "| resume |" in readme and "an evenly spread 0.5 of its lines" in readme
    # The identity of a config at the defaults of the newer fields is that of the older cards.
    assert "text_fraction" not in PretrainConfig(out="x", **TINY).identity()


def test_continued_pretraining_starts_from_the_encoder_row_by_token(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertTokenizer

    first = tiny_cfg(tmp_path / "first", steps=2)
    pretrain_mod.pretrain(first, workdir=tmp_path / "wd1", track=False, progress=False)
    extra = tmp_path / "extra.txt"
    extra.write_text("鑫鑫鑫森森森淼淼淼。\n", encoding="utf-8")  # characters Resume's training text may lack
    then = tiny_cfg(tmp_path / "then", init_from=str(tmp_path / "first"), text=(str(extra),), steps=0)
    pretrain_mod.pretrain(then, workdir=tmp_path / "wd2", track=False, progress=False)
    old, new = (load_file(tmp_path / d / "model.safetensors") for d in ("first", "then"))
    old_vocab, new_vocab = (
        BertTokenizer.from_pretrained(tmp_path / d).get_vocab() for d in ("first", "then")
    )
    assert set(old_vocab) < set(new_vocab)  # the new text brought characters
    emb = "embeddings.word_embeddings.weight"
    for tok in ("[UNK]", "的", "公", "司"):  # the same vector under another id
        assert torch.equal(new[emb][new_vocab[tok]], old[emb][old_vocab[tok]])
    assert all(torch.equal(new[k], old[k]) for k in old if k != emb)  # zero steps: layers as they were
    card = json.loads((tmp_path / "then" / "card.json").read_text(encoding="utf-8"))
    assert card["config"]["init_from"] == str(tmp_path / "first")
    assert "init/first" in card["inputs"]
    with pytest.raises(pretrain_mod.CrenerError, match="--hidden 16"):
        pretrain_mod.pretrain(
            tiny_cfg(tmp_path / "x", init_from=str(tmp_path / "first"), hidden=32), workdir=tmp_path / "wd3",
            track=False, progress=False,
        )  # fmt: skip


@pytest.mark.slow
def test_no_dev_or_test_text_of_any_dataset_reaches_pretraining_from_the_news_corpus():
    """The real corpus, all four datasets: no piece of news text equals or shares OVERLAP_N
    characters with a dev or test sentence, and no piece at all is a dev or test sentence."""
    from crener.tools.pretrain import ngrams, overlaps

    held: set[str] = set()
    for name in ("weibo", "resume", "ontonotes4", "msra"):
        data = load_dataset(DataConfig(dataset=name, msra_protocol="clean"))
        held.update(s.text for s in (*data.dev, *data.test))
    base = build_corpus(PretrainConfig(out="unused"))
    corpus = build_corpus(PretrainConfig(out="unused", text=("xwlb",)))
    assert corpus.pieces[: len(base.pieces)] == base.pieces
    news = corpus.pieces[len(base.pieces) :]
    assert len(news) > 780_000 and corpus.text_lines == {"text/xwlb.txt.xz": 783_689}
    assert not held & set(corpus.pieces)
    grams = ngrams(held)
    assert not [p for p in news if overlaps(p, grams)]


def test_card_names_the_commit_the_build_started_at_and_the_one_it_resumed_at(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "enc", steps=4, save_every=2)
    monkeypatch.setattr(pretrain_mod, "git_commit", lambda: "a" * 40)
    pretrain_mod.pretrain(cfg, workdir=tmp_path / "wd", track=False, progress=False, stop_after=2)
    monkeypatch.setattr(pretrain_mod, "git_commit", lambda: "b" * 40)  # HEAD moved during the build
    pretrain_mod.pretrain(cfg, workdir=tmp_path / "wd", track=False, progress=False)
    card = json.loads((tmp_path / "enc" / "card.json").read_text(encoding="utf-8"))
    assert (card["commit"], card["resumed_commit"]) == ("a" * 40, "b" * 40)


def test_datasets_repeat_reads_each_split_piece_that_many_times_and_no_held_out_piece(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("".join(f"天地玄黄宇宙洪荒{i}。\n" for i in range(40)), encoding="utf-8")
    once = pretrain_mod.prepare_mlm_data(tiny_cfg(tmp_path / "a", text=(str(extra),)))
    thrice = pretrain_mod.prepare_mlm_data(tiny_cfg(tmp_path / "b", text=(str(extra),), datasets_repeat=3))
    corpus = once.corpus
    assert 0 < corpus.split_pieces < len(corpus.pieces)
    # The same pieces are held out; the splits' training rows appear 3 times, the text's once.
    held = {tuple(r) for r in once.held_rows}
    assert held == {tuple(r) for r in thrice.held_rows}
    split_rows = {tuple(r) for r in pretrain_mod.to_ids(corpus.pieces[: corpus.split_pieces], once.vocab)}
    text_rows = {tuple(r) for r in pretrain_mod.to_ids(corpus.pieces[corpus.split_pieces :], once.vocab)}
    read_once, read_thrice = Counter(map(tuple, once.train_rows)), Counter(map(tuple, thrice.train_rows))
    assert all(
        read_thrice[r] == 3 * read_once[r] for r in read_once if r in split_rows and r not in text_rows
    )
    assert all(read_thrice[r] == read_once[r] for r in read_once if r in text_rows and r not in split_rows)
    n_split = sum(n for r, n in read_once.items() if r in split_rows and r not in text_rows)
    assert len(thrice.train_rows) - len(once.train_rows) == 2 * n_split > 0
    # What the card counts and how rare a character is do not change with sampling.
    assert thrice.characters == once.characters == sum(once.lengths)
    assert torch.equal(thrice.unk_prob, once.unk_prob)


def test_datasets_repeat_is_in_the_identity_and_command_only_off_its_default(tmp_path):
    assert "datasets_repeat" not in PretrainConfig(out="x", **TINY).identity()
    cfg = PretrainConfig(out="x", text=("xwlb",), datasets_repeat=4)
    assert cfg.identity()["datasets_repeat"] == 4 and "--datasets-repeat 4" in cfg.command()
    with pytest.raises(CrenerError, match="--datasets-repeat 0"):
        PretrainConfig(out="x", datasets_repeat=0)
