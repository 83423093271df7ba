"""The learning start of grid models: prior output biases, [UNK] replacement, frozen encoders,
the threshold-shift diagnostic and the step-level dev curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crener.config import ModelConfig
from crener.data.batching import Example
from crener.identity import run_key
from crener.layers import CoPredictor
from crener.tasks import GridTask
from crener.train import fit, replace_with_unk, start_from_priors, unk_replacement_probs
from tests.conftest import SENTENCES, TYPES
from tests.helpers import tiny_cfg

# ------------------------------------------------------------------------------ priors


def _examples(task, tok=None) -> list[Example]:
    out = []
    for k, s in enumerate(SENTENCES):
        ids = np.zeros(len(s) + 2, dtype=np.int64) if tok is None else np.asarray(tok.encode(s.chars))
        out.append(Example(k, ids, task.featurize(s.entities, len(s)), len(s)))
    return out


def test_zlpr_prior_is_the_training_log_odds_per_label():
    task = GridTask(ModelConfig(), TYPES)
    examples = _examples(task)
    prior = task.output_prior([e.targets for e in examples], [e.n for e in examples]).double()
    cells = sum(len(s) ** 2 for s in SENTENCES)
    # Count by hand: the label of every gold cell of every sentence.
    counts = np.zeros(task.num_labels)
    for s in SENTENCES:
        for _, _, label in task.labels.encode(s.entities, len(s)):
            counts[label] += 1
    for label in range(task.num_labels):
        p = max(counts[label], 0.5) / cells
        assert prior[label].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    # The NNC label (links inside entities) is the most frequent one; absent labels get half a cell.
    assert counts.max() > 0 and prior.argmax().item() == counts.argmax()
    # A type never seen in training counts as half a cell, not minus infinity.
    wider = GridTask(ModelConfig(), (*TYPES, "ZZZ"))
    ex = _examples(wider)
    prior = wider.output_prior([e.targets for e in ex], [e.n for e in ex]).double()
    assert prior.min().item() == pytest.approx(math.log(0.5 / cells / (1 - 0.5 / cells)), rel=1e-6)


def test_ce_prior_is_the_log_class_frequency_with_none_first():
    cfg = ModelConfig(tag_scheme="w2ner", loss="ce", link_mode="nnc_only")
    task = GridTask(cfg, TYPES)
    examples = _examples(task)
    prior = task.output_prior([e.targets for e in examples], [e.n for e in examples])
    probs = prior.double().exp()
    assert probs.sum().item() == pytest.approx(1.0, rel=1e-6)
    cells = sum(len(s) ** 2 for s in SENTENCES)
    counts = np.zeros(task.num_labels - 1)
    for e in examples:  # one class per cell after the collision rule
        for _, _, label in e.targets:
            counts[label] += 1
    full = np.concatenate([[cells - counts.sum()], np.maximum(counts, 0.5)])
    torch.testing.assert_close(probs, torch.from_numpy(full / full.sum()), rtol=1e-5, atol=1e-9)
    assert probs[0].item() > 0.9  # "none" dominates the grid


@pytest.mark.parametrize("halves", [(True, True), (True, False), (False, True)])
def test_output_bias_moves_every_logit_by_exactly_the_prior(halves):
    torch.manual_seed(0)
    use_biaffine, use_mlp = halves
    pred = CoPredictor(5, char_dim=8, grid_dim=6, biaffine_dim=7, ffn_dim=4, dropout=0.0,
                       use_biaffine=use_biaffine, use_mlp=use_mlp).eval()  # fmt: skip
    s, o, grid = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 3, 6)
    before = pred(s, o, grid)
    const = torch.zeros(5)
    if use_mlp:
        const += pred.linear.bias.detach()
    if use_biaffine:
        const += pred.biaffine.weight[:, -1, -1].detach()
    bias = torch.tensor([-4.0, -6.5, -8.0, -12.0, 0.3])
    pred.set_output_bias(bias)
    after = pred(s, o, grid)
    torch.testing.assert_close(after - before, (bias - const).expand_as(after), rtol=0, atol=1e-5)


def test_fit_starts_grid_models_at_the_priors(tiny_encoder):
    from crener.registry import build_model

    encoder, tok = tiny_encoder
    cfg = ModelConfig(hidden=16, tf_heads=4, enh_heads=4, conv_channels=8, tag_dim=8, biaffine_dim=8, ffn_dim=8,
                      dist_dim=4, region_dim=4, attn_dim=4, rounds=2)  # fmt: skip
    task = GridTask(cfg, TYPES)
    model = build_model(cfg, task, encoder)
    examples = _examples(task, tok)
    prior = start_from_priors(model, task, examples)
    torch.testing.assert_close(model.predictor.linear.bias.detach(), prior)
    assert torch.all(model.predictor.biaffine.weight[:, -1, -1] == 0)


def test_softmax_tagger_prior_is_the_log_tag_frequency_and_starts_its_classifier(tiny_encoder):
    from baselines.sequence import SequenceTask
    from crener.profiles import build_run_config
    from crener.registry import build_model

    encoder, tok = tiny_encoder
    task = SequenceTask(TYPES, decoder="softmax")
    examples = _examples(task, tok)
    prior = task.output_prior([e.targets for e in examples], [e.n for e in examples])
    counts = np.zeros(task.num_labels)
    for s in SENTENCES:
        for tag in task.featurize(s.entities, len(s)):
            counts[tag] += 1
    counts = np.maximum(counts, 0.5)  # tags no fixture sentence uses count half
    torch.testing.assert_close(
        prior.double(), torch.from_numpy(np.log(counts / counts.sum())), rtol=0, atol=1e-6
    )
    assert prior.argmax().item() == 0  # "O"
    model = build_model(build_run_config(model="bert_softmax", profile="smoke").model, task, encoder)
    assert torch.equal(start_from_priors(model, task, examples), prior)
    torch.testing.assert_close(model.classifier.bias.detach(), prior)


def test_prior_bias_is_read_by_the_softmax_tagger_and_not_by_the_crf_one(tiny_data, tmp_path, monkeypatch):
    """BERT-CRF does not read model.prior_bias (its key ignores it), so fit must not act on it."""
    import crener.train as train_mod
    from crener.profiles import build_run_config

    on = {"model.prior_bias": True}
    for name, changes in (("bert_softmax", True), ("bert_crf", False), ("crener", True)):
        a = run_key(build_run_config(model=name, profile="smoke"))
        b = run_key(build_run_config(model=name, profile="smoke", overrides=on))
        assert (a != b) is changes, name
    called = []
    monkeypatch.setattr(
        train_mod, "start_from_priors", lambda model, task, ex: called.append(type(model).__name__)
    )
    for name in ("bert_crf", "bert_softmax"):
        cfg = tiny_cfg(tiny_data, model=name, **{"train.epochs": 1, "model.prior_bias": True})
        fit(cfg, tmp_path / name, resume=False)
    assert called == ["BertTagger"]  # once: the softmax tagger's run


# ------------------------------------------------------------------------------ [UNK] replacement


def test_unk_probabilities_follow_alpha_over_alpha_plus_count(tiny_encoder):
    _, tok = tiny_encoder
    task = GridTask(ModelConfig(), TYPES)
    examples = _examples(task, tok)
    vocab = int(tiny_encoder[0].bert.config.vocab_size)
    specials = (tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id)
    probs = unk_replacement_probs(examples, vocab, 0.25, specials)
    counts: dict[int, int] = {}
    for s in SENTENCES:
        for c in s.chars:
            counts[tok.char_id(c)] = counts.get(tok.char_id(c), 0) + 1
    for tid, n in counts.items():
        assert probs[tid].item() == pytest.approx(0.25 / (0.25 + n))
    assert all(probs[i].item() == 0 for i in specials)
    unseen = [i for i in range(vocab) if i not in counts and i not in specials]
    assert all(probs[i].item() == 0 for i in unseen)
    assert unk_replacement_probs(examples, vocab, 0.0, specials) is None


def test_replace_with_unk_rate_and_the_unk_vector_gets_gradient(tiny_encoder):
    encoder, tok = tiny_encoder
    probs = torch.zeros(int(encoder.bert.config.vocab_size))
    probs[10] = 0.3
    ids = torch.full((200, 50), 10)
    torch.manual_seed(0)
    out = replace_with_unk(ids, probs, tok.unk_id)
    rate = (out == tok.unk_id).float().mean().item()
    assert abs(rate - 0.3) < 0.02 and set(out.unique().tolist()) == {10, tok.unk_id}
    # An input with [UNK] in it back-propagates into the [UNK] row of the embedding table.
    batch = torch.tensor([[tok.cls_id, 10, tok.unk_id, 11, tok.sep_id]])
    encoder.train()
    encoder(batch, torch.ones_like(batch), 3).sum().backward()
    grad = encoder.bert.embeddings.word_embeddings.weight.grad
    assert grad[tok.unk_id].abs().sum() > 0


# ------------------------------------------------------------------------------ diagnostics


def test_shifted_moves_zlpr_thresholds_and_the_ce_none_class():
    logits = torch.tensor([[[[-1.0, 0.5, 2.0]]]])
    zlpr = GridTask.shifted({"logits": logits}, 1.5, "grid")["logits"]
    torch.testing.assert_close(zlpr, logits + 1.5)
    ce = GridTask.shifted({"logits": logits}, 1.5, "classes")["logits"]
    torch.testing.assert_close(ce, torch.tensor([[[[-2.5, 0.5, 2.0]]]]))
    assert logits[0, 0, 0, 0].item() == -1.0  # the input is never changed in place


def test_step_curve_is_written_and_changes_no_training_result(tiny_data, tmp_path):  # noqa: F811
    plain = fit(tiny_cfg(tiny_data, **{"train.epochs": 2}), tmp_path / "a")
    curved = fit(tiny_cfg(tiny_data, **{"train.epochs": 2, "runtime.eval_every": 1}), tmp_path / "b")
    assert plain["dev"] == curved["dev"] and plain["test"] == curved["test"]
    hist_a = json.loads((tmp_path / "a" / "history.json").read_text())
    hist_b = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["train/loss"] for h in hist_a] == [h["train/loss"] for h in hist_b]
    curve = json.loads((tmp_path / "b" / "curve.json").read_text())
    steps = [r["step"] for r in curve]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert all(0 <= r["dev/f1"] <= r["dev/f1_best_shift"] <= 1 for r in curve)
    assert not (tmp_path / "a" / "curve.json").exists()
    assert set(curved["dev_best_shift"]) == {"shift", "f1"}


def test_frozen_encoder_gets_no_update(tiny_data, tmp_path):  # noqa: F811
    from crener.checkpoint import load_checkpoint

    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "train.encoder_lr": 0.0})
    fit(cfg, tmp_path / "frozen")
    state = load_checkpoint(tmp_path / "frozen" / "checkpoints" / "last.pt")
    from crener.encoder import load_pretrained

    enc_dirs = list((tmp_path / "frozen").glob("encoder-*"))
    bert, _ = load_pretrained(enc_dirs[0])
    for name, value in bert.state_dict().items():
        torch.testing.assert_close(state["model"][f"encoder.bert.{name}"], value, rtol=0, atol=0)
    # Nothing of the encoder is in the optimiser: its state only covers the head's parameters.
    n_head = sum(1 for k in state["model"] if not k.startswith("encoder."))
    assert len(state["optimizer"]["state"]) <= n_head


def _padded(tok, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token-id rows ([CLS] ... [SEP]) padded to one width: ids, attention mask, characters."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    return ids, (ids != tok.pad_id).long(), width - 2


def test_frozen_cached_features_equal_the_encoder_and_survive_inference_mode(tiny_encoder):
    encoder, tok = tiny_encoder
    ids, mask, n = _padded(tok, [tok.encode(s.chars) for s in SENTENCES[:4]])
    encoder.eval()
    with torch.no_grad():
        plain = encoder(ids, mask, n)
    from crener.encoder import FeatureCache

    cache = FeatureCache()
    encoder.freeze(cache)
    encoder.train()  # a frozen encoder stays in eval mode: no dropout
    assert not encoder.bert.training
    with torch.inference_mode():  # first seen during evaluation
        first = encoder(ids, mask, n)
    assert len(cache) == 4 and cache.floats == int((mask.sum(1) - 2).sum()) * encoder.out_dim
    valid = (mask[:, 2:] == 1)[..., None]  # characters (BERT's outputs at padding are not features)
    torch.testing.assert_close(first * valid, plain * valid, rtol=1e-5, atol=1e-5)
    # Reused in training: the cached tensors enter an autograd graph without complaint.
    proj = torch.nn.Linear(encoder.out_dim, 3)
    again = encoder(ids[1:3], mask[1:3], n)
    proj(again).sum().backward()
    assert proj.weight.grad is not None and len(cache) == 4
    torch.testing.assert_close(again * valid[1:3], plain[1:3] * valid[1:3], rtol=1e-5, atol=1e-5)
    # Padding rows are zero; real rows carry features.
    lengths = mask.sum(1) - 2
    for b, length in enumerate(lengths.tolist()):
        assert torch.all(first[b, length:] == 0) and first[b, :length].abs().sum() > 0


def test_cached_features_do_not_depend_on_the_batch_that_first_met_the_sentence(tiny_encoder):
    """A sentence first cached beside a longer one (padded) gets exactly the features it gets
    when first cached alone: a sweep's earlier cells cannot change a later cell's inputs."""
    from crener.encoder import FeatureCache

    encoder, tok = tiny_encoder
    rows = sorted((tok.encode(s.chars) for s in SENTENCES[:4]), key=len)
    short, long_ = rows[0], rows[-1]
    assert len(short) < len(long_)
    encoder.freeze(FeatureCache())
    ids, mask, n = _padded(tok, [short, long_])
    padded = encoder(ids, mask, n)[0, : len(short) - 2]
    encoder.freeze(FeatureCache())
    ids, mask, n = _padded(tok, [short])
    alone = encoder(ids, mask, n)[0]
    assert torch.equal(padded, alone)


# ------------------------------------------------------------------------------ calibration


def test_calibrate_takes_the_best_dev_shift_and_the_smallest_move_on_ties(monkeypatch):
    from crener import evaluation
    from crener.data.schema import Entity
    from crener.metrics import score

    gold = [{Entity.span(0, 2, "PER")}]

    def fake(model, task, split, device, cfg, shifts):
        # F1 1.0 at 1.0 and at -1.0 (a tie: the smaller move wins over 2.0), 0 elsewhere
        hit = {-1.0: 1.0, 1.0: 1.0, 2.0: 1.0}
        return {d: score(gold, [gold[0] if hit.get(d) else set()]) for d in shifts}

    monkeypatch.setattr(evaluation, "shifted_scores", fake)
    shift, scores = evaluation.calibrate(None, None, None, None, None, shifts=(-1.0, 0.0, 1.0, 2.0))
    assert shift == -1.0 and scores.micro.f1 == 1.0
    shift, _ = evaluation.calibrate(None, None, None, None, None, shifts=(0.0, 2.0, 1.0))
    assert shift == 1.0
    shift, scores = evaluation.calibrate(None, None, None, None, None, shifts=(0.5, 0.0, 3.0))
    assert shift == 0.0 and scores.micro.f1 == 0.0  # nothing helps: no move


def test_calibrated_shift_reaches_test_the_checkpoint_and_predict(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """With model.calibrate the shift chosen on dev decodes test, is stored in the best
    checkpoint, and `crener evaluate` and `crener predict` decode with it too."""
    from crener import train as train_mod
    from crener.evaluation import calibrate, predict_shifted, score_split
    from crener.inference import Predictor, evaluate_checkpoint, load_for_inference

    chosen = 2.0  # forced, so the plumbing is checked with a shift that changes predictions
    monkeypatch.setattr(
        train_mod, "calibrate", lambda *a, **k: (chosen, calibrate(*a, **k, shifts=(chosen,))[1])
    )
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 2, "model.calibrate": True})
    out = fit(cfg, tmp_path / "cal")
    assert out["threshold_shift"] == chosen
    best = tmp_path / "cal" / "checkpoints" / "best.pt"
    loaded = load_for_inference(best)
    assert loaded.shift == chosen
    # The summary's test F1 is the best checkpoint's at the shift, not at 0.
    from crener.data.datasets import load_dataset
    from crener.evaluation import build_split

    data = load_dataset(cfg.data, seed=cfg.train.seed, data_root=cfg.runtime.data_root)
    test = build_split("test", data.test, cfg.data.max_len, loaded.task, loaded.tokenizer)
    per = predict_shifted(
        loaded.model, loaded.task, test.examples, torch.device("cpu"), loaded.cfg, (0.0, chosen)
    )
    at_shift, at_zero = score_split(test, per[chosen])[0], score_split(test, per[0.0])[0]
    assert per[chosen] != per[0.0]  # the shift really changes the decoded entities here
    assert out["test"]["f1"] == pytest.approx(at_shift.micro.f1)
    assert evaluate_checkpoint(best)["f1"] == pytest.approx(at_shift.micro.f1)
    assert at_shift.micro.f1 != at_zero.micro.f1 or at_shift.micro.precision != at_zero.micro.precision
    # predict decodes with the stored shift as well
    tagged = list(Predictor(loaded, device="cpu").predict(data.test))
    n_pred = sum(len(r["entities"]) for r in tagged)
    assert n_pred == sum(len(p) for p in score_split(test, per[chosen])[1])


def test_calibrate_is_a_grid_task_field_only():
    from crener.profiles import build_run_config

    on = {"model.calibrate": True}
    for name, changes in (("crener", True), ("w2ner", True), ("bert_crf", False), ("tener", False)):
        a = run_key(build_run_config(model=name, profile="smoke"))
        b = run_key(build_run_config(model=name, profile="smoke", overrides=on))
        assert (a != b) is changes, name
