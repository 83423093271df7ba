"""The CRF against brute-force enumeration over every tag sequence (short, padded batches)."""

from __future__ import annotations

import itertools

import pytest
import torch

from baselines.crf import (
    CRF,
    DISALLOWED,
    bioes_constraints,
    log_partition,
    neg_log_likelihood,
    path_score,
    viterbi,
)
from baselines.sequence import bioes_names, entities_to_tags, tags_to_entities


def _random_problem(seed: int, b: int = 4, n: int = 5, t: int = 4):
    g = torch.Generator().manual_seed(seed)
    em = torch.randn(b, n, t, generator=g, dtype=torch.float64)
    start = torch.randn(t, generator=g, dtype=torch.float64)
    trans = torch.randn(t, t, generator=g, dtype=torch.float64)
    end = torch.randn(t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n  # one full-length row so N is really n
    mask = torch.arange(n)[None, :] < lengths[:, None]
    return em, mask, start, trans, end, lengths


def _score(em_row, path, start, trans, end) -> float:
    s = start[path[0]] + em_row[0, path[0]]
    for k in range(1, len(path)):
        s = s + trans[path[k - 1], path[k]] + em_row[k, path[k]]
    return float(s + end[path[-1]])


def _brute(em, lengths, start, trans, end):
    log_z, best, best_path = [], [], []
    t = em.size(-1)
    for row, n in zip(em, lengths.tolist()):
        scores = {p: _score(row, p, start, trans, end) for p in itertools.product(range(t), repeat=n)}
        log_z.append(torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0).item())
        path = max(scores, key=scores.get)
        best.append(scores[path])
        best_path.append(list(path))
    return log_z, best, best_path


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("t", [2, 3, 4])
def test_forward_and_viterbi_equal_brute_force(seed: int, t: int) -> None:
    em, mask, start, trans, end, lengths = _random_problem(seed, t=t)
    log_z, best, best_path = _brute(em, lengths, start, trans, end)
    assert log_partition(em, mask, start, trans, end).tolist() == pytest.approx(log_z, abs=1e-4)
    paths, scores = viterbi(em, mask, start, trans, end)
    assert scores.tolist() == pytest.approx(best, abs=1e-4)
    for row, n, ref in zip(paths.tolist(), lengths.tolist(), best_path):
        assert row[:n] == ref
        assert all(v == -100 for v in row[n:])


def test_gold_score_and_nll_on_padded_batch() -> None:
    em, mask, start, trans, end, lengths = _random_problem(11, t=3)
    g = torch.Generator().manual_seed(3)
    tags = torch.randint(0, 3, mask.shape, generator=g).masked_fill(~mask, -100)
    got = path_score(em, tags, mask, start, trans, end)
    ref = [_score(em[b], tags[b, :n].tolist(), start, trans, end) for b, n in enumerate(lengths.tolist())]
    assert got.tolist() == pytest.approx(ref, abs=1e-4)
    nll = neg_log_likelihood(em, tags, mask, start, trans, end)
    assert (nll >= -1e-6).all()
    # Probabilities of all paths of one sentence sum to one.
    n0 = int(lengths[0])
    total = 0.0
    for p in itertools.product(range(3), repeat=n0):
        total += torch.exp(
            torch.tensor(_score(em[0], p, start, trans, end)) - log_partition(em, mask, start, trans, end)[0]
        ).item()
    assert total == pytest.approx(1.0, abs=1e-6)


def test_padding_does_not_change_results() -> None:
    em, mask, start, trans, end, lengths = _random_problem(5, t=4)
    alone = [
        viterbi(em[b : b + 1, :n], mask[b : b + 1, :n], start, trans, end)
        for b, n in enumerate(lengths.tolist())
    ]
    batched_paths, batched_scores = viterbi(em, mask, start, trans, end)
    log_z = log_partition(em, mask, start, trans, end)
    for b, n in enumerate(lengths.tolist()):
        assert batched_paths[b, :n].tolist() == alone[b][0][0].tolist()
        assert batched_scores[b].item() == pytest.approx(alone[b][1][0].item())
        assert log_z[b].item() == pytest.approx(
            log_partition(em[b : b + 1, :n], mask[b : b + 1, :n], start, trans, end)[0].item()
        )


def test_bioes_constraints_allow_exactly_the_well_formed_sequences() -> None:
    names = bioes_names(["LOC", "PER"])  # 9 tags
    allowed_start, allowed_trans, allowed_end = bioes_constraints(names)
    assert [names[i] for i in range(len(names)) if allowed_start[i]] == [
        "O",
        "B-LOC",
        "S-LOC",
        "B-PER",
        "S-PER",
    ]
    assert [names[i] for i in range(len(names)) if allowed_end[i]] == [
        "O",
        "E-LOC",
        "S-LOC",
        "E-PER",
        "S-PER",
    ]
    ix = {n: i for i, n in enumerate(names)}
    assert allowed_trans[ix["B-LOC"], ix["I-LOC"]] and not allowed_trans[ix["B-LOC"], ix["I-PER"]]
    assert allowed_trans[ix["E-LOC"], ix["B-PER"]] and not allowed_trans[ix["O"], ix["I-LOC"]]
    assert not allowed_trans[ix["I-LOC"], ix["O"]] and allowed_trans[ix["S-PER"], ix["S-LOC"]]


def test_constrained_viterbi_emits_only_well_formed_sequences() -> None:
    names = bioes_names(["LOC", "PER"])
    crf = CRF(len(names), bioes_constraints(names))
    g = torch.Generator().manual_seed(0)
    em = torch.randn(16, 7, len(names), generator=g) * 5
    mask = torch.ones(16, 7, dtype=torch.bool)
    mask[8:, 4:] = False
    paths = crf.decode(em, mask)
    allowed_start, allowed_trans, allowed_end = bioes_constraints(names)
    for row, m in zip(paths.tolist(), mask.sum(1).tolist()):
        seq = row[:m]
        assert allowed_start[seq[0]] and allowed_end[seq[-1]]
        assert all(allowed_trans[a, b] for a, b in zip(seq, seq[1:]))
        # Well formed: re-encoding the decoded entities gives the same tags back.
        tags = [names[k] for k in seq]
        assert entities_to_tags(tags_to_entities(tags), len(tags)) == tags
    # A forbidden move costs DISALLOWED, finite, so gradients stay finite.
    loss = crf(em, paths.clamp(min=0), mask)
    loss.backward()
    assert torch.isfinite(crf.trans.grad).all()
    assert crf.potentials()["trans"].min() <= DISALLOWED + 1


def test_nll_gradient_matches_marginals() -> None:
    """d logZ / d emissions = posterior marginals; checked against brute force on one sentence."""
    em, mask, start, trans, end, lengths = _random_problem(2, b=1, n=4, t=3)
    em.requires_grad_(True)
    log_partition(em, mask, start, trans, end).sum().backward()
    marg = torch.zeros(4, 3, dtype=torch.float64)
    log_z = log_partition(em.detach(), mask, start, trans, end)[0]
    for p in itertools.product(range(3), repeat=4):
        w = torch.exp(torch.tensor(_score(em.detach()[0], p, start, trans, end)) - log_z)
        for k, tag in enumerate(p):
            marg[k, tag] += w
    assert torch.allclose(em.grad[0], marg, atol=1e-6)
