"""The shipped encoders pretrained on the four training splits from the People's Daily vectors:
``crener-char`` (6,000 steps) and ``crener-char-18k`` (18,000), each in crener/assets/<name>, built
by ``crener pretrain``.

It is part of the package: a missing or incomplete folder fails here, it is not skipped. The checks
say the folder is what its card claims: it loads offline through the project's own loader, is small
enough to ship, was built from the data files this checkout has (SHA256SUMS) and the People's Daily
vectors, by a configuration with exactly today's identity fields, with the expected vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import crener.encoder
from crener.data.datasets import resolve_data_root
from crener.tools.pretrain import SPECIAL_TOKENS, PretrainConfig

NAME = "crener-char"
NAMES = ("crener-char", "crener-char-18k")  # one recipe, one vocabulary: every check holds for each
MAX_BYTES = 25_000_000  # 25 MB
VOCAB_SIZE = 6_077  # specials + every character of the four training splits and of the vectors
VECTORS_SHA256 = "2ad2a1ebae67d9d41176af12b5b28e1824c8dd3718aea8f10320b21e5ae4faef"


def folder(name: str = NAME) -> Path:
    return Path(crener.encoder.SHIPPED_ENCODERS[name])


def read_card(name: str = NAME) -> dict:
    path = folder(name) / "card.json"
    assert path.is_file(), f"the shipped encoder has no card: {path}"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture
def card(name) -> dict:
    return read_card(name)


def test_shipped_encoder_loads_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = crener.encoder.load_pretrained(name)  # CheckpointError when the folder is missing
    assert model.config.vocab_size == VOCAB_SIZE
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE
    assert len(tok.tokenizer) == VOCAB_SIZE
    assert tok.unk_id == 1 and tok.tokenizer.convert_ids_to_tokens(1) == "[UNK]"
    assert tok.tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert tok.encode("中文") == [tok.cls_id, tok.char_id("中"), tok.char_id("文"), tok.sep_id]
    assert tok.char_id("中") != tok.unk_id


def test_shipped_encoder_is_small_enough(name):
    files = [f for f in folder(name).rglob("*") if f.is_file()]
    assert {"config.json", "model.safetensors", "card.json", "README.md"} <= {f.name for f in files}
    size = sum(f.stat().st_size for f in files)
    assert size <= MAX_BYTES, f"{folder(name)} is {size / 1e6:.1f} MB, more than {MAX_BYTES / 1e6:.0f} MB"


def test_card_inputs_match_the_data_and_vector_hashes(card):
    sums = {}
    for line in (resolve_data_root() / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    inputs = card["inputs"]
    assert inputs["vectors"]["sha256"] == VECTORS_SHA256
    data = {
        label: item for label, item in inputs.items() if label != "vectors" and not label.startswith("text/")
    }
    assert data, "the card lists no data file"
    for label, item in data.items():
        name = item["path"].removeprefix("data/")
        assert name in sums, f"{label}: {item['path']} is not in SHA256SUMS"
        assert item["sha256"] == sums[name], f"{label}: {name} differs from SHA256SUMS"
    # Every dataset pretrained on has its training file listed.
    assert {f"{d}/train" for d in card["config"]["datasets"]} <= set(data)


def test_card_config_has_the_identity_fields(card, name):
    # The card's config is a whole identity: it rebuilds the config that wrote it, field for field.
    rebuilt = PretrainConfig.from_identity(card["config"], name).identity()
    assert json.loads(json.dumps(rebuilt)) == card["config"]
    summary = card["summary"]
    assert summary["finished"] and summary["step"] == card["config"]["steps"]
    assert summary["vocab_size"] == VOCAB_SIZE


def test_vocabulary_has_6077_entries_with_unk_1(name):
    vocab = json.loads((folder(name) / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert len(vocab) == VOCAB_SIZE
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][: len(SPECIAL_TOKENS)] == list(
        SPECIAL_TOKENS
    )
    assert vocab["[UNK]"] == 1
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
