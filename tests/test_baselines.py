"""Baselines: each one overfits the fixture sentences; W2NER decodes gold grids exactly."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from crener.data.batching import Example, collate
from crener.profiles import build_run_config
from crener.registry import build_model, build_task
from tests.conftest import SENTENCES, TYPES
from tests.helpers import tiny_cfg

BASELINES = ("w2ner", "bert_softmax", "bert_crf", "tener")
ZERO_DROPOUT = {
    "model.emb_dropout": 0.0,
    "model.conv_dropout": 0.0,
    "model.out_dropout": 0.0,
    "model.tf_dropout": 0.0,
}


def tiny(model: str, **overrides):
    """The smoke widths (32-wide everything), no dropout."""
    return build_run_config(model=model, profile="smoke", overrides={**ZERO_DROPOUT, **overrides}).model


def examples(task, tokenizer, sentences=SENTENCES) -> list[Example]:
    return [
        Example(
            k,
            np.asarray(tokenizer.encode(s.chars), dtype=np.int64),
            task.featurize(s.entities, len(s)),
            len(s),
        )
        for k, s in enumerate(sentences)
    ]


def predict(model, task, exs) -> list[set]:
    model.eval()
    with torch.no_grad():
        batch = collate(exs, "none", task.num_labels)
        return task.decode(model(batch), batch)


@pytest.mark.parametrize("name", BASELINES)
def test_builds_through_the_registries(name: str, tiny_encoder) -> None:
    encoder, tokenizer = tiny_encoder
    cfg = tiny(name)
    task = build_task(cfg, TYPES)
    model = build_model(cfg, task, encoder)
    batch = collate(examples(task, tokenizer), task.target, task.num_labels)
    out = model(batch)
    b, n = len(batch), batch.n
    if name == "w2ner":
        assert task.target == "classes" and task.num_labels == 2 + len(TYPES)
        assert out["logits"].shape == (b, n, n, task.num_labels)
    else:
        assert task.target == "tags" and task.num_labels == 1 + 4 * len(TYPES)
        assert out["logits"].shape == (b, n, task.num_labels)
    assert torch.isfinite(task.loss(out, batch)["loss"])
    # The encoder's parameters must sit under `encoder.` so fit gives them the encoder lr;
    # TENER runs no BERT, so it keeps no encoder at all.
    names = [k for k, _ in model.named_parameters()]
    if name == "tener":
        assert not any(k.startswith("encoder.") for k in names)
    else:
        assert any(k.startswith("encoder.") for k in names)


@pytest.mark.parametrize("name", BASELINES)
def test_padding_invariance(name: str, tiny_encoder) -> None:
    """A sentence scores the same alone and padded inside a batch (eval mode)."""
    encoder, tokenizer = tiny_encoder
    cfg = tiny(name)
    task = build_task(cfg, TYPES)
    model = build_model(cfg, task, encoder).eval()
    exs = examples(task, tokenizer)
    short = min(range(len(exs)), key=lambda k: exs[k].n)
    with torch.no_grad():
        together = model(collate(exs, "none", task.num_labels))["logits"]
        alone = model(collate([exs[short]], "none", task.num_labels))["logits"][0]
    n = exs[short].n
    real = together[short, :n, :n] if name == "w2ner" else together[short, :n]
    torch.testing.assert_close(real, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BASELINES)
def test_overfits_the_fixture_sentences(name: str, tiny_encoder) -> None:
    """A plain Adam loop reaches F1 = 1.0 (exact entity sets) on the training sentences."""
    torch.manual_seed(0)
    encoder, tokenizer = tiny_encoder
    cfg = tiny(name)
    task = build_task(cfg, TYPES)
    model = build_model(cfg, task, encoder)
    exs = examples(task, tokenizer)
    batch = collate(exs, task.target, task.num_labels)
    gold = [set(s.entities) for s in SENTENCES]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    preds: list[set] = []
    for step in range(1, 401):
        model.train()
        loss = task.loss(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            preds = predict(model, task, exs)
            if preds == gold:
                break
    assert preds == gold, f"{name}: not overfit after {step} steps (loss {loss.item():.4f})"
    assert time.perf_counter() - start < 60


def test_w2ner_decodes_gold_grids_of_the_fixture(tiny_encoder) -> None:
    _, tokenizer = tiny_encoder
    task = build_task(tiny("w2ner"), TYPES)
    exs = examples(task, tokenizer)
    batch = collate(exs, task.target, task.num_labels)
    logits = torch.nn.functional.one_hot(batch.targets, task.num_labels).float()
    assert task.decode({"logits": logits}, batch) == [set(s.entities) for s in SENTENCES]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["weibo", "resume", "ontonotes4", "msra"])
def test_w2ner_decodes_gold_grids_of_every_dataset(dataset: str) -> None:
    """Gold W2NER grids (single-label classes) -> logits -> W2NER decoding == gold, every chunk."""
    from crener.config import DataConfig
    from crener.data.batching import make_batches
    from crener.data.datasets import load_dataset
    from crener.data.split import split_all

    cfg = tiny("w2ner")
    data = load_dataset(DataConfig(dataset=dataset))
    task = build_task(cfg, data.types)
    sentences = [c.sentence for split in (data.train, data.dev, data.test) for c in split_all(split, 256)]
    exs = [
        Example(k, np.zeros(len(s) + 2, dtype=np.int64), task.featurize(s.entities, len(s)), len(s))
        for k, s in enumerate(sentences)
    ]
    assert task.collisions == 0  # no span carries two types, so single-label classes lose nothing
    wrong = 0
    for idx in make_batches([e.n for e in exs], max_cells=400_000):
        batch = collate([exs[i] for i in idx], task.target, task.num_labels)
        logits = torch.nn.functional.one_hot(batch.targets, task.num_labels).float()
        for i, pred in zip(idx, task.decode({"logits": logits}, batch)):
            wrong += pred != set(sentences[i].entities)
    assert wrong == 0


def write_vectors(path, rows: dict[str, float], dim: int) -> None:
    """A word2vec text file: each token's vector is its value repeated ``dim`` times."""
    path.write_text(
        f"{len(rows)} {dim}\n" + "".join(f"{t} " + " ".join([str(v)] * dim) + "\n" for t, v in rows.items()),
        encoding="utf-8",
    )


def test_tener_char_vector_init(tmp_path, tiny_encoder) -> None:
    from baselines.tener import CHAR_EMB_DIM, init_char_embeddings

    encoder, tokenizer = tiny_encoder
    cfg = tiny("tener")
    task = build_task(cfg, TYPES)
    model = build_model(cfg, task, encoder)
    vec = tmp_path / "vec.txt"
    write_vectors(vec, {"张": 1.0, "北": 2.0, "不在词表": 3.0, "<UNK>": 4.0}, CHAR_EMB_DIM)
    vocab = tokenizer.tokenizer.get_vocab()
    before = model.char_embed.weight.detach().clone()
    coverage = init_char_embeddings(model, vocab, vec)
    assert coverage == pytest.approx(3 / len(vocab))
    weight = model.char_embed.weight.detach()
    assert torch.all(weight[vocab["北"]] == 2.0)
    assert torch.all(weight[vocab["[UNK]"]] == 4.0)  # the file's <UNK> under the tokenizer's name
    untouched = [i for t, i in vocab.items() if t not in ("张", "北", "[UNK]")]
    assert torch.equal(weight[untouched], before[untouched])


def test_tener_char_vectors_are_read_strictly(tmp_path, tiny_encoder) -> None:
    from baselines.tener import CHAR_EMB_DIM, init_char_embeddings
    from crener.errors import DataError

    encoder, tokenizer = tiny_encoder
    model = build_model(tiny("tener"), build_task(tiny("tener"), TYPES), encoder)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"2 {CHAR_EMB_DIM}\n张 " + " ".join(["1"] * CHAR_EMB_DIM) + "\n北 1 2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.txt:3"):
        init_char_embeddings(model, tokenizer.tokenizer.get_vocab(), bad)
    narrow = tmp_path / "narrow.txt"
    write_vectors(narrow, {"张": 1.0}, 8)
    with pytest.raises(DataError, match="8-d vectors"):
        init_char_embeddings(model, tokenizer.tokenizer.get_vocab(), narrow)


def test_char_vectors_are_tener_s_default_and_refused_elsewhere() -> None:
    from crener.errors import ConfigError

    for profile in ("smoke", "quick", "full"):
        assert build_run_config(model="tener", profile=profile).model.char_vectors == "default"
    assert build_run_config(model="crener", profile="quick").model.char_vectors == "none"
    with pytest.raises(ConfigError, match="only tener reads it"):
        build_run_config(model="w2ner", overrides={"model.char_vectors": "default"})


def test_tener_training_starts_from_the_configured_vectors(tmp_path, tiny_data, monkeypatch) -> None:
    """`fit` loads model.char_vectors into TENER's embeddings before the first step."""
    from baselines.tener import CHAR_EMB_DIM, TENER
    from crener.train import fit

    vec = tmp_path / "vec.txt"
    write_vectors(vec, {"张": 1.5}, CHAR_EMB_DIM)
    seen = {}
    original = TENER.init_char_vectors

    def spy(self, vocab, path):
        coverage = original(self, vocab, path)
        seen["row"] = self.char_embed.weight[vocab["张"]].detach().clone()
        seen["path"] = path
        return coverage

    monkeypatch.setattr(TENER, "init_char_vectors", spy)
    fit(
        tiny_cfg(tiny_data, model="tener", **{"train.epochs": 1, "model.char_vectors": str(vec)}),
        tmp_path / "run",
    )
    assert seen["path"] == vec and torch.all(seen["row"] == 1.5)


def test_w2ner_is_built_faithfully(tiny_encoder) -> None:
    """The w2ner family's defaults: BiLSTM on d_bert, code-orientation CLN, chained dilated convs."""
    from baselines.w2ner import W2NER

    encoder, _ = tiny_encoder
    cfg = tiny("w2ner")
    model = build_model(cfg, build_task(cfg, TYPES), encoder)
    assert isinstance(model, W2NER)
    assert model.lstm.lstm.input_size == encoder.out_dim and model.lstm.out_dim == cfg.lstm_hidden
    assert model.grid.orientation == "code" and model.grid.dconv.chain
    assert (
        model.grid.dist_emb is not None and model.grid.region_emb is not None and model.grid.attn_proj is None
    )
