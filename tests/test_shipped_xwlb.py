"""The shipped encoder ``crener-xwlb``: ``crener-char`` continued on the broadcast-news corpus
(crener/assets/crener-xwlb, built by ``crener pretrain --init-from crener-char --text xwlb``).

Part of the package, so a missing folder fails here. The checks say the folder is what its card
claims: it loads offline by name, is small enough to ship, and was built from the data files, the
corpus and the crener-char weights this checkout has, by a configuration with today's identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import crener.encoder
from crener.data.datasets import resolve_data_root
from crener.data.digest import file_digest
from crener.pretrain import SPECIAL_TOKENS, PretrainConfig, text_path
from tests.test_shipped_encoder import MAX_BYTES, folder, read_card

NAME = "crener-xwlb"


@pytest.fixture
def card() -> dict:
    return read_card(NAME)


def sums(path: Path) -> dict[str, str]:
    return {name: digest for digest, name in (line.split("  ", 1) for line in path.read_text().splitlines())}


def test_loads_offline_by_name(monkeypatch, card):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = crener.encoder.load_pretrained(NAME)
    size = card["summary"]["vocab_size"]
    assert model.config.vocab_size == size == len(tok.tokenizer)
    assert tok.tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert tok.encode("新闻") == [tok.cls_id, tok.char_id("新"), tok.char_id("闻"), tok.sep_id]


def test_small_enough_to_ship():
    size = sum(f.stat().st_size for f in folder(NAME).rglob("*") if f.is_file())
    assert size <= MAX_BYTES, f"{folder(NAME)} is {size / 1e6:.1f} MB"


def test_card_hashes_match_the_inputs(card):
    inputs = card["inputs"]
    data = sums(resolve_data_root() / "SHA256SUMS")
    for label, item in inputs.items():
        if label.split("/")[0] in card["config"]["datasets"]:
            assert item["sha256"] == data[item["path"].removeprefix("data/")], label
    corpus = text_path("xwlb")
    assert inputs["text/xwlb.txt.xz"]["sha256"] == sums(corpus.parent / "SHA256SUMS")["xwlb.txt.xz"]
    # It continued the crener-char this checkout ships (whose own card names its inputs).
    shipped_char = crener.encoder.SHIPPED_ENCODERS["crener-char"] / "model.safetensors"
    assert inputs["init/crener-char"]["sha256"] == file_digest(shipped_char)
    assert "research use only" in card["licences"]["text/xwlb.txt.xz"]


def test_card_config_is_a_whole_identity(card):
    rebuilt = PretrainConfig.from_identity(card["config"], NAME).identity()
    assert json.loads(json.dumps(rebuilt)) == card["config"]
    assert card["config"]["init_from"] == "crener-char" and card["config"]["text"] == ["xwlb"]
    summary = card["summary"]
    assert summary["finished"] and summary["step"] == card["config"]["steps"]
    assert set(summary["dev_mlm_accuracy"]) == {"weibo", "resume", "ontonotes4", "msra"}
    assert summary["tokens_seen"] > 5_000_000
