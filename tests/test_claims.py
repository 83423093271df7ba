"""Claims made in docstrings, the README and method.md that no other test pins.

Grouped by claim:

1. Evaluation pipeline: input order after length-sorted batching, independence from the
   evaluation cell budget, long sentences cut blind and scored on the originals.
2. The grid decoder against a brute-force reference written here from method.md §1 (every path
   of every head-tail candidate enumerated as a subset of the characters in between), for every
   decoder mode, with the ``max_paths`` and ``max_entities`` caps.
3. Training and model switches: ``runtime.checkpoint_rounds`` is exact, ``data.test_limit`` is a
   fixed sample, ``train.max_steps`` bounds the optimiser steps of an epoch, the cell budget of
   ``make_batches``, the relation enhancement (eqs 11-15) against a loop-based reference, and
   padding invariance of all nine CRENER variants.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import crener.model as crener_model
from crener.config import DataConfig, ModelConfig
from crener.data.batching import Example, collate, make_batches
from crener.data.datasets import load_dataset
from crener.data.features import char_mask, grid_mask
from crener.data.grid import LabelSet
from crener.data.schema import Entity, Sentence
from crener.data.split import merge_predictions
from crener.evaluation import build_split, evaluate, predict_examples, score_split
from crener.metrics import Counts
from crener.model import RelationEnhancement
from crener.profiles import VARIANTS, build_run_config
from crener.registry import build_model, build_task
from crener.tasks import MAX_ENTITIES_PER_CHAR, GridTask
from crener.train import fit
from tests.conftest import SENTENCES, TYPES
from tests.helpers import write_bmes

CPU = torch.device("cpu")


def sent(text: str, *spans: tuple[int, int, str]) -> Sentence:
    return Sentence(tuple(text), tuple(Entity.span(a, b, t) for a, b, t in spans))


def run_cfg(**overrides):
    """The smoke profile (tiny widths) on CPU, fp32."""
    base = {"runtime.device": "cpu", "train.bf16": False, "runtime.progress": False}
    return build_run_config(profile="smoke", overrides={**base, **overrides})


def tiny_model(tiny_encoder, variant: str = "full", seed: int = 0, **model_overrides):
    """(task, model, tokenizer) of one CRENER variant at the smoke profile's widths."""
    encoder, tok = tiny_encoder
    mcfg = dataclasses.replace(build_run_config(variant=variant, profile="smoke").model, **model_overrides)
    task = build_task(mcfg, TYPES)
    torch.manual_seed(seed)
    model = build_model(mcfg, task, encoder)
    return task, model, tok


# Sentences of very different lengths, from the fixture's characters (others would be [UNK]).
MIXED = [
    SENTENCES[3],  # 7
    sent(SENTENCES[0].text * 4, (0, 2, "NAME"), (13, 17, "ORG"), (38, 40, "TITLE")),  # 40
    sent("张三", (0, 2, "NAME")),  # 2
    sent(SENTENCES[1].text + SENTENCES[2].text, (0, 2, "NAME"), (10, 12, "NAME")),  # 20
    SENTENCES[5],  # 11
    sent("他"),  # 1
    sent(SENTENCES[4].text * 3, (0, 2, "NAME")),  # 30
]


def busy_model(tiny_encoder):
    """An untrained full model whose output biases are set so that it predicts a few entities
    per sentence (neither none nor the decoder caps)."""
    task, model, tok = tiny_model(tiny_encoder)
    model.predictor.set_output_bias(torch.full((task.num_labels,), -0.3))
    model.eval()
    return task, model, tok


# =========================================================================== 1. evaluation


def test_predictions_come_back_in_input_order_after_length_sorted_batching(tiny_encoder):
    """predict_examples batches by length (sorted, under eval_max_cells) and must put every
    prediction back at its example's position: the same sets as predicting each example alone."""
    task, model, tok = busy_model(tiny_encoder)
    cfg = run_cfg(**{"runtime.eval_max_cells": 2000})
    examples = build_split("mixed", MIXED, 64, task, tok).examples
    lengths = [e.n for e in examples]
    batches = make_batches(lengths, max_cells=2000)
    flat = [i for b in batches for i in b]
    assert flat != list(range(len(examples))) and len(batches) > 1  # batching really reorders
    together = predict_examples(model, task, examples, CPU, cfg)
    alone = [predict_examples(model, task, [e], CPU, cfg)[0] for e in examples]
    assert together == alone
    # Not vacuous: most sentences predict something, and the predictions differ between them.
    assert sum(bool(p) for p in alone) >= 4
    assert len({frozenset(p) for p in alone}) >= 4
    for p, n in zip(together, lengths):
        assert all(e.indices[-1] < n for e in p)


def test_scores_do_not_depend_on_the_evaluation_cell_budget(tiny_encoder):
    """runtime.eval_max_cells only sizes evaluation batches (it is left out of the run key): a
    budget of 200 cells (five batches, the long sentences alone) and one of 100,000 (one batch) give the same
    predictions and scores."""
    task, model, tok = busy_model(tiny_encoder)
    split = build_split("mixed", MIXED, 64, task, tok)
    lengths = [e.n for e in split.examples]
    assert (
        len(make_batches(lengths, max_cells=200)) >= 5 and len(make_batches(lengths, max_cells=100_000)) == 1
    )
    small_scores, small = evaluate(model, task, split, CPU, run_cfg(**{"runtime.eval_max_cells": 200}))
    big_scores, big = evaluate(model, task, split, CPU, run_cfg(**{"runtime.eval_max_cells": 100_000}))
    assert small == big
    assert small_scores == big_scores
    assert small_scores.micro.predicted > 0


# 20 characters, no punctuation: with max_len 11 the blind cut falls at 11, inside 李四 (10, 11).
LONG = sent(
    "赵六现任董事长兼总裁李四任华为公司总经理",
    (0, 2, "NAME"), (4, 7, "TITLE"), (8, 10, "TITLE"), (10, 12, "NAME"), (13, 17, "ORG"), (17, 20, "TITLE"),
)  # fmt: skip


def test_long_sentence_is_cut_blind_and_merged_back_to_original_offsets(tiny_encoder):
    """A sentence longer than max_len is cut blind; chunk entities map back to original offsets,
    and an entity the cut splits is a miss (its two fragments are false positives), never a hit."""
    task = build_task(ModelConfig(), TYPES)
    short = SENTENCES[0]
    split = build_split("test", [LONG, short], 11, task, tiny_encoder[1])
    layout = [(c.index, c.offset, len(c.sentence)) for c in split.chunks]
    assert layout == [(0, 0, 11), (0, 11, 9), (1, 0, 10)]  # (sentence, offset, length)
    # The best chunk-level predictions: every gold entity clipped to each chunk, chunk-local.
    oracle = []
    for chunk in split.chunks:
        a, b = chunk.offset, chunk.offset + len(chunk.sentence)
        clipped = {Entity(tuple(i - a for i in e.indices if a <= i < b), e.type)
                   for e in split.sentences[chunk.index].entities if e.start < b and e.end > a}  # fmt: skip
        oracle.append(clipped)
    assert Entity((2, 3, 4, 5), "ORG") in oracle[1]  # 华为公司, 13..16 in the original
    scores, merged = score_split(split, oracle)
    assert merged[0] == {
        Entity((0, 1), "NAME"), Entity((4, 5, 6), "TITLE"), Entity((8, 9), "TITLE"),
        Entity((10,), "NAME"), Entity((11,), "NAME"),  # the two fragments of 李四
        Entity((13, 14, 15, 16), "ORG"), Entity((17, 18, 19), "TITLE"),
    }  # fmt: skip
    assert merged[1] == set(short.entities)
    # 5 of 6 entities of the long sentence and all 3 of the short one; 李四 is a miss.
    assert scores.micro == Counts(correct=8, predicted=10, gold=9)
    assert scores.per_type["NAME"] == Counts(correct=2, predicted=4, gold=3)


def test_model_predictions_on_a_long_sentence_are_the_chunks_shifted(tiny_encoder):
    """evaluate() on a split with a long sentence: one prediction set per original sentence,
    equal to each chunk predicted alone and shifted by its offset, inside the original length;
    the gold side counts every original entity."""
    task, model, tok = busy_model(tiny_encoder)
    split = build_split("test", [LONG, SENTENCES[0]], 11, task, tok)
    cfg = run_cfg()
    scores, preds = evaluate(model, task, split, CPU, cfg)
    assert len(preds) == 2 and len(split.chunks) == 3
    expected = [set(), set()]
    for chunk, example in zip(split.chunks, split.examples):
        local = predict_examples(model, task, [example], CPU, cfg)[0]
        expected[chunk.index] |= {e.shifted(chunk.offset) for e in local}
    assert preds == expected
    assert any(e.start >= 11 for e in preds[0])  # the second chunk's entities moved to the original
    assert all(e.indices[-1] < len(LONG) for e in preds[0])
    assert scores.micro.gold == len(LONG.entities) + len(SENTENCES[0].entities)
    assert merge_predictions(split.chunks, [set(), set(), set()], 2) == [set(), set()]


# =========================================================================== 2. decoder


def reference_decode(
    labels: LabelSet,
    n: int,
    cells,
    *,
    ht_mode: str = "union",
    link_mode: str = "and",
    contiguous_only: bool = False,
    max_paths: int = 1000,
    max_entities: int | None = None,
) -> set[Entity]:
    """method.md §1.2 read literally, by brute force.

    Labels are read from their names (NNC/NNW, PNC, THC-τ/THW-τ, HTC-τ, untyped HTC). A link
    m -> k (m < k) needs NNC at (m, k) and/or PNC at (k, m) as link_mode says (W2NER: NNW alone);
    a candidate (h, t, τ) is THC-τ at (t, h) (lower triangle or diagonal) and/or HTC-τ at (h, t)
    (upper or diagonal) as ht_mode says. Its entities are every path h -> t, found here by
    trying every subset of the characters strictly between h and t. ``max_paths`` keeps the
    first paths in depth-first order, smaller successors first, a path that can finish at t
    taken before any longer one (so: lexicographic order with t ranked below every other node);
    the paths of a pair serve all its types. ``max_entities``: head-tail pairs are taken in
    (h, t) order, and none is started once that many entities are out.
    """
    names = labels.names
    nnc, pnc, thc, htc, htc_untyped = set(), set(), set(), set(), set()
    for i, j, lab in np.asarray(cells).reshape(-1, 3).tolist():
        if i >= n or j >= n:
            continue  # padding
        kind, _, typ = names[lab].partition("-")
        if kind in ("NNC", "NNW") and i < j:
            nnc.add((i, j))
        elif kind == "PNC" and i > j:
            pnc.add((j, i))
        elif kind in ("THC", "THW") and i >= j:
            thc.add((j, i, typ))
        elif kind == "HTC" and i <= j:
            (htc if typ else htc_untyped).add((i, j, typ) if typ else (i, j))
    if labels.scheme == "w2ner" or ht_mode == "thc_only":
        cands = thc
    elif ht_mode == "union":
        cands = thc | htc
    elif labels.ht_typed == "both":
        cands = thc & htc
    else:
        cands = {(h, t, k) for h, t, k in thc if (h, t) in htc_untyped}
    if labels.scheme == "ht_only":
        return {Entity(tuple(range(h, t + 1)), k) for h, t, k in cands}
    if labels.scheme == "w2ner" or link_mode == "nnc_only":
        edges = nnc
    elif link_mode == "and":
        edges = nnc & pnc
    else:
        edges = nnc | pnc
    if contiguous_only:
        edges = {(m, k) for m, k in edges if k == m + 1}
    types_of: dict[tuple[int, int], list[str]] = {}
    for h, t, k in cands:
        types_of.setdefault((h, t), []).append(k)
    out: set[Entity] = set()
    for h, t in sorted(types_of):
        if max_entities is not None and len(out) >= max_entities:
            break
        if h == t:
            paths = [(h,)]
        else:
            inner = range(h + 1, t)
            subsets = (m for size in range(len(inner) + 1) for m in itertools.combinations(inner, size))
            paths = [(h, *m, t) for m in subsets if all(e in edges for e in zip((h, *m), (*m, t)))]
        paths.sort(key=lambda p: [(x != t, x) for x in p])
        out |= {Entity(p, k) for p in paths[:max_paths] for k in types_of[(h, t)]}
    return out


def random_cells(rng: np.random.Generator, labels: LabelSet, n: int, density: float) -> np.ndarray:
    """Noisy random positive cells, including padded ones (row or column >= n) and cells on the
    wrong side of the diagonal, which the decoder must ignore; for the four-tag scheme also
    matching NNC/PNC pairs at the same density, so that "and" links form long paths too."""
    size = n + 2
    cells = np.argwhere(rng.random((size, size, labels.num_labels)) < density)
    if "PNC" in labels.names:
        nnc, pnc = labels.names.index("NNC"), labels.names.index("PNC")
        links = np.argwhere(np.triu(rng.random((n, n)) < density, 1))
        both = [(m, k, nnc) for m, k in links.tolist()] + [(k, m, pnc) for m, k in links.tolist()]
        cells = np.concatenate([cells, np.array(both, dtype=np.int64).reshape(-1, 3)])
    return cells.astype(np.int32)


LABEL_SETS = {
    "crener/both": LabelSet.build("crener", ("A", "B")),
    "crener/thc_only": LabelSet.build("crener", ("A", "B"), "thc_only"),
    "w2ner": LabelSet.build("w2ner", ("A", "B")),
    "ht_only/both": LabelSet.build("ht_only", ("A", "B")),
    "ht_only/thc_only": LabelSet.build("ht_only", ("A", "B"), "thc_only"),
}


def decoder_modes():
    """Every (label set, ht_mode, link_mode, contiguous_only) the config accepts."""
    for name, labels in LABEL_SETS.items():
        hts = ("union",) if labels.scheme == "w2ner" else ("union", "intersect", "thc_only")
        links = ("and", "or", "nnc_only") if labels.scheme == "crener" else ("and",)
        contig = (False, True) if labels.scheme != "ht_only" else (False,)
        for ht, link, c in itertools.product(hts, links, contig):
            yield pytest.param(name, ht, link, c, id=f"{name}-{ht}-{link}{'-contig' if c else ''}")


@pytest.mark.parametrize("name, ht_mode, link_mode, contiguous_only", list(decoder_modes()))
def test_decoder_equals_brute_force_on_noisy_random_grids(name, ht_mode, link_mode, contiguous_only):
    """For n <= 6, the decoder's entity set equals the brute-force enumeration of method.md §1.2
    on 150 random grids per mode (fixed seed), with padding and wrong-side noise."""
    labels = LABEL_SETS[name]
    flags = dict(ht_mode=ht_mode, link_mode=link_mode, contiguous_only=contiguous_only)
    rng = np.random.default_rng(17)
    longest, nonempty, gapped = 0, 0, 0
    for trial in range(150):
        n = 1 + trial % 6
        cells = random_cells(rng, labels, n, (0.15, 0.3, 0.5)[trial % 3])
        got = labels.decode(n, cells, **flags)
        want = reference_decode(labels, n, cells, **flags)
        assert got == want, (n, cells.tolist())
        nonempty += bool(want)
        longest = max([longest, *(len(e.indices) for e in want)])
        gapped += any(not e.is_contiguous for e in want)
    # Not vacuous: most grids decode to something, paths run long, and paths skip characters
    # wherever the mode allows it.
    assert nonempty >= 75 and longest >= 4
    assert (gapped > 0) == (labels.scheme != "ht_only" and not contiguous_only)


@pytest.mark.parametrize("max_paths", [1, 2, 3, 5])
@pytest.mark.parametrize("name", ["crener/both", "crener/thc_only", "w2ner"])
def test_max_paths_keeps_the_first_paths_in_depth_first_order(name, max_paths):
    """On dense random grids (n = 6, up to 16 paths per head-tail pair), the paths that survive
    ``max_paths`` are the first ones in depth-first order, for every type of the pair."""
    labels = LABEL_SETS[name]
    rng = np.random.default_rng(max_paths)
    capped_pairs = 0
    for _ in range(60):
        cells = random_cells(rng, labels, 6, 0.7)
        link = "or" if labels.scheme == "crener" else "and"
        got = labels.decode(6, cells, link_mode=link, max_paths=max_paths)
        assert got == reference_decode(labels, 6, cells, link_mode=link, max_paths=max_paths)
        full = reference_decode(labels, 6, cells, link_mode=link)
        assert got <= full
        capped_pairs += len(full) > len(got)
    assert capped_pairs >= 30  # the cap really bites


@pytest.mark.parametrize("max_entities", [1, 4, 10, 30])
def test_max_entities_stops_after_the_pair_that_reaches_it(max_entities):
    """``max_entities``: head-tail pairs in (h, t) order, none started once the cap is reached;
    so at least min(cap, all) entities and whole pairs only."""
    labels = LABEL_SETS["crener/both"]
    rng = np.random.default_rng(3)
    for trial in range(60):
        n = 4 + trial % 3
        cells = random_cells(rng, labels, n, 0.5)
        got = labels.decode(n, cells, link_mode="or", max_entities=max_entities)
        assert got == reference_decode(labels, n, cells, link_mode="or", max_entities=max_entities)
        full = labels.decode(n, cells, link_mode="or")
        assert len(got) >= min(max_entities, len(full)) and got <= full


def complete_grid_logits(task: GridTask, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Logits (1, n, n, L): +5 on every NNC, most PNC, THC-NAME on every pair, HTC-NAME or
    HTC-ORG on some pairs, -5 elsewhere; and those positive cells."""
    ls = task.labels
    cells = [(m, k, ls.nnc) for m in range(n) for k in range(m + 1, n)]
    cells += [(k, m, ls.pnc) for m in range(n) for k in range(m + 1, n) if rng.random() < 0.8]
    cells += [(t, h, ls.thc("NAME")) for h in range(n) for t in range(h, n)]
    cells += [
        (h, t, ls.htc(str(rng.choice(["NAME", "ORG"]))))
        for h in range(n)
        for t in range(h, n)
        if rng.random() < 0.3
    ]
    cells = np.array(cells, dtype=np.int32)
    logits = torch.full((1, n, n, task.num_labels), -5.0)
    logits[0, cells[:, 0], cells[:, 1], cells[:, 2]] = 5.0
    return logits, cells


@pytest.mark.parametrize(
    "overrides",
    [{}, {"max_paths": 3}, {"link_mode": "or"}, {"ht_mode": "intersect"}, {"contiguous_only": True}],
    ids=["default", "max_paths3", "or", "intersect", "contiguous"],
)
def test_task_decode_uses_the_config_flags_and_the_per_sentence_entity_cap(overrides):
    """GridTask.decode passes the model config's decoder flags and max_paths, and caps each
    sentence at MAX_ENTITIES_PER_CHAR * n + 100 entities: on a 12-character complete graph
    (2^10 paths between the ends) the result is the reference with exactly that cap."""
    cfg = ModelConfig(**overrides)
    task = GridTask(cfg, TYPES)
    n = 12
    logits, cells = complete_grid_logits(task, n, np.random.default_rng(0))
    batch = collate([Example(0, np.zeros(n + 2, dtype=np.int64), np.empty((0, 3), np.int32), n)], "none", 1)
    got = task.decode({"logits": logits}, batch)[0]
    flags = {k: getattr(cfg, k) for k in ("ht_mode", "link_mode", "contiguous_only", "max_paths")}
    cap = MAX_ENTITIES_PER_CHAR * n + 100
    assert got == reference_decode(task.labels, n, cells, **flags, max_entities=cap)
    assert len(got) >= 20
    uncapped = reference_decode(task.labels, n, cells, **flags)
    if not overrides:  # the default decoder really meets the cap here
        assert cap <= len(got) < len(uncapped)


# =========================================================================== 3. switches


def test_checkpoint_rounds_gives_the_same_forward_and_gradients(tiny_encoder, monkeypatch):
    """runtime.checkpoint_rounds recomputes each conv round in backward with the RNG state
    restored: with dropout active and the same seed, logits, loss and every gradient equal
    those of the plain model (the flag is left out of the run key for that reason)."""
    task, model, tok = tiny_model(tiny_encoder)  # smoke profile: conv dropout 0.5, all dropouts on
    assert model.cfg.conv_dropout > 0 and model.cfg.rounds >= 2
    calls = []
    real = crener_model.checkpoint
    monkeypatch.setattr(crener_model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    examples = build_split("x", MIXED[:4], 64, task, tok).examples
    for e, s in zip(examples, MIXED[:4]):
        e.targets = task.featurize(s.entities, len(s))
    batch = collate(examples, task.target, task.num_labels)
    model.train()

    def run(flag: bool, seed: int = 11, above: int = 0):
        model.checkpoint_rounds, model.checkpoint_above = flag, above  # runtime fields, read per batch
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = model(batch)["logits"]
        task.loss({"logits": out}, batch)["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    plain, g_plain = run(False)
    assert calls == []
    ckpt, g_ckpt = run(True)
    assert len(calls) == model.cfg.rounds
    other, _ = run(False, seed=12)
    assert not torch.allclose(plain, other)  # dropout is really active
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    assert g_ckpt.keys() == g_plain.keys() and any(k.startswith("grid.") for k in g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # runtime.checkpoint_above: only batches longer than it are checkpointed.
    n = batch.grid_mask.size(1)
    calls.clear()
    run(False, above=n)
    assert calls == []
    long_ckpt, g_long = run(False, above=n - 1)
    assert len(calls) == model.cfg.rounds
    torch.testing.assert_close(long_ckpt, plain, rtol=0, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_long[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


# Twelve distinct test sentences: the fixture's six, and the same with one character in front.
TEST_SENTENCES = [
    *SENTENCES,
    *(Sentence(("新", *s.chars), tuple(e.shifted(1) for e in s.entities)) for s in SENTENCES),
]
TEST_LIMIT = 4
# The documented sample: 4 of the 12 indices drawn with seed 0 whatever the run's seed, in file order.
EXPECTED_SAMPLE = sorted(random.Random(0).sample(range(len(TEST_SENTENCES)), TEST_LIMIT))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims-data")
    write_bmes(root / "resume" / "train.char.bmes", SENTENCES)
    write_bmes(root / "resume" / "dev.char.bmes", SENTENCES)
    write_bmes(root / "resume" / "test.char.bmes", TEST_SENTENCES)
    write_bmes(root / "msra" / "train.char.bmes", SENTENCES)  # MSRA has no dev: lineage dev = test
    write_bmes(root / "msra" / "test.char.bmes", TEST_SENTENCES)
    return root


def test_test_limit_is_a_fixed_sample_in_file_order(data_root):
    """data.test_limit cuts test to that many sentences: the sample drawn with seed 0 whatever
    the run's seed (so every run of a profile is scored on the same sentences), in file order;
    train and dev are not touched, and under MSRA's lineage protocol dev is that same sample."""
    assert list(range(TEST_LIMIT)) != EXPECTED_SAMPLE  # a sample, not the first sentences
    whole = load_dataset(DataConfig(dataset="resume"), data_root=str(data_root))
    assert whole.test == TEST_SENTENCES
    for seed in (0, 5):
        cut = load_dataset(
            DataConfig(dataset="resume", test_limit=TEST_LIMIT), seed=seed, data_root=str(data_root)
        )
        assert cut.test == [TEST_SENTENCES[i] for i in EXPECTED_SAMPLE]
        assert cut.dev == whole.dev and cut.train == whole.train
    msra = load_dataset(DataConfig(dataset="msra", test_limit=TEST_LIMIT), seed=3, data_root=str(data_root))
    assert msra.dev_is_test and msra.test == msra.dev == [TEST_SENTENCES[i] for i in EXPECTED_SAMPLE]


class StartInfo:
    def __init__(self):
        self.info = None

    def on_start(self, info):
        self.info = info


def counted_fit(cfg, workdir, callback=None):
    """fit(), and the number of optimiser steps it took (a global optimizer step hook)."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        summary = fit(cfg, workdir, callback=callback)
    finally:
        handle.remove()
    return summary, len(steps)


def fit_cfg(data_root, **overrides):
    base = {
        "runtime.data_root": str(data_root), "data.train_limit": 0, "data.eval_limit": 0, "data.test_limit": 0,
        # 60 cells: every training sentence (7 to 11 characters) is a batch of its own, 6 an epoch.
        "train.max_cells": 60,
    }  # fmt: skip
    return run_cfg(**{**base, **overrides})


def test_max_steps_bounds_the_optimiser_steps_of_every_epoch(data_root, tmp_path):
    """train.max_steps: an epoch takes exactly min(max_steps, its batches) optimiser steps; and a
    fit with data.test_limit scores and writes exactly the fixed test sample."""
    lengths = [len(s) for s in SENTENCES]
    assert len(make_batches(lengths, max_cells=60)) == len(SENTENCES)
    rec = StartInfo()
    cfg = fit_cfg(data_root, **{"train.epochs": 2, "train.max_steps": 2, "data.test_limit": TEST_LIMIT})
    summary, steps = counted_fit(cfg, tmp_path / "capped", rec)
    assert steps == 2 * 2
    assert len(json.loads((tmp_path / "capped" / "history.json").read_text())) == 2
    # test_limit in a real run: the sample above, in file order.
    assert rec.info["test_sentences"] == TEST_LIMIT
    rows = [
        json.loads(x) for x in (tmp_path / "capped" / "predictions" / "test.jsonl").read_text().splitlines()
    ]
    assert [r["text"] for r in rows] == [TEST_SENTENCES[i].text for i in EXPECTED_SAMPLE]
    # A cap above the batch count takes every batch once, no more.
    _, steps = counted_fit(
        fit_cfg(data_root, **{"train.epochs": 1, "train.max_steps": 50}), tmp_path / "loose"
    )
    assert steps == len(SENTENCES)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("max_cells", [1, 50, 400, 2_000, 20_000])
def test_cell_budget_batches(max_cells, shuffle):
    """make_batches with max_cells: every batch holds B * N_max^2 <= max_cells cells or is a
    single sentence, and every index appears exactly once."""
    rng = np.random.default_rng(max_cells)
    for trial in range(20):
        lengths = rng.integers(1, 120, size=int(rng.integers(1, 200))).tolist()
        batches = make_batches(
            lengths, max_cells=max_cells, shuffle=shuffle, rng=np.random.default_rng(trial)
        )
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert b, "empty batch"
            cells = len(b) * max(lengths[i] for i in b) ** 2
            assert cells <= max_cells or len(b) == 1, (b, cells)
        two = sorted(lengths)[:2]
        if len(two) == 2 and 2 * two[1] ** 2 <= max_cells:  # the two shortest fit together
            assert len(batches) < len(lengths)


@pytest.mark.parametrize("guard", [0, 5_000, 200_000])
def test_sorted_batches_of_twelve_with_a_memory_guard(guard, caplog):
    """The paper's recipe: batches of exactly 12 consecutive sentences of length-sorted order (the
    last may be shorter); the guard splits only the batches above it, into consecutive pieces
    within it (or single sentences), and says how many it split."""
    rng = np.random.default_rng(guard)
    lengths = rng.integers(1, 120, size=500).tolist()  # 12 * 119^2 < 200k: that guard splits nothing
    with caplog.at_level("INFO", logger="crener.data.batching"):
        batches = make_batches(lengths, batch_size=12, max_cells=guard, sorted_fixed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    order = [i for b in batches for i in b]  # unshuffled: the batches in sorted order
    assert [lengths[i] for i in order] == sorted(lengths)
    buckets = [order[k : k + 12] for k in range(0, len(order), 12)]
    pieces = iter(batches)
    split = 0
    for bucket in buckets:  # consume the batches that make up each 12-sentence bucket
        got: list[int] = []
        parts = 0
        while len(got) < len(bucket):
            got += next(pieces)
            parts += 1
        assert got == bucket
        if guard and len(bucket) * lengths[bucket[-1]] ** 2 > guard:
            split += 1
            assert parts > 1
        else:
            assert parts == 1
    assert next(pieces, None) is None
    assert (split > 0) == (guard == 5_000)
    if split:
        assert f"{split} of {len(buckets)} batches of 12 sentences were split" in caplog.text
    else:
        assert "split" not in caplog.text
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) ** 2 <= (guard or 10**9) or len(b) == 1
    # Shuffled: the same sizes of buckets and guard pieces, in another order.
    mixed = make_batches(lengths, batch_size=12, max_cells=guard, shuffle=True, rng=np.random.default_rng(1),
                         sorted_fixed=True)  # fmt: skip
    assert sorted(i for b in mixed for i in b) == list(range(len(lengths)))
    assert mixed != batches and sorted(map(len, mixed)) == sorted(map(len, batches))


def test_the_paper_profile_is_the_papers_batches() -> None:
    from crener.data.batching import training_batches

    cfg = build_run_config(profile="paper", dataset="weibo").train
    assert (cfg.sorted_batches, cfg.batch_size) == (True, 12)
    lengths = list(range(1, 257)) * 3  # every length up to max_len: nothing reaches the guard
    batches = training_batches(lengths, cfg, np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [12] * 64
    assert build_run_config(profile="full").train.sorted_batches is False  # CPU: the cell budget


# --- relation enhancement against the equations ------------------------------------------------


def ref_layer_norm(z: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = z.mean()
    var = ((z - mean) ** 2).mean()
    return (z - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def ref_attention(mha: torch.nn.MultiheadAttention, queries, memory) -> list[torch.Tensor]:
    """Scaled dot-product multi-head attention, one query at a time, one head at a time, over
    the real positions only; heads concatenated, then the output projection."""
    d = mha.embed_dim
    heads = mha.num_heads
    dk = d // heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    wq, wk, wv = w[:d], w[d : 2 * d], w[2 * d :]
    bq, bk, bv = b[:d], b[d : 2 * d], b[2 * d :]
    keys = [wk @ m + bk for m in memory]
    values = [wv @ m + bv for m in memory]
    out = []
    for x in queries:
        q = wq @ x + bq
        per_head = []
        for h in range(heads):
            sl = slice(h * dk, (h + 1) * dk)
            scores = torch.stack([q[sl] @ k[sl] / math.sqrt(dk) for k in keys])
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            per_head.append(sum(a * v[sl] for a, v in zip(weights, values)))
        out.append(mha.out_proj.weight @ torch.cat(per_head) + mha.out_proj.bias)
    return out


def ref_enhancement(mod: RelationEnhancement, tf, lengths, s, o, s_base, o_base):
    """Eqs 11-15 for each sentence, each branch and each position (method.md §2.4)."""
    new_s, new_o = s.clone(), o.clone()
    for b, n in enumerate(lengths):
        for branch in ("s", "o"):
            # eq. 11: subject i -> max over its row (objects j); object j -> max over its column
            if branch == "s":
                pooled = [torch.stack([tf[b, i, j] for j in range(n)]).max(dim=0).values for i in range(n)]
                rec, out_lin, norm, prev, base, dest = mod.rec_s, mod.out_s, mod.norm_s, s, s_base, new_s
            else:
                pooled = [torch.stack([tf[b, i, j] for i in range(n)]).max(dim=0).values for j in range(n)]
                rec, out_lin, norm, prev, base, dest = mod.rec_o, mod.out_o, mod.norm_o, o, o_base, new_o
            h = [rec.weight @ p + rec.bias for p in pooled]
            a = ref_attention(mod.self_attn, h, h)  # eq. 12
            c = ref_attention(mod.cross_attn, a, [base[b, j] for j in range(n)])  # eq. 13
            for i in range(n):
                step = ref_gelu(out_lin.weight @ c[i] + out_lin.bias)  # eq. 14
                dest[b, i] = ref_layer_norm(prev[b, i] + step, norm)  # eq. 15
    return new_s, new_o


def test_relation_enhancement_matches_a_loop_reference_of_eqs_11_to_15():
    """RelationEnhancement (paper block) equals eqs 11-15 written out with loops: row/column max
    over real cells, recovery linears, shared self- then cross-attention (to the round-1
    projections H^s / H^o), Linear + GELU, residual on the round's input, LayerNorm."""
    torch.manual_seed(0)
    width, hidden, heads = 6, 8, 2
    mod = RelationEnhancement(width, hidden, heads, dropout=0.0).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mod.parameters():  # every weight random, LayerNorm affine included
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    lengths = [5, 3]
    b, n = len(lengths), max(lengths)
    lt = torch.tensor(lengths)
    tf = torch.randn(b, n, n, width, generator=gen, dtype=torch.float64)
    s, o, s_base, o_base = (torch.randn(b, n, hidden, generator=gen, dtype=torch.float64) for _ in range(4))
    with torch.no_grad():
        got_s, got_o = mod(tf, grid_mask(lt, n), char_mask(lt, n), s, o, s_base, o_base)
        want_s, want_o = ref_enhancement(mod, tf, lengths, s, o, s_base, o_base)
    for k, m in enumerate(lengths):  # padded positions are not defined by the equations
        torch.testing.assert_close(got_s[k, :m], want_s[k, :m], rtol=0, atol=1e-5)
        torch.testing.assert_close(got_o[k, :m], want_o[k, :m], rtol=0, atol=1e-5)
    assert not torch.allclose(got_s[0, :5], s[0, :5], atol=1e-2)  # the module changes its input


@pytest.mark.parametrize("training", [False, True])
def test_sequence_first_attention_equals_the_batch_first_module(training):
    """RelationEnhancement._mha (contiguous sequence-first inputs) is nn.MultiheadAttention with
    batch_first=True and the same parameters: the same outputs, gradients and dropout draws."""
    torch.manual_seed(0)
    seq_first = torch.nn.MultiheadAttention(8, 2, dropout=0.3).train(training)
    batch_first = torch.nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True).train(training)
    batch_first.load_state_dict(seq_first.state_dict())
    x, mem = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 5, 8)
    pad = ~char_mask(torch.tensor([5, 3, 1]), 5)
    for kv in (x, mem):  # self- and cross-attention
        torch.manual_seed(1)
        got = RelationEnhancement._mha(seq_first, x, kv, pad)
        (g_got,) = torch.autograd.grad(got.square().sum(), x)
        torch.manual_seed(1)
        want = batch_first(x, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        (g_want,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-5)


# --- padding invariance of every variant -------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_padding_invariant(variant, tiny_encoder):
    """In eval mode a sentence's logits are the same alone and padded in a batch with a longer
    one, for all nine Table 6 variants (the evaluation budget relies on it)."""
    assert len(VARIANTS) == 9
    task, model, tok = tiny_model(tiny_encoder, variant)
    model.eval()
    short, long_ = MIXED[0], MIXED[1]  # 7 and 40 characters
    examples = build_split("x", [short, long_], 64, task, tok).examples
    n = len(short)
    with torch.no_grad():
        alone = model(collate(examples[:1], "none", task.num_labels))["logits"][0]
        batched = model(collate(examples, "none", task.num_labels))["logits"]
    assert batched.shape[1] == len(long_) > n
    torch.testing.assert_close(batched[0, :n, :n], alone, atol=2e-5, rtol=1e-4)
    assert alone.abs().max() > 1e-3  # not an all-zero output
