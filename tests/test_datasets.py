"""Dataset registry, data-root resolution, split protocols, budgets and the read cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from crener.config import DataConfig
from crener.data import datasets
from crener.data.datasets import (
    DATA_ENV,
    DATASETS,
    MSRA_CLEAN_DEV_SIZE,
    load_dataset,
    read_split,
    register_dataset,
    resolve_data_root,
)
from crener.errors import DataError


def _write(path: Path, n: int, tag: str = "S-X") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{chr(0x4E00 + i)} {tag}\n字 O\n\n" for i in range(n)), encoding="utf-8")


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registered toy dataset with train/test only (like MSRA), under tmp_path."""
    _write(tmp_path / "toy" / "train.txt", 20)
    _write(tmp_path / "toy" / "test.txt", 5, "S-Y")
    monkeypatch.setitem(DATASETS, "toy", DATASETS["msra"])  # restored after the test
    register_dataset("toy", "toy", {"train": "train.txt", "test": "test.txt"}, "bmes")
    return tmp_path


def test_registry_has_the_four_benchmarks():
    assert {"weibo", "resume", "ontonotes4", "msra"} <= set(DATASETS)
    assert DATASETS["weibo"].files["dev"] == "dev.all.bmes"
    assert DATASETS["ontonotes4"].files["test"] == "test.char.bmes"
    assert "dev" not in DATASETS["msra"].files


def test_register_dataset_validates():
    with pytest.raises(ValueError, match="train and test"):
        register_dataset("bad", "x", {"train": "a"})
    with pytest.raises(ValueError, match="fmt"):
        register_dataset("bad", "x", {"train": "a", "test": "b"}, fmt="iob2")
    assert "bad" not in DATASETS


def test_resolve_data_root_order(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    (tmp_path / "cli").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_root() == tmp_path / "env"


def test_resolve_data_root_missing_names_the_path(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="--data-root") as info:
        resolve_data_root(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and DATA_ENV in str(info.value)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=DATA_ENV) as info:
        resolve_data_root()
    assert str(tmp_path / "gone") in str(info.value)


def test_resolve_data_root_searches_upwards(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "elsewhere" / "datasets.py"))
    assert resolve_data_root() == tmp_path / "shared" / "data"


def test_resolve_data_root_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "pkg" / "datasets.py"))
    if any((p / "shared" / "data").is_dir() for p in (tmp_path, *tmp_path.parents)):
        pytest.skip("a shared/data directory exists above tmp_path")
    with pytest.raises(DataError, match=f"{DATA_ENV}.*tried .*shared/data"):
        resolve_data_root()


def test_unknown_dataset_and_split(toy):
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset(DataConfig(dataset="nope"), data_root=str(toy))
    with pytest.raises(DataError, match="no dev split"):
        DATASETS["toy"].path("dev", toy)


def test_lineage_protocol_dev_is_test(toy):
    splits = load_dataset(DataConfig(dataset="toy"), data_root=str(toy))
    assert splits.dev_is_test and splits.dev == splits.test and len(splits.train) == 20
    # Y occurs only in test (= dev here): the label set never reads test labels.
    assert splits.types == ("X",) and splits.repaired == {"train": 0, "dev": 0, "test": 0}
    assert "lineage" in splits.notes[0]


def test_types_come_from_train_and_dev_never_test(tmp_path, monkeypatch):
    _write(tmp_path / "tri" / "train.txt", 6, "S-X")
    _write(tmp_path / "tri" / "dev.txt", 3, "S-D")
    _write(tmp_path / "tri" / "test.txt", 4, "S-T")
    monkeypatch.setitem(DATASETS, "tri", DATASETS["msra"])  # restored after the test
    register_dataset("tri", "tri", {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}, "bmes")
    splits = load_dataset(DataConfig(dataset="tri"), data_root=str(tmp_path))
    assert splits.types == ("D", "X")
    assert {e.type for s in splits.test for e in s.entities} == {"T"}  # still scored: as misses


def test_clean_protocol_holds_out_last_train_sentences(toy):
    register_dataset("toy", "toy", {"train": "train.txt", "test": "test.txt"}, "bmes", clean_dev_size=4)
    full = load_dataset(DataConfig(dataset="toy"), data_root=str(toy))
    clean = load_dataset(DataConfig(dataset="toy", msra_protocol="clean"), data_root=str(toy))
    assert not clean.dev_is_test
    assert clean.train == full.train[:-4] and clean.dev == full.train[-4:]
    assert clean.test == full.test


def test_clean_protocol_default_fraction(toy):
    clean = load_dataset(DataConfig(dataset="toy", msra_protocol="clean"), data_root=str(toy))
    assert (len(clean.train), len(clean.dev)) == (18, 2)


def test_budgets(toy):
    base = DataConfig(dataset="toy")
    full = load_dataset(base, data_root=str(toy))
    a = load_dataset(DataConfig(dataset="toy", train_limit=7, eval_limit=3), seed=1, data_root=str(toy))
    b = load_dataset(DataConfig(dataset="toy", train_limit=7, eval_limit=3), seed=1, data_root=str(toy))
    c = load_dataset(DataConfig(dataset="toy", train_limit=7), seed=2, data_root=str(toy))
    assert a.train == b.train and a.train != c.train and len(a.train) == 7
    assert set(a.train) <= set(full.train)
    assert a.dev == full.dev[:3] and a.test == full.test  # test is always whole
    assert a.types == full.types


def test_empty_split_names_the_file(toy):
    register_dataset("toy", "toy", {"train": "train.txt", "test": "test.txt"}, "bmes", clean_dev_size=20)
    with pytest.raises(DataError, match="train.txt") as info:
        load_dataset(DataConfig(dataset="toy", msra_protocol="clean"), data_root=str(toy))
    assert "clean protocol" in str(info.value)


def test_blank_file_names_the_file(toy):
    (toy / "toy" / "test.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="test.txt: no sentences"):
        load_dataset(DataConfig(dataset="toy"), data_root=str(toy))


def test_cache_is_keyed_on_mtime_and_hands_out_copies(toy):
    path = toy / "toy" / "train.txt"
    first = read_split(path, "bmes")
    first.sentences.clear()  # must not reach the cache
    assert len(read_split(path, "bmes").sentences) == 20
    hits = datasets._read_cached.cache_info().hits
    read_split(path, "bmes")
    assert datasets._read_cached.cache_info().hits == hits + 1
    _write(path, 3)
    assert len(read_split(path, "bmes").sentences) == 3


# --- real data --------------------------------------------------------------------------------


def test_resume(shared_data):
    splits = load_dataset(DataConfig(dataset="resume"))
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (3_821, 463, 477)
    assert splits.types == ("CONT", "EDU", "LOC", "NAME", "ORG", "PRO", "RACE", "TITLE")
    assert splits.repaired == {"train": 4, "dev": 0, "test": 0} and not splits.dev_is_test


def test_weibo_coarse(shared_data):
    splits = load_dataset(DataConfig(dataset="weibo", weibo_coarse=True))
    assert splits.types == ("GPE", "LOC", "ORG", "PER")


@pytest.mark.slow
def test_msra_protocols(shared_data):
    lineage = load_dataset(DataConfig(dataset="msra"))
    assert lineage.dev_is_test and lineage.dev == lineage.test
    assert (len(lineage.train), len(lineage.test)) == (46_364, 4_365)
    clean = load_dataset(DataConfig(dataset="msra", msra_protocol="clean"))
    assert (len(clean.train), len(clean.dev), len(clean.test)) == (41_999, MSRA_CLEAN_DEV_SIZE, 4_365)
    assert clean.dev == lineage.train[-MSRA_CLEAN_DEV_SIZE:]
    assert lineage.types == clean.types == ("NR", "NS", "NT")
