"""The masked-LM head of `crener pretrain` (crener/tools/pretrain.py): written beside the encoder as
``mlm_head.safetensors``, ignored by ``from_pretrained``, continued by ``--init-from`` (the transform as
it is, the output bias by token), refused with the file's name when it does not fit, and started fresh
for a folder without one (the shipped encoders, built before the file existed).

Every pretraining run here is tiny (tests/test_pretrain.py's configuration)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import crener.tools.pretrain as pretrain_mod
from crener.data.digest import file_digest
from crener.errors import CheckpointError
from crener.tools.pretrain import MLM_HEAD_BIAS, MLM_HEAD_NAME, MLM_HEAD_TRANSFORM, pretrain
from tests.test_pretrain import tiny_cfg

HEAD_KEYS = {*MLM_HEAD_TRANSFORM, MLM_HEAD_BIAS}


def _run(cfg, work: Path) -> dict:  # noqa: ANN001
    return pretrain(cfg, workdir=work, track=False, progress=False, command="crener pretrain TEST")


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(folder).get_vocab()


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny encoder trained long and fast enough that its head is far from a fresh one."""
    root = tmp_path_factory.mktemp("head")
    cfg = tiny_cfg(root / "parent", steps=30, lr=5e-3)
    return cfg, _run(cfg, root / "work")


def without_head(parent_folder: Path, dest: Path) -> Path:
    """A copy of ``parent_folder`` as the encoders built before the head file were written."""
    shutil.copytree(parent_folder, dest)
    (dest / MLM_HEAD_NAME).unlink()
    return dest


def test_the_head_is_written_beside_the_encoder_and_from_pretrained_ignores_it(parent, monkeypatch):
    from transformers import AutoModel

    from crener.encoder import load_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, summary = parent
    out = Path(cfg.out)
    head = load_file(out / MLM_HEAD_NAME)
    assert set(head) == HEAD_KEYS
    assert head["cls.predictions.transform.dense.weight"].shape == (cfg.hidden, cfg.hidden)
    assert head[MLM_HEAD_BIAS].shape == (summary["vocab_size"],)
    assert all(v.dtype == torch.float32 for v in head.values())
    assert float(head[MLM_HEAD_BIAS].abs().max()) > 0  # trained: a fresh bias is all zeros
    assert not list(out.parent.glob("*.tmp"))
    # The encoder's own file still holds the encoder only; the extra file changes no loader.
    assert not [k for k in load_file(out / "model.safetensors") if k.startswith("cls.")]
    model, info = AutoModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    bert, tok = load_pretrained(out)
    emb = "embeddings.word_embeddings.weight"
    assert torch.equal(bert.state_dict()[emb], model.state_dict()[emb])
    assert len(tok.tokenizer) == summary["vocab_size"]


def test_continuing_with_the_same_vocabulary_starts_where_the_parent_ended(parent, tmp_path):
    cfg, summary = parent
    out = Path(cfg.out)
    child = replace(cfg, out=str(tmp_path / "child"), init_from=str(out), steps=0)
    started = _run(child, tmp_path / "wd")
    assert started["vocab_size"] == summary["vocab_size"]
    # Zero steps: the head written is the one read, tensor for tensor.
    saved, again = load_file(out / MLM_HEAD_NAME), load_file(tmp_path / "child" / MLM_HEAD_NAME)
    assert all(torch.equal(saved[k], again[k]) for k in HEAD_KEYS)
    # Same corpus, seed and vocabulary: the same held-out pieces and masks, so the continuation's
    # starting held-out loss is the parent's final one.
    assert started["held_out_mlm_loss"] == pytest.approx(summary["held_out_mlm_loss"], rel=1e-6, abs=1e-7)
    assert started["held_out_mlm_accuracy"] == summary["held_out_mlm_accuracy"]
    card = _card(tmp_path / "child")
    assert card["mlm_head"] == "continued"
    assert card["inputs"]["init/parent/mlm_head"]["sha256"] == file_digest(out / MLM_HEAD_NAME)
    assert card["inputs"]["init/parent"]["sha256"] == file_digest(out / "model.safetensors")
    readme = (tmp_path / "child" / "README.md").read_text(encoding="utf-8")
    assert f"the masked-LM head continues from `{out}`" in readme
    assert "head starts fresh" not in readme

    # The same folder without the head: the head starts fresh (zero bias, the seed's transform), the
    # card says so, and the starting loss is not the parent's (the equality above is not vacuous).
    bare = without_head(out, tmp_path / "bare")
    fresh = _run(replace(child, out=str(tmp_path / "fresh"), init_from=str(bare)), tmp_path / "wd2")
    head = load_file(tmp_path / "fresh" / MLM_HEAD_NAME)
    assert not head[MLM_HEAD_BIAS].any()
    assert not torch.equal(head["cls.predictions.transform.dense.weight"],
                           saved["cls.predictions.transform.dense.weight"])  # fmt: skip
    assert fresh["held_out_mlm_loss"] > summary["held_out_mlm_loss"] + 0.01
    card = _card(tmp_path / "fresh")
    assert card["mlm_head"] == "fresh"
    assert "init/bare" in card["inputs"] and not [k for k in card["inputs"] if k.endswith("/mlm_head")]
    readme = (tmp_path / "fresh" / "README.md").read_text(encoding="utf-8")
    assert "new characters start from the vectors; the masked-LM head starts fresh)" in readme


def test_the_bias_rows_map_by_token_and_new_tokens_start_fresh(parent, tmp_path):
    cfg, _ = parent
    out = Path(cfg.out)
    extra = tmp_path / "extra.txt"
    extra.write_text("鑫鑫鑫森森森淼淼淼。\n", encoding="utf-8")  # characters Resume's training text may lack
    child = replace(cfg, out=str(tmp_path / "child"), init_from=str(out), text=(str(extra),), steps=0)
    _run(child, tmp_path / "wd")
    old_vocab, new_vocab = _vocab(out), _vocab(tmp_path / "child")
    new_tokens = set(new_vocab) - set(old_vocab)
    assert new_tokens and set(old_vocab) < set(new_vocab)
    assert any(old_vocab[t] != new_vocab[t] for t in old_vocab)  # the ids moved
    old, new = load_file(out / MLM_HEAD_NAME), load_file(tmp_path / "child" / MLM_HEAD_NAME)
    assert all(torch.equal(old[k], new[k]) for k in MLM_HEAD_TRANSFORM)
    assert all(
        torch.equal(new[MLM_HEAD_BIAS][new_vocab[t]], old[MLM_HEAD_BIAS][i]) for t, i in old_vocab.items()
    )
    assert all(float(new[MLM_HEAD_BIAS][new_vocab[t]]) == 0.0 for t in new_tokens)  # BERT's fresh bias


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda h: {**h, MLM_HEAD_BIAS: h[MLM_HEAD_BIAS][:-1]},
            r"cls\.predictions\.bias is \(\d+,\), expected",
        ),
        (
            lambda h: {k: v[..., :8].contiguous() for k, v in h.items()},
            r"dense\.weight is \(16, 8\), expected \(16, 16\)",
        ),
        (lambda h: {k: v for k, v in h.items() if k != MLM_HEAD_BIAS}, r"cls\.predictions\.bias is missing"),
        (None, "not a readable masked-LM head"),
    ],
)
def test_a_head_that_does_not_fit_is_refused_naming_the_file(parent, tmp_path, monkeypatch, change, message):
    cfg, _ = parent
    folder = without_head(Path(cfg.out), tmp_path / "odd")
    head_file = folder / MLM_HEAD_NAME
    if change is None:
        head_file.write_bytes(b"not a safetensors file")
    else:
        save_file(change(load_file(Path(cfg.out) / MLM_HEAD_NAME)), head_file)

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the corpus was read before the encoder was checked")

    monkeypatch.setattr(pretrain_mod, "build_corpus", never)
    with pytest.raises(CheckpointError, match=message) as exc:
        _run(replace(cfg, out=str(tmp_path / "child"), init_from=str(folder), steps=0), tmp_path / "wd")
    assert str(exc.value).startswith(f"{head_file}: ")
    assert not (tmp_path / "child").exists()


def test_the_cli_reports_a_bad_head_in_one_message(parent, tmp_path, capsys, caplog):
    from crener.cli import main

    cfg, _ = parent
    folder = without_head(Path(cfg.out), tmp_path / "odd")
    (folder / MLM_HEAD_NAME).write_bytes(b"\x00" * 16)
    argv = [
        "pretrain", "--out", str(tmp_path / "o"), "--init-from", str(folder), "--datasets", "resume",
        "--vectors", "none", "--hidden", "16", "--layers", "1", "--heads", "2", "--ff", "32",
        "--max-len", "32", "--batch-tokens", "256", "--steps", "0", "--workdir", str(tmp_path / "w"),
        "--no-track", "--bf16", "false",
    ]  # fmt: skip
    assert main(argv) != 0
    said = caplog.text + capsys.readouterr().err
    assert str(folder / MLM_HEAD_NAME) in said and "Traceback" not in said
