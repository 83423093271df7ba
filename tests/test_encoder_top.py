"""The encoder's top k layers fine-tuned over its cached lower part (train.encoder_top_layers).

The lever must not change what the model computes: features, loss and gradients equal those of the
whole encoder with the same layers frozen, within float rounding; only the top k layers train, the
lower part runs once per sentence, and padding changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from crener.config import ConfigError, ModelConfig, TrainConfig
from crener.encoder import CharEncoder, FeatureCache, build_embedded_encoder, load_pretrained
from tests.conftest import SENTENCES

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def deep_encoder_dir(tmp_path_factory):
    """A 3-layer random BERT: the last-four mean then spans the embeddings and every layer."""
    chars = {c for s in SENTENCES for c in s.chars}
    cfg = ModelConfig(embedded_hidden=32, embedded_layers=3, embedded_heads=2, embedded_ff=64)
    return build_embedded_encoder(chars, cfg, tmp_path_factory.mktemp("enc") / "encoder", seed=0)


def _encoder(path, last4_mean: bool = True) -> tuple[CharEncoder, object]:
    bert, tok = load_pretrained(path)
    return CharEncoder(bert, last4_mean=last4_mean), tok


def _batch(tok, sentences) -> tuple[torch.Tensor, torch.Tensor, int]:
    rows = [tok.encode(s.chars) for s in sentences]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    return ids, (ids != tok.pad_id).long(), width - 2


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return (mask[:, 2:] == 1)[..., None]  # characters only: BERT's outputs at padding are not features


def _plain_frozen_below(encoder: CharEncoder, k: int) -> CharEncoder:
    """The same weights, whole encoder run every step, all but the top k layers without gradient."""
    plain = copy.deepcopy(encoder)
    layers = plain.bert.encoder.layer
    for p in plain.parameters():
        p.requires_grad_(False)
    for layer in layers[len(layers) - k :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return plain


@pytest.mark.parametrize("last4_mean", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_layers_give_the_whole_encoders_features_loss_and_gradients(deep_encoder_dir, k, last4_mean):
    encoder, tok = _encoder(deep_encoder_dir, last4_mean)
    plain = _plain_frozen_below(encoder, k)
    encoder.freeze(FeatureCache(), top_layers=k)
    encoder.eval()  # dropout off in both, so the two are comparable
    plain.eval()
    ids, mask, n = _batch(tok, SENTENCES[:4])
    valid = _valid(mask)
    target = torch.randn(ids.size(0), n, encoder.out_dim, generator=torch.Generator().manual_seed(0))

    ours = encoder(ids, mask, n)
    theirs = plain(ids, mask, n)
    torch.testing.assert_close(ours * valid, theirs * valid, **TOL)
    loss_ours = ((ours - target) * valid).pow(2).sum()
    loss_theirs = ((theirs - target) * valid).pow(2).sum()
    torch.testing.assert_close(loss_ours, loss_theirs, **TOL)
    loss_ours.backward()
    loss_theirs.backward()
    trained = [(name, p) for name, p in encoder.named_parameters() if p.requires_grad]
    # Exactly the top k layers train: every one of their tensors, nothing else.
    top = {f"bert.encoder.layer.{i}." for i in range(3 - k, 3)}
    assert trained and all(any(name.startswith(t) for t in top) for name, _ in trained)
    assert len(trained) == sum(
        1 for name, _ in encoder.named_parameters() if any(name.startswith(t) for t in top)
    )
    other = dict(plain.named_parameters())
    for name, p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, other[name].grad, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in encoder.parameters() if not p.requires_grad)


def test_the_lower_part_runs_once_per_sentence_and_padding_changes_nothing(deep_encoder_dir):
    encoder, tok = _encoder(deep_encoder_dir)
    cache = FeatureCache()
    encoder.freeze(cache, top_layers=1)
    encoder.eval()
    calls = []
    handle = encoder.bert.embeddings.register_forward_hook(lambda *_: calls.append(1))
    ids, mask, n = _batch(tok, SENTENCES[:4])
    first = encoder(ids, mask, n)
    assert len(calls) == 4 and len(cache) == 4  # each sentence alone, once
    again = encoder(ids, mask, n)
    assert len(calls) == 4  # from the cache: the frozen part does not run again
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    # One sentence alone (no padding) against the same sentence in the padded batch.
    short = min(range(4), key=lambda b: int(mask[b].sum()))
    ids1, mask1, n1 = _batch(tok, [SENTENCES[short]])
    alone = encoder(ids1, mask1, n1)[0]
    torch.testing.assert_close(first[short, :n1], alone, **TOL)
    assert torch.all(first[short, n1:] == 0) or bool(mask[short, n1 + 2 :].eq(0).all())
    handle.remove()


def test_training_mode_drops_out_in_the_top_layers_only(deep_encoder_dir):
    encoder, _ = _encoder(deep_encoder_dir)
    encoder.freeze(FeatureCache(), top_layers=1)
    encoder.train()
    layers = encoder.bert.encoder.layer
    assert layers[2].training and not layers[1].training and not encoder.bert.embeddings.training
    encoder.eval()
    assert not layers[2].training


def test_top_layers_are_refused_where_they_cannot_apply(deep_encoder_dir):
    encoder, _ = _encoder(deep_encoder_dir)
    with pytest.raises(ValueError, match="has 3 layers"):
        encoder.freeze(FeatureCache(), top_layers=4)
    with pytest.raises(ConfigError, match="encoder_lr > 0"):
        TrainConfig(encoder_lr=0.0, encoder_top_layers=1)
    with pytest.raises(ConfigError, match="unk_alpha = 0"):
        TrainConfig(encoder_lr=1e-4, unk_alpha=0.25, encoder_top_layers=1)
    with pytest.raises(ConfigError, match=">= 0"):
        TrainConfig(encoder_lr=1e-4, encoder_top_layers=-1)
