"""`crener pretrain` (crener/tools/pretrain.py): corpus without dev/test text, vocabulary, initialisation,
MLM masks, [UNK] training, resumption, the written folder and its card, and the command line.

Every pretraining run here is tiny (width 16, one layer, a few steps on Resume) so the file runs in
seconds; the real encoder is checked by tests/test_shipped_encoder.py.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import crener.tools.pretrain as pretrain_mod
from crener.config import DataConfig
from crener.data.datasets import DATASETS, load_dataset, read_split, register_dataset, resolve_data_root
from crener.data.digest import file_digest
from crener.errors import CheckpointError, DataError
from crener.tools.pretrain import (
    CLS,
    MASK,
    PAD,
    SEP,
    SPECIAL_TOKENS,
    UNK,
    PretrainConfig,
    build_corpus,
    build_vocab,
    init_from_vectors,
    mask_batch,
    orthogonal_projection,
    pad,
    pretrain,
    read_text_file,
    read_vectors,
    resolve_vectors,
    to_ids,
    unk_probabilities,
)

VECTORS_SHA256 = "2ad2a1ebae67d9d41176af12b5b28e1824c8dd3718aea8f10320b21e5ae4faef"
TINY = dict(
    datasets=("resume",), vectors=None, hidden=16, layers=1, heads=2, ff=32, max_len=32, batch_tokens=256,
    steps=3, save_every=100, log_every=100,
)  # fmt: skip


def tiny_cfg(out: Path, **overrides) -> PretrainConfig:
    return PretrainConfig(out=str(out), **{**TINY, **overrides})


def whole_sentences(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make corpus pieces whole sentences, so ``Corpus.pieces`` is exactly the kept training text."""
    monkeypatch.setattr(pretrain_mod, "_cut", lambda text, max_len: [text])


def held_out_of(name: str) -> set[str]:
    data = load_dataset(DataConfig(dataset=name, msra_protocol="clean"))
    return {s.text for s in (*data.dev, *data.test)}


@pytest.fixture(scope="module")
def all_held_out() -> set[str]:
    """Every dev and test sentence of the four registered benchmarks (MSRA dev: the clean split)."""
    return set().union(*(held_out_of(name) for name in ("weibo", "resume", "ontonotes4", "msra")))


@pytest.fixture
def registry():
    """Datasets registered by a test are removed afterwards (DATASETS is a module-level dict)."""
    saved = dict(DATASETS)
    yield
    DATASETS.clear()
    DATASETS.update(saved)


def write_bmes(path: Path, sentences: list[str]) -> None:
    """All-O sentences except a two-character NAME at the start."""
    lines = []
    for text in sentences:
        tags = ["B-NAME", "E-NAME"] + ["O"] * (len(text) - 2)
        lines += [f"{c} {t}" for c, t in zip(text, tags)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ corpus


@pytest.mark.parametrize(
    ("datasets", "sentences", "dropped"),
    [
        (("weibo",), 1270, 80),
        (("resume",), 3814, 7),
        (("ontonotes4",), 15739, 5),
        (("weibo", "resume"), 5084, 87),
    ],
)
def test_corpus_never_contains_a_dev_or_test_sentence(
    datasets, sentences, dropped, all_held_out, monkeypatch
):
    whole_sentences(monkeypatch)
    corpus = build_corpus(PretrainConfig(out="unused", datasets=datasets))
    # Held out: the dev and test text of *every* registered dataset, not only the ones pretrained on.
    assert corpus.held_out_text == all_held_out
    assert not set(corpus.pieces) & all_held_out
    assert (corpus.sentences, corpus.dropped) == (sentences, dropped)
    assert len(corpus.pieces) == corpus.sentences
    n_train = sum(len(load_dataset(DataConfig(dataset=n, msra_protocol="clean")).train) for n in datasets)
    assert corpus.sentences + corpus.dropped == n_train
    assert set(corpus.files) == {f"{n}/{s}" for n in datasets for s in ("train", "dev", "test")}


def test_a_training_sentence_of_another_datasets_test_split_is_dropped(monkeypatch):
    # OntoNotes 4 has no sentence in its own dev/test, but 5 training sentences ("为什么？", "谢谢大家。")
    # are MSRA test or clean-dev sentences: an encoder pretrained on OntoNotes is fine-tuned on MSRA too.
    whole_sentences(monkeypatch)
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("ontonotes4",)))
    train = [s.text for s in load_dataset(DataConfig(dataset="ontonotes4")).train]
    msra = held_out_of("msra")
    leaked = [t for t in train if t in msra]
    assert len(leaked) == 5 and set(leaked) == {"为什么？", "谢谢大家。"}
    assert corpus.dropped == 5
    assert not set(leaked) & set(corpus.pieces)


def test_msra_is_read_under_the_clean_protocol(monkeypatch):
    whole_sentences(monkeypatch)
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("msra",)))
    raw = read_split(resolve_data_root() / "msra" / "train.char.bmes", "bmes").sentences
    assert len(raw) == 46_364
    clean_dev = {s.text for s in raw[-4_365:]}
    assert clean_dev <= corpus.held_out_text
    assert not clean_dev & set(corpus.pieces)
    assert corpus.sentences + corpus.dropped == 46_364 - 4_365 == 41_999
    # The first training sentence is kept; the lineage protocol (dev = test) would have kept the tail.
    assert raw[0].text in corpus.pieces


def test_registered_dataset_duplicates_and_clean_dev(tmp_path, registry, monkeypatch):
    whole_sentences(monkeypatch)
    resume_test = load_dataset(DataConfig(dataset="resume")).test[0].text
    toy = tmp_path / "toy"
    toy.mkdir()
    write_bmes(toy / "train.bmes", ["张三甲乙丙丁", "李四戊己庚辛", "王五壬癸子丑", resume_test])
    write_bmes(toy / "dev.bmes", ["赵六寅卯辰巳"])
    write_bmes(toy / "test.bmes", ["李四戊己庚辛", "钱七午未申酉"])
    register_dataset("toy", str(toy), {"train": "train.bmes", "dev": "dev.bmes", "test": "test.bmes"}, "bmes")
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("toy",)))
    # One sentence is in toy's own test split, one in Resume's test split: both dropped and counted.
    assert corpus.pieces == ["张三甲乙丙丁", "王五壬癸子丑"]
    assert (corpus.sentences, corpus.dropped) == (2, 2)
    assert {"李四戊己庚辛", "赵六寅卯辰巳", "钱七午未申酉", resume_test} <= corpus.held_out_text
    assert corpus.files["toy/train"] == str(toy / "train.bmes")

    # No dev file + clean_dev_size: the last training sentences are the dev split, never pretrained on.
    nodev = tmp_path / "nodev"
    nodev.mkdir()
    write_bmes(nodev / "train.bmes", ["甲乙一二三", "甲乙四五六", "甲乙七八九", "甲乙十百千", "甲乙万亿兆"])
    write_bmes(nodev / "test.bmes", ["甲乙东南西"])
    register_dataset(
        "nodev", str(nodev), {"train": "train.bmes", "test": "test.bmes"}, "bmes", clean_dev_size=2
    )
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("nodev",)))
    assert corpus.pieces == ["甲乙一二三", "甲乙四五六", "甲乙七八九"]
    assert {"甲乙十百千", "甲乙万亿兆", "甲乙东南西"} <= corpus.held_out_text
    assert corpus.dropped == 0


def test_pieces_are_cut_at_max_len():
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("resume",), max_len=8))
    assert max(len(p) for p in corpus.pieces) == 8
    assert sum(len(p) for p in corpus.pieces) == sum(len(t) for t in _kept_resume())


def _kept_resume() -> list[str]:
    held = set().union(*(held_out_of(n) for n in DATASETS))
    return [s.text for s in load_dataset(DataConfig(dataset="resume")).train if s.text not in held]


# ------------------------------------------------------------------------------------------ --text


def test_text_file_lines_are_added_and_blank_lines_skipped(tmp_path, monkeypatch):
    whole_sentences(monkeypatch)
    extra = tmp_path / "extra.txt"
    resume_test = load_dataset(DataConfig(dataset="resume")).test[0].text
    extra.write_text(f"天地玄黄\n\n   \n  宇宙洪荒  \n{resume_test}\n", encoding="utf-8")
    assert read_text_file(extra) == ["天地玄黄", "宇宙洪荒", resume_test]
    base = build_corpus(PretrainConfig(out="unused", datasets=("weibo",)))
    corpus = build_corpus(PretrainConfig(out="unused", datasets=("weibo",), text=(str(extra),)))
    # The lines come after the datasets' text; a line equal to a test sentence is dropped like any other.
    assert corpus.pieces == [*base.pieces, "天地玄黄", "宇宙洪荒"]
    assert (corpus.sentences, corpus.dropped) == (base.sentences + 2, base.dropped + 1)
    assert corpus.files["text/extra.txt"] == str(extra)


def test_text_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode() + b"\xff\xfe\n" + "第三行\n".encode())
    with pytest.raises(DataError) as exc:
        read_text_file(bad)
    assert (exc.value.path, exc.value.line) == (str(bad), 2)
    assert str(exc.value).startswith(f"{bad}:2: not UTF-8")
    with pytest.raises(DataError, match=r"bad\.txt:2: not UTF-8"):
        build_corpus(PretrainConfig(out="unused", datasets=("weibo",), text=(str(bad),)))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-blank line"):
        read_text_file(blank)
    with pytest.raises(DataError, match="text file not found"):
        read_text_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_specials_then_sorted_characters():
    vocab = build_vocab(["乙甲", "丙a甲"], ["</s>", "<UNK>", "丁", "甲", "词语"])
    assert list(vocab) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "丁", "丙", "乙", "甲"]
    assert list(vocab.values()) == list(range(10))
    assert (vocab["[PAD]"], vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]) == (
        PAD, UNK, CLS, SEP, MASK,
    )  # fmt: skip
    # Input order does not matter.
    assert build_vocab(["甲a丙", "乙"], ["词语", "甲", "丁", "<UNK>", "</s>"]) == vocab


def test_vocabulary_covers_corpus_and_vector_characters():
    cfg = PretrainConfig(out="unused", datasets=("resume",))
    corpus = build_corpus(cfg)
    vectors = read_vectors(resolve_vectors(cfg))
    assert len(vectors) == 5691 and {"</s>", "<UNK>"} <= set(vectors)
    vocab = build_vocab(corpus.pieces, vectors)
    chars = {c for p in corpus.pieces for c in p}
    single = {t for t in vectors if len(t) == 1}
    assert chars <= set(vocab) and single <= set(vocab)
    assert list(vocab)[:5] == list(SPECIAL_TOKENS)
    assert list(vocab)[5:] == sorted(chars | single)
    assert build_vocab(list(reversed(corpus.pieces)), dict(reversed(vectors.items()))) == vocab


# ------------------------------------------------------------------------------------------ initialisation


def test_orthogonal_projection_keeps_inner_products():
    proj = orthogonal_projection(50, 64, seed=3)
    assert proj.shape == (50, 64) and proj.dtype == torch.float32
    torch.testing.assert_close(proj @ proj.T, torch.eye(50), atol=1e-5, rtol=0)
    x = torch.randn(20, 50, generator=torch.Generator().manual_seed(1))
    y = x @ proj
    torch.testing.assert_close(y @ y.T, x @ x.T, atol=1e-4, rtol=1e-4)
    assert torch.equal(proj, orthogonal_projection(50, 64, seed=3))
    assert not torch.allclose(proj, orthogonal_projection(50, 64, seed=4))
    # Narrower output: orthonormal columns (a projection onto 16 dimensions).
    down = orthogonal_projection(64, 16, seed=0)
    assert down.shape == (64, 16)
    torch.testing.assert_close(down.T @ down, torch.eye(16), atol=1e-5, rtol=0)


def test_init_from_vectors_sets_exactly_the_rows_with_vectors():
    vocab = build_vocab(["甲乙丙丁"], [])
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(len(vocab), 32, generator=gen) * 0.02
    before = weight.clone()
    vecs = {t: torch.randn(8, generator=gen).numpy() for t in ("</s>", "<UNK>", "甲", "丙", "戊")}
    # "</s>" is not text and "戊" is not in the vocabulary: neither sets a row.
    assert init_from_vectors(weight, vocab, vecs, seed=5) == 3
    rows = [UNK, vocab["甲"], vocab["丙"]]
    others = [i for i in range(len(vocab)) if i not in rows]
    assert torch.equal(weight[others], before[others])
    raw = torch.from_numpy(np.stack([vecs["<UNK>"], vecs["甲"], vecs["丙"]]))
    expected = raw @ orthogonal_projection(8, 32, seed=5)
    expected = expected * (before.norm(dim=1).mean() / expected.norm(dim=1).mean())
    torch.testing.assert_close(weight[rows], expected)
    torch.testing.assert_close(weight[rows].norm(dim=1).mean(), before.norm(dim=1).mean())

    # One common scale: the vectors' cosine similarities (their neighbourhoods) are kept.
    def cosines(m: torch.Tensor) -> torch.Tensor:
        m = m / m.norm(dim=1, keepdim=True)
        return m @ m.T

    torch.testing.assert_close(cosines(weight[rows]), cosines(raw), atol=1e-5, rtol=1e-5)
    assert init_from_vectors(weight, vocab, {"</s>": vecs["</s>"]}, seed=5) == 0


# ------------------------------------------------------------------------------------------ masks


def _batch(vocab_size: int, rows: int = 200, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 120, (rows,), generator=gen).tolist()
    chars = [torch.randint(len(SPECIAL_TOKENS), vocab_size, (n,), generator=gen).numpy() for n in lengths]
    ids, _ = pad([np.concatenate([[CLS], c, [SEP]]) for c in chars])
    return ids


def test_mask_batch_chooses_characters_only_with_80_10_10():
    cfg = PretrainConfig(out="unused")
    vocab_size = 105
    ids = _batch(vocab_size)
    real = ids >= len(SPECIAL_TOKENS)
    assert int((ids == PAD).sum()) > 1000 and int(real.sum()) > 10_000
    inputs, labels = mask_batch(
        ids, torch.zeros(vocab_size), cfg, vocab_size, torch.Generator().manual_seed(0)
    )
    chosen = labels != -100
    assert not (chosen & ~real).any()  # never [CLS], [SEP] or padding
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # no [UNK] noise when unk_prob is 0
    assert abs(chosen.sum() / real.sum() - cfg.mask_rate) < 0.01
    n = int(chosen.sum())
    masked = inputs[chosen] == MASK
    same = inputs[chosen] == ids[chosen]
    other = ~masked & ~same
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(other.sum() / n - 0.1 * (1 - 1 / (vocab_size - 5))) < 0.015  # a random pick may be the same
    assert abs(same.sum() / n - 0.1) < 0.015
    assert (inputs[chosen][other] >= len(SPECIAL_TOKENS)).all()  # random replacements are characters
    # Deterministic for the generator's seed, different for another.
    again = mask_batch(ids, torch.zeros(vocab_size), cfg, vocab_size, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    other_seed = mask_batch(ids, torch.zeros(vocab_size), cfg, vocab_size, torch.Generator().manual_seed(1))
    assert not torch.equal(other_seed[1], labels)


def test_unk_probabilities_and_unk_rate():
    vocab = build_vocab(["ab"], ["c"])
    a, b, c = vocab["a"], vocab["b"], vocab["c"]
    probs = unk_probabilities(Counter({"a": 3, "b": 1000, "z": 5}), vocab, alpha=0.25)
    assert probs[a].item() == pytest.approx(0.25 / 3.25)
    assert probs[b].item() == pytest.approx(0.25 / 1000.25)
    assert probs[c].item() == 0.0  # never seen in the corpus
    assert (probs[: len(SPECIAL_TOKENS)] == 0).all()
    assert (unk_probabilities(Counter({"a": 3}), vocab, alpha=0) == 0).all()

    cfg = PretrainConfig(out="unused")
    ids = torch.full((200, 102), a)
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[100:, 1:51] = b  # shorter rows of a frequent character, then padding
    ids[100:, 51] = SEP
    ids[100:, 52:] = PAD
    inputs, labels = mask_batch(ids, probs, cfg, len(vocab), torch.Generator().manual_seed(0))
    unchosen = labels == -100
    for tid in (a, b):
        at = unchosen & (ids == tid)
        rate = float((inputs[at] == UNK).float().mean())
        assert abs(rate - probs[tid].item()) < 0.01, (tid, rate)
    assert int(((inputs == UNK) & (ids < len(SPECIAL_TOKENS))).sum()) == 0
    assert torch.equal(labels[~unchosen], ids[~unchosen])  # the target stays the character
    assert 0.07 < float((inputs[unchosen & (ids == a)] == UNK).float().mean()) < 0.085


def test_unk_embedding_is_trained_from_the_input(tmp_path, monkeypatch):
    """With unk_alpha > 0, [UNK] occurs in the inputs and gradient reaches its row through them.

    (Its row moves with unk_alpha = 0 too: the MLM output layer is tied to the word embeddings and
    weight decay applies, so only the input-side gradient tells the two apart.)"""
    from safetensors.torch import load_file

    real_logits = pretrain_mod.mlm_logits
    seen: dict[str, list] = {"inputs": [], "emb": [], "initial": []}

    def spy(model, inputs, attn, sel):  # noqa: ANN001
        if not model.training:  # the held-out measurement
            return real_logits(model, inputs, attn, sel)
        emb = model.bert.embeddings.word_embeddings
        if not seen["initial"]:
            seen["initial"].append(emb.weight.detach().clone())

        def keep(_module, _args, output) -> None:  # noqa: ANN001
            output.retain_grad()
            seen["emb"].append(output)

        handle = emb.register_forward_hook(keep)
        try:
            out = real_logits(model, inputs, attn, sel)
        finally:
            handle.remove()
        seen["inputs"].append(inputs)
        return out

    monkeypatch.setattr(pretrain_mod, "mlm_logits", spy)
    cfg = tiny_cfg(tmp_path / "enc", steps=1, unk_alpha=50.0)
    pretrain(cfg, workdir=tmp_path / "work", track=False, progress=False)
    inputs, emb_out = seen["inputs"][0], seen["emb"][0]
    at_unk = inputs == UNK
    assert int(at_unk.sum()) > 10
    input_grad = emb_out.grad[at_unk].sum(0)  # d loss / d row [UNK], input side
    assert float(input_grad.norm()) > 0
    saved = load_file(str(tmp_path / "enc" / "model.safetensors"))["embeddings.word_embeddings.weight"]
    assert not torch.equal(saved[UNK], seen["initial"][0][UNK])

    # unk_alpha = 0: Resume's training text has no character outside the vocabulary, so no [UNK] input.
    seen.update(inputs=[], emb=[], initial=[])
    pretrain(replace(cfg, out=str(tmp_path / "enc0"), unk_alpha=0.0), workdir=tmp_path / "work0", track=False,
             progress=False)  # fmt: skip
    assert int((seen["inputs"][0] == UNK).sum()) == 0


# ------------------------------------------------------------------------------------------ resumption


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg(tmp_path / "a", steps=12, save_every=4, log_every=2)
    whole = pretrain(cfg, workdir=tmp_path / "wa", track=False, progress=False)
    assert whole["step"] == 12 and whole["finished"]
    reference = _weights(tmp_path / "a")

    # stop_after: the state is saved at the stopping step, nothing is written to out.
    cfg_b = replace(cfg, out=str(tmp_path / "b"))
    assert pretrain(cfg_b, workdir=tmp_path / "wb", stop_after=5, track=False, progress=False) == {
        "step": 5, "finished": False,
    }  # fmt: skip
    assert not (tmp_path / "b").exists()
    caplog.set_level(logging.INFO, logger="crener.tools.pretrain")
    pretrain(cfg_b, workdir=tmp_path / "wb", track=False, progress=False)
    assert "resuming pretraining from step 5" in caplog.text
    resumed = _weights(tmp_path / "b")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    # A real kill in step 7: the last state is step 4's, and the run continues from there.
    real_logits, calls = pretrain_mod.mlm_logits, []

    class Killed(Exception):
        pass

    def dies_in_step_7(model, *args):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 7:
            raise Killed
        return real_logits(model, *args)

    cfg_c = replace(cfg, out=str(tmp_path / "c"))
    monkeypatch.setattr(pretrain_mod, "mlm_logits", dies_in_step_7)
    with pytest.raises(Killed):
        pretrain(cfg_c, workdir=tmp_path / "wc", track=False, progress=False)
    monkeypatch.setattr(pretrain_mod, "mlm_logits", real_logits)
    caplog.clear()
    pretrain(cfg_c, workdir=tmp_path / "wc", track=False, progress=False)
    assert "resuming pretraining from step 4" in caplog.text
    killed = _weights(tmp_path / "c")
    assert all(torch.equal(killed[k], reference[k]) for k in reference)
    # Equality is not vacuous: fewer steps give other weights.
    pretrain(
        replace(cfg, out=str(tmp_path / "d"), steps=11), workdir=tmp_path / "wd", track=False, progress=False
    )
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(_weights(tmp_path / "d")[key], reference[key])


def test_bf16_is_part_of_the_identity_only_when_on(tmp_path):
    """fp32 identities are those of cards written before the field; bf16 ones say so."""
    fp32 = tiny_cfg(tmp_path / "a")
    assert "bf16" not in fp32.identity()
    on = replace(fp32, bf16=True)
    assert on.identity()["bf16"] is True
    for cfg in (fp32, on):
        identity = json.loads(json.dumps(cfg.identity()))
        assert PretrainConfig.from_identity(identity, cfg.out).identity() == cfg.identity()


def test_bf16_pretraining_resumes_to_the_same_weights_and_differs_from_fp32(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", steps=4, save_every=2, bf16=True)
    pretrain(cfg, workdir=tmp_path / "wa", track=False, progress=False)
    reference = _weights(tmp_path / "a")
    assert all(w.dtype == torch.float32 for w in reference.values())  # autocast, fp32 weights
    cfg_b = replace(cfg, out=str(tmp_path / "b"))
    pretrain(cfg_b, workdir=tmp_path / "wb", stop_after=2, track=False, progress=False)
    pretrain(cfg_b, workdir=tmp_path / "wb", track=False, progress=False)
    resumed = _weights(tmp_path / "b")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    card = json.loads((tmp_path / "a" / "card.json").read_text(encoding="utf-8"))
    assert card["config"]["bf16"] is True
    # The state of the fp32 run of the same options is another configuration's.
    with pytest.raises(CheckpointError, match="belongs to another pretraining configuration"):
        pretrain(replace(cfg, bf16=False), workdir=tmp_path / "wa", track=False, progress=False)
    pretrain(replace(cfg, out=str(tmp_path / "c"), bf16=False), workdir=tmp_path / "wc", track=False,
             progress=False)  # fmt: skip
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(_weights(tmp_path / "c")[key], reference[key])


@pytest.mark.parametrize(("flag", "expected"), [("true", True), ("false", False)])
def test_cli_bf16_flag(flag, expected):
    from crener.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--out", "x", "--bf16", flag])
    assert pretrain_mod.config_from_args(args).bf16 is expected


@pytest.mark.parametrize(
    "cfg",
    [
        PretrainConfig(out="enc"),
        PretrainConfig(out="a b/enc", text=("xwlb",), text_fraction=0.25, bf16=True, steps=300, lr=2e-4),
        PretrainConfig(out="enc", text=("xwlb",), datasets_repeat=4, vectors="lac"),
        PretrainConfig(
            out="enc", datasets=("weibo", "resume"), vectors=None, init_from="crener-char", hidden=128
        ),
        PretrainConfig(
            out="enc", vectors="people+wiki+lac", max_len=64, batch_tokens=1024, seed=3, warmup=0.1
        ),
    ],
)
def test_a_config_s_command_parses_back_to_the_same_config(cfg):
    import shlex

    from crener.cli import build_parser

    command = cfg.command()
    assert command.startswith("crener pretrain --out ")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert pretrain_mod.config_from_args(args) == cfg


@pytest.mark.parametrize("argv", [[], ["--bf16", "auto"]])
def test_cli_bf16_auto_is_the_default_and_takes_the_measured_answer(argv, monkeypatch):
    import crener.device
    from crener.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--out", "x", *argv])
    for pays in (True, False):
        monkeypatch.setattr(crener.device, "bf16_pays", lambda device="auto", pays=pays: pays)
        assert pretrain_mod.config_from_args(args).bf16 is pays


def test_state_of_another_configuration_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path / "a", steps=2)
    pretrain(cfg, workdir=tmp_path / "w", stop_after=1, track=False, progress=False)
    # Where it is written and how often it logs are not part of the identity: this resumes.
    pretrain(replace(cfg, out=str(tmp_path / "b"), log_every=7), workdir=tmp_path / "w", track=False,
             progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="belongs to another pretraining configuration"):
        pretrain(replace(cfg, lr=1e-3), workdir=tmp_path / "w", track=False, progress=False)
    with pytest.raises(CheckpointError, match="belongs to another pretraining configuration"):
        pretrain(replace(cfg, datasets=("weibo",)), workdir=tmp_path / "w", track=False, progress=False)
    (tmp_path / "w" / "pretrain_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read pretraining state"):
        pretrain(cfg, workdir=tmp_path / "w", track=False, progress=False)


# ------------------------------------------------------------------------------------------ the folder


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny encoder initialised from the People's Daily vectors, written in the HF layout."""
    root = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_cfg(root / "tiny-char", vectors="default", steps=2)
    summary = pretrain(
        cfg, workdir=root / "work", track=False, progress=False, command="crener pretrain TEST"
    )
    return cfg, summary


def test_written_folder_loads_offline_with_the_vocabulary_ids(written, monkeypatch):
    from crener.encoder import load_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, summary = written
    corpus = build_corpus(cfg)
    vectors = read_vectors(resolve_vectors(cfg))
    vocab = build_vocab(corpus.pieces, vectors)
    out = Path(cfg.out)
    # transformers 5 writes the vocabulary into tokenizer.json (no vocab.txt).
    saved_vocab = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert saved_vocab == dict(vocab)
    model, tok = load_pretrained(out)
    assert model.config.vocab_size == len(vocab) == summary["vocab_size"]
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (PAD, UNK, CLS, SEP)
    # Every corpus character gets the id it was pretrained under, in the same [CLS] .. [SEP] frame.
    for piece in corpus.pieces:
        assert tok.encode(piece) == to_ids([piece], vocab)[0].tolist()
    assert tok.char_id("\u9fff") == UNK  # not in the vocabulary
    # The loaded weights are the written ones; vector rows were initialised (every vector character).
    assert summary["initialised_rows"] == 1 + sum(1 for t in vectors if len(t) == 1)
    emb = model.embeddings.word_embeddings.weight.detach()
    assert torch.equal(emb, _weights(out)["embeddings.word_embeddings.weight"])


def test_characters_the_bert_tokenizer_deletes_keep_their_pretraining_ids():
    from transformers import BertTokenizer

    from crener.encoder import CharTokenizer

    text = "中\ufffd\ue00e文"
    assert all(unicodedata.category(c) != "Cc" for c in text)
    vocab = build_vocab([text], [])
    tok = CharTokenizer.from_tokenizer(BertTokenizer(vocab=vocab, do_lower_case=False, strip_accents=False))
    assert tok.encode(text) == to_ids([text], vocab)[0].tolist()


def test_card_lists_the_inputs_with_their_hashes(written):
    cfg, summary = written
    out = Path(cfg.out)
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    sums = {}
    for line in (resolve_data_root() / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    assert set(card["inputs"]) == {"resume/train", "resume/dev", "resume/test", "vectors"}
    for label, item in card["inputs"].items():
        if label == "vectors":
            assert item["path"] == "pretrained/people2014_char_w2v_50d/char_vec.txt"
            assert item["sha256"] == VECTORS_SHA256
            continue
        assert item["path"].startswith("data/")
        assert item["sha256"] == sums[item["path"].removeprefix("data/")]
    assert (
        card["inputs"]["resume/train"]["sha256"]
        == sums["resume/train.char.bmes"]
        == file_digest(resolve_data_root() / "resume" / "train.char.bmes")
    )
    assert card["config"] == json.loads(json.dumps(cfg.identity()))
    assert card["command"] == "crener pretrain TEST"
    assert set(card["licences"]) == {"resume", "vectors"}
    assert card["summary"] == summary
    assert summary["step"] == 2 and summary["finished"]
    assert summary["corpus_sentences"] == 3814 and summary["dropped_sentences"] == 7
    assert 0 <= summary["held_out_mlm_accuracy"] <= 1
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "# tiny-char: a compact Chinese character encoder pretrained by crener" in readme
    assert VECTORS_SHA256 in readme and sums["resume/test.char.bmes"] in readme
    assert "3,814 sentences (7 dropped because they occur in a dev or test split)" in readme
    assert not list(out.parent.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_pretrain_writes_the_folder(tmp_path, capsys):
    from crener.cli import main

    out, work = tmp_path / "cli-char", tmp_path / "work"
    argv = [
        "pretrain", "--out", str(out), "--datasets", "resume", "--vectors", "none", "--hidden", "16",
        "--layers", "1", "--heads", "2", "--ff", "32", "--max-len", "32", "--batch-tokens", "256",
        "--steps", "2", "--seed", "3", "--unk-alpha", "0.5", "--workdir", str(work), "--no-track",
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["finished"] and summary["initialised_rows"] == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "card.json",
                 "README.md", "history.json", "mlm_head.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (work / "pretrain_state.pt").is_file()
    card = json.loads((out / "card.json").read_text(encoding="utf-8"))
    assert (
        card["config"]["hidden"] == 16 and card["config"]["seed"] == 3 and card["config"]["unk_alpha"] == 0.5
    )
    assert card["config"]["datasets"] == ["resume"] and card["config"]["vectors"] is None
    assert "vectors" not in card["inputs"] and "vectors" not in card["licences"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == summary["vocab_size"]
    # A user error is reported, not raised.
    assert main([*argv, "--heads", "3"]) == 2


def test_zero_steps_writes_the_initialised_encoder(tmp_path: Path) -> None:
    """``--steps 0``: the vectors-only arm of the encoder ablation, untrained but initialised."""
    from crener.encoder import load_pretrained

    cfg = tiny_cfg(tmp_path / "enc", steps=0, vectors="default")
    summary = pretrain(cfg, workdir=tmp_path / "work", track=False, progress=False)
    assert summary["finished"] and summary["step"] == 0 and summary["initialised_rows"] > 5000
    bert, tok = load_pretrained(tmp_path / "enc")
    weight = bert.embeddings.word_embeddings.weight.detach()
    vectors = read_vectors(resolve_vectors(cfg))
    vocab = tok.tokenizer.get_vocab()
    expected = torch.randn(len(vocab), weight.shape[1]) * 0.02  # the scale differs; directions do not
    init_from_vectors(expected, vocab, vectors, cfg.seed)
    rows = [vocab[c] for c in ("张", "北", "，")]
    direction = torch.nn.functional.cosine_similarity(weight[rows], expected[rows], dim=1)
    assert torch.all(direction > 0.9999)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--hidden", "-8", "--hidden -8: must be a positive integer"),
        ("--heads", "0", "--heads 0: must be a positive integer"),
        ("--layers", "0", "--layers 0: must be a positive integer"),
        ("--save-every", "0", "--save-every 0: must be a positive integer"),
        ("--seed", "-1", "--seed -1: a seed must be >= 0"),
        ("--lr", "0", "--lr 0.0 must be > 0"),
        ("--warmup", "1.5", "--warmup 1.5 in [0, 1]"),
        ("--unk-alpha", "-1", "--unk-alpha -1.0 >= 0"),
    ],
)
def test_cli_pretrain_bad_values_are_one_message(flag, value, message, tmp_path, capsys, caplog):
    """Each bad option ends in one message and exit 2 before any text is read or folder made."""
    from crener.cli import main

    out = tmp_path / "bad"
    assert main(["pretrain", "--out", str(out), "--no-track", flag, value]) == 2
    assert message in caplog.text + capsys.readouterr().err
    assert "Traceback" not in caplog.text and not out.exists()


def test_pretraining_trims_the_heap_every_few_steps_without_changing_the_weights(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "a", steps=6)
    pretrain(cfg, workdir=tmp_path / "wa", track=False, progress=False)
    calls: list[int] = []
    monkeypatch.setattr(pretrain_mod, "TRIM_EVERY", 2)
    monkeypatch.setattr(pretrain_mod, "trim_heap", lambda: calls.append(1) or True)
    pretrain(replace(cfg, out=str(tmp_path / "b")), workdir=tmp_path / "wb", track=False, progress=False)
    assert len(calls) == 3  # steps 2, 4 and 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trim_heap_calls_glibc_where_there_is_one(monkeypatch):
    import platform

    import crener.device as device

    assert device.trim_heap() is (platform.libc_ver()[0] == "glibc")
    device._glibc_malloc_trim.cache_clear()
    monkeypatch.setattr("ctypes.CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    try:
        assert device.trim_heap() is False  # no C library to ask: nothing is trimmed, nothing fails
    finally:
        device._glibc_malloc_trim.cache_clear()
