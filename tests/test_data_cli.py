"""``crener data stats|check|bench`` through :func:`crener.cli.main` and the console script."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crener.cli import main
from crener.data.datasets import DATASETS, register_dataset

README = {  # shared/data/README.md: sentences, characters, lenient entities per split
    "weibo": {"train": (1_350, 73_778, 1_895), "dev": (270, 14_509, 389), "test": (270, 14_842, 418)},
    "resume": {"train": (3_821, 124_099, 13_440), "dev": (463, 13_890, 1_497), "test": (477, 15_100, 1_630)},
    "ontonotes4": {
        "train": (15_744, 491_903, 13_372),
        "dev": (4_301, 200_505, 6_950),
        "test": (4_346, 208_066, 7_684),
    },
    "msra": {"train": (46_364, 2_169_879, 74_703), "test": (4_365, 172_601, 6_181)},
}


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A registered dataset with one malformed span and one sentence of 12 characters."""
    d = tmp_path / "toy"
    d.mkdir()
    (d / "train.txt").write_text(
        "张 B-PER\n三 E-PER\n在 O\n\n" + "".join(f"{c} O\n" for c in "一二三四五六七八九十百千") + "\n",
        encoding="utf-8",
    )
    (d / "test.txt").write_text("北 M-LOC\n京 E-LOC\n", encoding="utf-8")
    monkeypatch.setitem(DATASETS, "toy", DATASETS["msra"])  # restored after the test
    register_dataset("toy", "toy", {"train": "train.txt", "test": "test.txt"})
    return tmp_path


# --- stats ------------------------------------------------------------------------------------


def test_stats_json_is_one_object_with_the_documented_keys(capsys, toy):
    code, out = run(capsys, "data", "stats", "toy", "--json", "--data-root", str(toy), "--max-len", "10")
    assert code == 0
    stats = json.loads(out)  # exactly one JSON document on stdout
    assert set(stats) == {"dataset", "splits"} and stats["dataset"] == "toy"
    assert list(stats["splits"]) == ["train", "test"]
    train, test = stats["splits"]["train"], stats["splits"]["test"]
    assert set(train) == {
        "sentences", "characters", "entities", "types", "repaired_spans", "over_max_len", "lengths", "roundtrip"
    }  # fmt: skip
    assert (train["sentences"], train["characters"], train["entities"]) == (2, 15, 1)
    assert train["types"] == {"PER": 1} and train["over_max_len"] == 1 and train["repaired_spans"] == 0
    assert train["lengths"] == {"mean": 7.5, "p50": 3, "p95": 3, "max": 12}
    assert test["repaired_spans"] == 1 and test["types"] == {"LOC": 1}
    assert train["roundtrip"] == {"crener": {"ok": 2, "total": 2}, "w2ner": {"ok": 2, "total": 2}}


def test_stats_table(capsys, toy):
    code, out = run(capsys, "data", "stats", "toy", "--split", "test", "--data-root", str(toy))
    assert code == 0
    assert "round trip crener" in out and "entities by type" in out and "LOC" in out
    assert "train" not in out.split("entities by type")[0]


def test_stats_resume_dev(capsys, shared_data):
    code, out = run(capsys, "data", "stats", "resume", "--split", "dev", "--json")
    dev = json.loads(out)["splits"]["dev"]
    assert code == 0 and (dev["sentences"], dev["characters"], dev["entities"]) == README["resume"]["dev"]
    assert dev["roundtrip"]["crener"] == dev["roundtrip"]["w2ner"] == {"ok": 463, "total": 463}
    assert dev["lengths"]["p95"] == 75 and dev["lengths"]["max"] == 178  # method.md §7


def test_stats_coarse(capsys, shared_data):
    code, out = run(capsys, "data", "stats", "weibo", "--split", "dev", "--json", "--coarse")
    assert code == 0 and set(json.loads(out)["splits"]["dev"]["types"]) == {"GPE", "LOC", "ORG", "PER"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["data", "stats", "nope"], "unknown dataset 'nope'"),
        (["data", "stats", "resume", "--data-root", "/no/such/dir"], "/no/such/dir"),
        (["data", "stats", "msra", "--split", "dev"], "no dev split"),
        (["data", "bench", "nope"], "unknown dataset"),
    ],
)
def test_stats_bad_input_exits_nonzero_with_message(capsys, caplog, argv, message):
    with caplog.at_level(logging.ERROR):
        code, out = run(capsys, *argv)
    assert code != 0 and out == ""
    assert message in caplog.text


def test_stats_malformed_file_names_file_and_line(capsys, caplog, toy):
    (toy / "toy" / "test.txt").write_text("a O\nb Q-LOC\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR):
        code, _ = run(capsys, "data", "stats", "toy", "--data-root", str(toy))
    assert code == 2 and f"{toy / 'toy' / 'test.txt'}:2:" in caplog.text


# --- check ------------------------------------------------------------------------------------


def test_check_clean_file(capsys, toy):
    code, out = run(capsys, "data", "check", str(toy / "toy" / "train.txt"))
    assert code == 0 and "2 sentences, 1 entities, format BMES, 0 repaired spans, 0 problems" in out


def test_check_reports_every_problem(capsys, tmp_path):
    path = tmp_path / "bad.bmes"
    path.write_bytes(b"a O\nbc O\nd\n\xff O\ne O x\nf X-Y\n\ng B-P\nh E-P\ni M-P\nj I-P\n")
    code, out = run(capsys, "data", "check", str(path))
    assert code == 1
    *problems, summary = out.splitlines()
    assert [p.split(":")[:2] for p in problems] == [[str(path), str(n)] for n in (2, 3, 4, 5, 6, 11)]
    assert "1 repaired spans, 6 problems" in summary


def test_check_named_format(capsys, toy):
    code, out = run(capsys, "data", "check", str(toy / "toy" / "train.txt"), "--format", "bio")
    assert code == 1 and f"{toy / 'toy' / 'train.txt'}:2: tag 'E-PER'" in out


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_check_empty_or_blank_file(capsys, tmp_path, content):
    path = tmp_path / "empty.bmes"
    path.write_bytes(content)
    code, out = run(capsys, "data", "check", str(path))
    assert code == 1 and str(path) in out


# --- bench ------------------------------------------------------------------------------------


def test_bench(capsys, toy):
    code, out = run(capsys, "data", "bench", "toy", "--data-root", str(toy))
    assert code == 0 and "sentences/s" in out and "encode_crener" in out
    code, out = run(capsys, "data", "bench", "toy", "--split", "test", "--json", "--data-root", str(toy))
    result = json.loads(out)
    assert code == 0 and result["sentences"] == 1 and set(result["seconds"]) == {
        "read", "encode_crener", "encode_w2ner"
    }  # fmt: skip


# --- the console script -----------------------------------------------------------------------


def test_console_script(tmp_path):
    script = shutil.which("crener", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the crener console script is not installed (pip install -e .)")
    path = tmp_path / "f.bmes"
    path.write_text("张 B-PER\n三 E-PER\n\n李 S-PER\n", encoding="utf-8")
    ok = subprocess.run([script, "data", "check", str(path)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "2 sentences, 2 entities" in ok.stdout
    path.write_text("张 B-PER\n三\n", encoding="utf-8")
    bad = subprocess.run([script, "data", "check", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and f"{path}:2: no tag" in bad.stdout


# --- whole datasets ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(README))
def test_every_sentence_roundtrips_and_counts_match_readme(shared_data, dataset):
    from crener.data.commands import dataset_stats

    stats = dataset_stats(dataset)
    for split, (sentences, characters, entities) in README[dataset].items():
        st = stats["splits"][split]
        assert (st["sentences"], st["characters"], st["entities"]) == (sentences, characters, entities)
        for scheme in ("crener", "w2ner"):
            assert st["roundtrip"][scheme] == {"ok": sentences, "total": sentences}, (split, scheme)


def test_data_batches_shows_the_papers_twelve_against_the_cell_budget(shared_data, capsys) -> None:
    """Weibo under `paper`: ceil(1,350 / 12) = 113 steps of 12 sentences (the last 6); under
    `full`'s 20k-cell budget, most batches are one long sentence."""
    from crener.cli import main

    assert main(["data", "batches", "weibo", "--profile", "paper", "--json"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert (paper["chunks"], paper["steps_per_epoch"], paper["sizes"]) == (1350, 113, {"6": 1, "12": 112})
    assert main(["data", "batches", "weibo", "--profile", "full", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["steps_per_epoch"] > 3 * paper["steps_per_epoch"] and full["median_batch"] == 1
    assert full["max_cells"] <= 20_000 or full["sizes"].get("1")
