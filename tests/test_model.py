"""CRENER model invariants: shapes, ablations, padding invariance, masking, overfitting."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from crener import registry
from crener.config import RuntimeConfig
from crener.data.batching import Example, collate
from crener.loss import GridLoss
from crener.metrics import score
from crener.model import CRENER
from crener.profiles import VARIANTS, build_run_config
from crener.registry import build_model, build_task
from tests.conftest import TYPES


def model_cfg(variant: str = "full", **overrides):
    cfg = build_run_config(variant=variant, profile="smoke").model
    zero = {
        "emb_dropout": 0.0,
        "tf_dropout": 0.0,
        "conv_dropout": 0.0,
        "out_dropout": 0.0,
        "enh_dropout": 0.0,
    }
    return dataclasses.replace(cfg, **{**zero, **overrides})


def make(variant, tiny_encoder, sentences, family="crener", runtime=None, **overrides):
    encoder, tok = tiny_encoder
    cfg = (
        model_cfg(variant, **overrides)
        if family == "crener"
        else build_run_config(model=family, profile="smoke").model
    )
    task = build_task(cfg, TYPES)
    torch.manual_seed(0)
    model = build_model(cfg, task, encoder, runtime)
    examples = [
        Example(k, np.asarray(tok.encode(s.chars)), task.featurize(s.entities, len(s)), len(s))
        for k, s in enumerate(sentences)
    ]
    return cfg, task, model, examples


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shape_every_variant(variant, tiny_encoder, sentences):
    cfg, task, model, examples = make(variant, tiny_encoder, sentences)
    batch = collate(examples, task.target, task.num_labels)
    out = model(batch)["logits"]
    n = max(len(s) for s in sentences)
    assert out.shape == (len(sentences), n, n, task.num_labels)
    expected = 2 + 2 * len(TYPES) if cfg.tag_scheme == "crener" else 1 + len(TYPES)
    assert task.num_labels == expected
    assert torch.isfinite(out).all()


def param_names(model):
    return {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}


REMOVED = {
    "no_transformer": ("transformer.", "grid.attn_proj."),
    "no_region": ("grid.region_emb.",),
    "no_distance": ("grid.dist_emb.",),
    "no_dconv": ("grid.dconv.",),
    # Without the MLP the grid branch feeds nothing (biaffine reads H), so it is not built.
    "no_mlp": ("predictor.mlp_rel.", "predictor.linear.", "grid.", "tag_proj.", "enhance.", "subj.", "obj."),
    "no_biaffine": ("predictor.mlp_s.", "predictor.mlp_o.", "predictor.biaffine."),
    "no_enhancement": ("enhance.", "tag_proj."),
    "no_relation": (),
}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "full"])
def test_ablation_removes_exactly_its_part(variant, tiny_encoder, sentences):
    full = param_names(make("full", tiny_encoder, sentences)[2])
    _, _, model, _ = make(variant, tiny_encoder, sentences)
    names = param_names(model)
    gone = full - names
    assert names <= full, f"{variant} added parameters: {names - full}"
    assert {n for n in gone if not n.startswith(REMOVED[variant])} == set(), gone
    for prefix in REMOVED[variant]:
        assert any(n.startswith(prefix) for n in full) and not any(n.startswith(prefix) for n in names)


def test_ablation_widths_shrink(tiny_encoder, sentences):
    full = make("full", tiny_encoder, sentences)[2]
    cfg = full.cfg
    base = cfg.hidden + cfg.dist_dim + cfg.region_dim + cfg.attn_dim
    assert full.grid.reduce.in_features == base
    assert make("no_region", tiny_encoder, sentences)[2].grid.reduce.in_features == base - cfg.region_dim
    assert make("no_distance", tiny_encoder, sentences)[2].grid.reduce.in_features == base - cfg.dist_dim
    assert make("no_transformer", tiny_encoder, sentences)[2].grid.reduce.in_features == base - cfg.attn_dim
    no_dconv = make("no_dconv", tiny_encoder, sentences)[2]
    assert no_dconv.tag_proj.in_features == cfg.conv_channels
    assert full.tag_proj.in_features == len(cfg.dilations) * cfg.conv_channels
    no_rel = make("no_relation", tiny_encoder, sentences)[2]
    assert no_rel.tag_proj.out_features == 2 * cfg.tag_dim and full.tag_proj.out_features == 4 * cfg.tag_dim
    assert no_rel.predictor.linear.out_features == 1 + len(TYPES)


def call_counts(model, batch):
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and not name.startswith("encoder"):
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
                )
            )
    model(batch)
    for h in hooks:
        h.remove()
    return counts


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_built_parameter_is_used_and_removed_parts_never_run(variant, tiny_encoder, sentences):
    cfg, task, model, examples = make(variant, tiny_encoder, sentences)
    batch = collate(examples, task.target, task.num_labels)
    counts = call_counts(model, batch)
    # Some layers are applied through their weights (the factored 1x1 conv, space-to-batch
    # convs), so "used" is checked by gradients: every built parameter must get one.
    task.loss(model(batch), batch)["loss"].backward()
    unused = [n for n, p in model.named_parameters() if not n.startswith("encoder.") and p.grad is None]
    assert unused == []
    if model.grid is None:
        assert not cfg.use_grid_mlp and not any(n.startswith(("grid", "enhance", "tag_proj")) for n in counts)
        return
    assert counts["grid"] == cfg.rounds and counts["grid.cln.gamma"] == cfg.rounds
    if cfg.use_relation_enhancement:
        assert counts["enhance"] == cfg.rounds - 1
    else:
        assert model.enhance is None and model.tag_proj is None
        assert not any(n.startswith(("enhance", "tag_proj")) for n in counts)
    removed = {"transformer": cfg.context != "transformer", "predictor.biaffine": not cfg.use_biaffine,
               "predictor.mlp_rel": not cfg.use_grid_mlp, "grid.dconv": not cfg.use_dilated_conv}  # fmt: skip
    for name, gone in removed.items():
        assert (name in counts) != gone, name


def test_invalid_combinations_refused():
    # The family checks these where a run is built (crener.registry.check_model), not the config.
    for overrides, match in (
        ({"use_biaffine": False, "use_grid_mlp": False}, "both be false"),
        ({"context": "none"}, "attn_matrix"),
        ({"loss": "ce"}, "loss=ce"),
        ({"use_relation_enhancement": False}, "rounds"),
    ):
        with pytest.raises(ValueError, match=match):
            build_run_config(profile="smoke", overrides={f"model.{k}": v for k, v in overrides.items()})
        with pytest.raises(ValueError, match=match):
            registry.check_model(model_cfg(**overrides))


def test_profile_rounds_apply_only_where_enhancement_runs():
    # quick shortens the enhancement loop to 2 passes; models without one keep a single pass.
    assert build_run_config(profile="quick").model.rounds == 2
    assert build_run_config(profile="quick", variant="no_relation").model.rounds == 2
    assert build_run_config(profile="quick", variant="no_enhancement").model.rounds == 1
    assert build_run_config(model="w2ner", profile="quick").model.rounds == 1


@pytest.mark.parametrize("variant", ["full", "no_transformer", "no_relation"])
def test_sentence_alone_equals_sentence_padded_in_batch(variant, tiny_encoder, sentences):
    _, task, model, examples = make(variant, tiny_encoder, sentences)
    model.eval()
    short = min(range(len(examples)), key=lambda k: examples[k].n)
    n = examples[short].n
    with torch.no_grad():
        alone = model(collate([examples[short]], task.target, task.num_labels))["logits"][0]
        batched = model(collate(examples, task.target, task.num_labels))["logits"][short, :n, :n]
    assert max(e.n for e in examples) > n  # the batch really pads this sentence
    torch.testing.assert_close(alone, batched, atol=2e-5, rtol=1e-4)


def test_padded_cells_never_enter_the_loss(tiny_encoder, sentences):
    _, task, model, examples = make("full", tiny_encoder, sentences)
    batch = collate(examples, task.target, task.num_labels)
    logits = model(batch)["logits"].detach()
    loss = task.loss({"logits": logits}, batch)["loss"]
    garbage = logits.masked_fill(~batch.grid_mask[..., None], 1e4)
    assert torch.equal(task.loss({"logits": garbage}, batch)["loss"], loss)
    # Same value as an explicit mean over valid cells.
    per_cell = [
        GridLoss("zlpr")(logits[b : b + 1], batch.targets[b : b + 1], batch.grid_mask[b : b + 1])["loss"]
        * batch.lengths[b] ** 2
        for b in range(len(batch))
    ]
    torch.testing.assert_close(loss, torch.stack(per_cell).sum() / (batch.lengths**2).sum())


def overfit(variant, tiny_encoder, sentences, steps=150, **overrides):
    _, task, model, examples = make(variant, tiny_encoder, sentences, **overrides)
    batch = collate(examples, task.target, task.num_labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = task.loss(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = task.decode(model(batch), batch)
    return score([set(s.entities) for s in sentences], pred).micro.f1


@pytest.mark.parametrize("variant", ["full", "no_relation"])
def test_overfits_a_handful_of_sentences(variant, tiny_encoder, sentences):
    assert overfit(variant, tiny_encoder, sentences) == 1.0


def test_crener_class_is_the_full_model(tiny_encoder, sentences):
    assert isinstance(make("full", tiny_encoder, sentences)[2], CRENER)


@pytest.mark.parametrize("variant", ["full", "no_transformer", "no_region"])
@pytest.mark.parametrize("orientation", ["paper", "code"])
@pytest.mark.parametrize("form", ["split", "factored"])
def test_grid_input_forms_equal_the_literal_concatenation(
    form, variant, orientation, tiny_encoder, sentences
):
    cfg, task, model, examples = make(variant, tiny_encoder, sentences, cln_orientation=orientation)
    grid = model.grid
    with torch.no_grad():  # non-trivial CLN so orientation matters
        grid.cln.gamma.weight.normal_(0, 0.3)
        grid.cln.beta.weight.normal_(0, 0.3)
    torch.manual_seed(1)
    b, n, d = 3, 7, cfg.hidden
    s, o = torch.randn(b, n, d), torch.randn(b, n, d)
    lengths = torch.tensor([7, 5, 2])
    from crener.data.features import grid_mask

    mask = grid_mask(lengths, n)
    attn = torch.softmax(torch.randn(b, cfg.tf_heads, n, n), -1) if grid.attn_proj is not None else None
    fast_form = getattr(grid, f"_{form}")
    grid.eval()
    torch.testing.assert_close(
        fast_form(s, o, mask, attn), grid._concat(s, o, mask, attn), atol=1e-5, rtol=1e-4
    )
    # Training mode: every form draws the same channel-dropout mask, so they agree too.
    grid.train()
    grid.dropout = 0.5
    torch.manual_seed(3)
    fast = fast_form(s, o, mask, attn)
    torch.manual_seed(3)
    slow = grid._concat(s, o, mask, attn)
    assert not torch.equal(fast, fast_form(s, o, mask, attn))  # dropout really is active
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    # Backward: the same gradients for the inputs and every parameter.
    grads = []
    for fn in (fast_form, grid._concat):
        grid.zero_grad()
        s_, o_ = s.clone().requires_grad_(), o.clone().requires_grad_()
        torch.manual_seed(3)
        (fn(s_, o_, mask, attn) * torch.linspace(-1, 1, grid.reduce.out_features)).sum().backward()
        grads.append([s_.grad, o_.grad] + [p.grad for p in grid.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 2
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["concat", "factored"])
def test_grid_rewrites_compute_the_same_scores(form, tiny_encoder, sentences):
    # Another input form and library convs (both non-default) give the default model's scores.
    cfg, task, model, examples = make("full", tiny_encoder, sentences)
    _, _, other, _ = make(
        "full", tiny_encoder, sentences, runtime=RuntimeConfig(grid_input=form, space_to_batch=False)
    )
    other.load_state_dict(model.state_dict())
    assert model.grid.input_form == "split" and model.grid.dconv.space_to_batch
    assert other.grid.input_form == form and not other.grid.dconv.space_to_batch
    batch = collate(examples[:3], task.target, task.num_labels)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], other(batch)["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("family", "overrides", "runtime"),
    [
        ("crener", {}, {}),
        ("crener", {"dconv_chain": True}, {}),
        ("crener", {}, {"checkpoint_rounds": True}),
        ("w2ner", {}, {}),
    ],
    ids=["crener", "crener-chained", "crener-checkpointed", "w2ner"],
)
def test_fused_dilated_conv_gives_the_same_loss_and_gradients(
    family, overrides, runtime, tiny_encoder, sentences
):
    losses, grads = [], []
    for fused in (False, True):
        rt = RuntimeConfig(fused_conv=fused, **runtime)
        _, task, model, examples = make(
            "full", tiny_encoder, sentences, family=family, runtime=rt, **overrides
        )
        assert model.grid.dconv.fused == fused
        assert model.grid.dconv.chain == (family == "w2ner" or "dconv_chain" in overrides)
        batch = collate(examples, task.target, task.num_labels)
        model.train()
        torch.manual_seed(4)  # W2NER's smoke model keeps its dropouts: the same draws in both
        loss = task.loss(model(batch), batch)["loss"]
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        losses.append(loss.detach())
        grads.append(dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True))))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        if g is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_positive_cells_are_capped_per_sentence(tiny_encoder, sentences):
    from crener.tasks import MAX_CELLS_PER_CHAR

    _, task, model, examples = make("full", tiny_encoder, sentences)
    batch = collate(examples, task.target, task.num_labels)
    logits = torch.randn(len(batch), batch.n, batch.n, task.num_labels) + 3.0  # nearly all positive
    logits[0, 0, 1, 0] = 100.0  # the best cell of sentence 0 always survives
    cells = task.positive_cells(logits, batch)
    for k, c in enumerate(cells):
        assert len(c) == MAX_CELLS_PER_CHAR * examples[k].n
    assert any((row == [0, 1, 0]).all() for row in cells[0])
    small = torch.full_like(logits, -5.0)
    small[1, 2, 3, 4] = 1.0
    assert [len(c) for c in task.positive_cells(small, batch)] == [0, 1, 0, 0, 0, 0]
