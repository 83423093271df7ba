"""Sequence labelling for the non-grid baselines: BIOES tags, their conversion, and the task.

Tag layout for entity types ``(t_1, .., t_M)`` (in the order given, i.e. the dataset's sorted
types): index 0 is ``O``, then ``B-t I-t E-t S-t`` for each type, so T = 1 + 4M tags.

:func:`entities_to_tags` accepts only contiguous, non-overlapping entities (all gold entities
of the four datasets); anything else cannot be written as one BIOES sequence and raises.
:func:`tags_to_entities` reads *any* tag sequence with the conlleval "lenient" rule that the
CoNLL reader uses for malformed gold spans, through the reader's own function
(:func:`crener.data.readers.lenient_chunks`):

* a chunk **starts** at ``B``/``S``, or at an ``I``/``E`` when no chunk is open or the type changes;
* a chunk **ends** at ``E``/``S``, before ``O``, before a type change, before a ``B``/``S``, or at
  the end of the sentence.

So a predicted ``I-LOC I-LOC`` is one LOC entity and ``B-LOC I-LOC O`` is one LOC entity too;
on well-formed sequences the rule is exact and ``tags_to_entities(entities_to_tags(E, n)) == E``.
A CRF with BIOES constraints (:func:`baselines.crf.bioes_constraints`) only ever emits
well-formed sequences; softmax argmax can emit malformed ones, and this rule decides them.

:class:`SequenceTask` implements :class:`crener.tasks.Task` for a model whose output dict has
``"logits"`` (B, N, T) per-character tag scores and, for CRF decoding, the constrained CRF
potentials ``"crf_start"`` (T,), ``"crf_trans"`` (T, T), ``"crf_end"`` (T,)
(:meth:`baselines.crf.CRF.potentials`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.crf import CRF, bioes_constraints, neg_log_likelihood, viterbi
from crener.data.batching import Batch
from crener.data.readers import lenient_chunks
from crener.data.schema import Entity

OUTSIDE = "O"
PREFIXES = ("B", "I", "E", "S")  # order of the four tags of each type
IGNORE_INDEX = -100  # collate's tag padding value
DECODERS = ("softmax", "crf")


def bioes_names(types: Sequence[str]) -> tuple[str, ...]:
    """``("O", "B-t1", "I-t1", "E-t1", "S-t1", "B-t2", ...)``."""
    if not types or len(set(types)) != len(types):
        raise ValueError(f"entity types must be distinct and non-empty: {tuple(types)}")
    return (OUTSIDE, *(f"{p}-{t}" for t in types for p in PREFIXES))


def entities_to_tags(entities: Iterable[Entity], n: int) -> list[str]:
    """BIOES tag strings of a sentence of ``n`` characters.

    Raises ``ValueError`` for a non-contiguous entity, one outside the sentence, or two that
    overlap (including the same span with two types).
    """
    tags = [OUTSIDE] * n
    for e in sorted(entities):
        if not e.is_contiguous:
            raise ValueError(f"BIOES cannot encode the non-contiguous entity {e}")
        if e.end > n:
            raise ValueError(f"entity {e} lies outside a sentence of {n} characters")
        if any(tags[i] != OUTSIDE for i in e.indices):
            raise ValueError(f"entity {e} overlaps another entity; BIOES cannot encode overlaps")
        if len(e.indices) == 1:
            tags[e.start] = f"S-{e.type}"
            continue
        tags[e.start] = f"B-{e.type}"
        for i in e.indices[1:-1]:
            tags[i] = f"I-{e.type}"
        tags[e.end - 1] = f"E-{e.type}"
    return tags


def tags_to_entities(tags: Sequence[str]) -> set[Entity]:
    """Entities of a BIOES tag sequence under the lenient rule of the module docstring, applied by
    the CoNLL reader's own function (:func:`crener.data.readers.lenient_chunks`)."""
    info: dict[str, tuple[str, str] | None] = {}
    for tag in set(tags) - {OUTSIDE}:
        prefix, sep, type_ = tag.partition("-")
        if not sep or prefix not in PREFIXES or not type_:
            raise ValueError(f"not a BIOES tag: {tag!r}")
        info[tag] = (prefix, type_)
    positions = [i for i, tag in enumerate(tags) if tag != OUTSIDE]
    return {Entity.span(s, e, t) for s, e, t, _ in lenient_chunks(positions, tags, info, bio=False)}


class TagSet:
    """The BIOES tags of one dataset, as ids (see the module docstring for the layout)."""

    def __init__(self, types: Sequence[str]):
        self.types = tuple(types)
        self.names = bioes_names(self.types)
        self._ids = {name: k for k, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, entities: Iterable[Entity], n: int) -> np.ndarray:
        try:
            return np.array([self._ids[t] for t in entities_to_tags(entities, n)], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"entity type {exc.args[0][2:]!r} is not one of {self.types}") from None

    def decode(self, ids: Iterable[int]) -> set[Entity]:
        return tags_to_entities([self.names[int(k)] for k in ids])

    def constraints(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Allowed (start, transition, end) masks for a CRF over these tags."""
        return bioes_constraints(self.names)

    def build_crf(self, constrained: bool = True) -> CRF:
        return CRF(len(self.names), self.constraints() if constrained else None)


class SequenceTask:
    """:class:`crener.tasks.Task` for per-character BIOES tagging.

    ``decoder="softmax"``: token-level cross-entropy (mean over real characters), argmax decoding.
    ``decoder="crf"``: CRF negative log-likelihood (mean over sentences), Viterbi decoding; the
    model must return the CRF potentials (module docstring).
    """

    target = "tags"

    def __init__(self, types: Sequence[str], decoder: str = "softmax"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {', '.join(DECODERS)}")
        self.tags = TagSet(types)
        self.decoder = decoder
        self.num_labels = len(self.tags)
        self.names = self.tags.names

    def featurize(self, entities: Sequence[Entity], n: int) -> np.ndarray:
        return self.tags.encode(entities, n)  # (n,) tag ids

    def output_prior(self, targets: Sequence[np.ndarray], lengths: Sequence[int]) -> torch.Tensor:
        """Per tag, its log frequency over the training characters (whose softmax is that frequency):
        the start of a softmax tagger's output bias (``model.prior_bias``), as
        :meth:`crener.tasks.GridTask.output_prior` is a grid model's. A tag never seen counts half."""
        counts = np.zeros(self.num_labels, dtype=np.float64)
        for t, n in zip(targets, lengths):
            counts += np.bincount(np.asarray(t)[:n], minlength=self.num_labels)
        counts = np.maximum(counts, 0.5)
        return torch.from_numpy(np.log(counts / counts.sum())).float()

    @staticmethod
    def _potentials(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return {"start": outputs["crf_start"], "trans": outputs["crf_trans"], "end": outputs["crf_end"]}
        except KeyError:
            raise ValueError("decoder=crf needs the model outputs crf_start, crf_trans and crf_end") from None

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        logits = outputs["logits"]  # (B, N, T)
        if self.decoder == "crf":
            nll = neg_log_likelihood(logits, batch.targets, batch.char_mask, **self._potentials(outputs))
            return {"loss": nll.mean()}
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
        )
        return {"loss": loss}

    def decode(self, outputs: dict[str, torch.Tensor], batch: Batch) -> list[set[Entity]]:
        logits = outputs["logits"]
        if self.decoder == "crf":
            paths = viterbi(logits, batch.char_mask, **self._potentials(outputs))[0]
        else:
            paths = logits.argmax(dim=-1)
        rows = paths.cpu().numpy()  # one device->host copy per batch
        return [self.tags.decode(row[:n]) for row, n in zip(rows, batch.lengths.tolist())]
