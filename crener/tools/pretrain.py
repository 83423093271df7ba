"""`crener pretrain`: a compact Chinese character encoder, pretrained here, in the Hugging Face BERT layout.

No model hub is reachable from the machines this suite runs on, so the default encoder is built by
the project itself: a small BERT trained with masked language modelling (MLM) on the *training*
splits of the registered datasets (never dev or test text; any sentence that also occurs in a dev or
test split is dropped) plus any unlabelled text the user adds. The result is written with
``save_pretrained`` (config, safetensors weights, tokenizer files), so it loads through the same
``from_pretrained`` call as bert-base-chinese, together with a model card saying how it was built and
the masked-LM head beside it (``mlm_head.safetensors``), so ``--init-from`` continues the head too.

Choices, each a documented default:

- **Vocabulary**: every character of the corpus and every token of the People's Daily 2014 character
  vectors (``shared/pretrained``), plus BERT's special tokens, in a fixed order (specials, then sorted
  characters), so the same inputs always give the same ids.
- **[UNK] is trained**: each character occurrence is replaced by ``[UNK]`` in the *input* with
  probability ``alpha / (alpha + count)`` (rare characters most often; "word dropout" of Kiperwasser and
  Goldberg 2016); the target stays the character. Fine-tuning applies the same rule
  (``train.unk_alpha``), so an unseen test character meets a vector that has been trained.
- **Initialisation**: characters with a People's Daily vector start from it, mapped to the encoder's
  width by a fixed random *orthogonal* projection (50 -> d). An orthogonal map keeps every inner product
  and hence the vectors' neighbourhoods, and spreads them over all d dimensions; a zero-padded copy would
  leave d - 50 dimensions empty for the first layer norm to amplify. The rows are rescaled to the norm of
  BERT's own random initialisation so they do not drown the position embeddings. Other characters
  keep BERT's random initialisation.
- **Determinism and resumption**: the data order of an epoch is a function of (seed, epoch) and the
  masks of a step a function of (seed, step); the model, optimiser, schedule and dropout RNG are saved
  every ``save_every`` steps, atomically, so a killed run continues to the same weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import lzma
import shlex
import struct
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crener.checkpoint import read_state, save_checkpoint
from crener.config import MAX_LEN, MIN_LEN
from crener.data.digest import file_digest
from crener.device import autocast, trim_heap
from crener.encoder import (  # the embedded encoder's layout, and the vectors its embeddings may start from
    SPECIAL_TOKENS,
    replace_with_unk,
    unk_rates,
    vectors_path,
)
from crener.errors import CheckpointError, CrenerError, DataError
from crener.workspace import git_commit

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = range(len(SPECIAL_TOKENS))
DEFAULT_DATASETS = ("weibo", "resume", "ontonotes4", "msra")
# word2vec tokens of the People's Daily file that are not characters of text.
VECTOR_SPECIALS = {"</s>": None, "<UNK>": "[UNK]"}
# Steps between giving the C heap's free pages back (crener.device.trim_heap: without it the
# resident memory of a long build grows with the fragmentation of variable-shape batches).
TRIM_EVERY = 25
HELD_OUT = 500  # corpus pieces kept aside to measure masked-token accuracy (never trained on)
CHECKPOINT_NAME = "pretrain_state.pt"
STATE_VERSION = 1
# The masked-LM head (BertForMaskedLM's ``cls``), written beside the encoder: ``save_pretrained`` of the
# BertModel leaves it out, and a continuation that starts it fresh spends its first steps relearning it.
# The decoder's weight is the word embeddings and its bias is ``cls.predictions.bias`` (both tied), so
# the transform, its LayerNorm and that bias (one entry a vocabulary row, in the folder's token order)
# are the whole head.
MLM_HEAD_NAME = "mlm_head.safetensors"
MLM_HEAD_BIAS = "cls.predictions.bias"
MLM_HEAD_TRANSFORM = (
    "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
)  # fmt: skip
# Input licences, written into the model card (from shared/data/README.md and shared/pretrained/README.md).
LICENCES = {
    "weibo": "annotations CC BY-SA 3.0 (golden-horse); messages under Weibo's terms of service",
    "resume": "no licence stated; customarily used for research (Lattice LSTM release)",
    "ontonotes4": "LDC user agreement (LDC2011T03): use only with an LDC licence; not freely redistributable",
    "msra": "SIGHAN 2006 bakeoff data, research use; 'no known license' in common catalogues",
    "vectors": "People's Daily 2014 character vectors from MeteorYee/LSTM-CNN-CWS (Apache-2.0 repository); "
    "research use",
}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a pretrained encoder; the card records all of it."""

    out: str  # output directory (Hugging Face layout + README.md card)
    datasets: tuple[str, ...] = DEFAULT_DATASETS  # training splits used as text
    text: tuple[str, ...] = ()  # extra unlabelled corpora, one sentence a line (UTF-8; plain or .xz)
    # Share of each --text file's lines used, spread evenly over the file (the text ablation's
    # "quarter of the corpus" is 0.25): line i is kept when floor((i + 1) f) > floor(i f).
    text_fraction: float = 1.0
    # Times each training split's pieces are read an epoch, so a mix with --text can give the
    # in-domain text a larger share of the steps than of the characters (1: every piece once).
    datasets_repeat: int = 1
    data_root: str | None = None  # None: $CRENER_DATA, then ../shared/data
    # Starting vectors of the character embeddings: sources joined by "+" (people = default: the
    # People's Daily 50-d file in shared/pretrained; wiki: simplechinese's Wikipedia 64-d; lac:
    # jieba's LAC-small 128-d; or a word2vec text file's path); None: random init.
    vectors: str | None = "default"
    hidden: int = 256  # encoder width
    layers: int = 4  # Transformer layers
    heads: int = 4  # attention heads
    ff: int = 1024  # feed-forward width
    max_len: int = 128  # corpus sentences are cut into pieces of at most this many characters
    batch_tokens: int = 4096  # padded tokens per batch (length-bucketed)
    steps: int = 6000  # optimiser steps
    lr: float = 4e-4  # peak learning rate (AdamW)
    warmup: float = 0.06  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    mask_rate: float = 0.15  # share of characters chosen for prediction (80/10/10 mask/random/keep)
    unk_alpha: float = 0.25  # input [UNK] replacement: probability alpha / (alpha + count)
    seed: int = 0
    # Continue from an encoder instead of a fresh initialisation (a shipped name such as crener-char,
    # or a folder in the BERT layout): its weights start every row and layer they share by name and
    # token; characters new to its vocabulary start from ``vectors``. Its width and depth are kept.
    # Its masked-LM head (``mlm_head.safetensors``) continues too where the folder has one.
    init_from: str | None = None
    # bf16 autocast for the forward pass (weights, optimiser and loss stay fp32). Part of the
    # identity: bf16 and fp32 give different weights. The CLI's "auto" (its default) becomes the
    # measured answer of crener.device.bf16_pays, so the card records a bool.
    bf16: bool = False
    save_every: int = 250  # steps between resumable checkpoints
    log_every: int = 50  # steps between logged metrics

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "ff", "save_every", "log_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise CrenerError(f"{flag} {getattr(self, name)}: must be a positive integer (>= 1)")
        if self.seed < 0:
            raise CrenerError(f"--seed {self.seed}: a seed must be >= 0")
        if not self.lr > 0 or not 0 <= self.warmup <= 1 or self.weight_decay < 0 or self.unk_alpha < 0:
            raise CrenerError(
                f"--lr {self.lr} must be > 0, --warmup {self.warmup} in [0, 1], "
                f"--weight-decay {self.weight_decay} and --unk-alpha {self.unk_alpha} >= 0"
            )
        if self.hidden % self.heads:
            raise CrenerError(f"--hidden {self.hidden} is not divisible by --heads {self.heads}")
        if not MIN_LEN <= self.max_len <= MAX_LEN:
            raise CrenerError(f"--max-len must be between {MIN_LEN} and {MAX_LEN} characters")
        # --steps 0 writes the initialised encoder untrained (the "vectors only" arm of an ablation).
        if self.steps < 0 or self.batch_tokens < self.max_len:
            raise CrenerError("--steps must be >= 0 and --batch-tokens at least --max-len")
        if not 0 < self.mask_rate < 1:
            raise CrenerError("--mask-rate must be in (0, 1)")
        if not 0 < self.text_fraction <= 1:
            raise CrenerError(f"--text-fraction {self.text_fraction}: must be in (0, 1]")
        if self.datasets_repeat < 1:
            raise CrenerError(f"--datasets-repeat {self.datasets_repeat}: must be a positive integer (>= 1)")

    def identity(self) -> dict[str, Any]:
        """The fields that define the weights (not where they are written, nor logging cadence)."""
        out = asdict(self)
        for k in ("out", "data_root", "save_every", "log_every"):
            out.pop(k)
        # Fields added later leave the identities of earlier cards as they were at their defaults.
        defaults = {"bf16": False, "text_fraction": 1.0, "init_from": None, "datasets_repeat": 1}
        for k, default in defaults.items():
            if out[k] == default:
                out.pop(k)
        return out

    def command(self) -> str:
        """The ``crener pretrain`` command that builds these weights: a flag for every identity field
        off its default, and ``--bf16`` always (the CLI's default, auto, is the machine's answer). A
        build started by another command (``crener encoders``) records this on its card, so the card's
        rebuild line is a pretrain command and not the other command's arguments."""
        default = PretrainConfig(out=self.out).identity()
        words = ["crener", "pretrain", "--out", self.out]
        for name, value in self.identity().items():
            if name == "bf16" or value == default.get(name):
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, tuple):
                words += [flag, *value]
            else:
                words += [flag, "none" if value is None else str(value)]
        words += ["--bf16", "true" if self.bf16 else "false"]
        return " ".join(shlex.quote(w) for w in words)

    @classmethod
    def from_identity(cls, identity: dict[str, Any], out: str) -> PretrainConfig:
        """Inverse of :meth:`identity` (as a card's ``config`` stores it, lists for tuples)."""
        return cls(out=out, **{k: tuple(v) if isinstance(v, list) else v for k, v in identity.items()})


# ------------------------------------------------------------------------------------------ corpus


@dataclass
class Corpus:
    """Pieces of training text, the files they came from, and what was left out."""

    pieces: list[str]
    files: dict[str, str]  # label -> path of every input file
    held_out_text: set[str] = field(default_factory=set)  # dev/test sentences (never in pieces)
    dropped: int = 0  # sentences dropped because they occur in (or overlap) a dev or test split
    sentences: int = 0
    dev_text: dict[str, list[str]] = field(default_factory=dict)  # dataset -> its dev sentences
    text_lines: dict[str, int] = field(default_factory=dict)  # --text label -> lines read (kept or not)
    split_pieces: int = 0  # the first this many pieces come from the training splits, the rest from --text


def _cut(text: str, max_len: int) -> list[str]:
    return [text[i : i + max_len] for i in range(0, len(text), max_len)]


# Where a long line of unlabelled text may be cut: after a sentence or clause mark (full-width, as
# the news text writes them, and their ASCII forms).
BREAKS = frozenset("。！？；，、：…!?;,:")
OVERLAP_N = 10  # a --text line sharing this many consecutive characters with a dev/test sentence is dropped


def split_at_punctuation(text: str, max_len: int) -> list[str]:
    """``text`` in pieces of at most ``max_len`` characters, each cut after the last punctuation mark
    of its window; a window without one in its second half is cut at ``max_len`` (so no piece is
    shorter than half the length for want of a mark). Joining the pieces gives ``text`` back."""
    pieces = []
    while len(text) > max_len:
        cut = max((i + 1 for i in range(max_len // 2, max_len) if text[i] in BREAKS), default=max_len)
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line of a UTF-8 file, plain or ``.xz``, streamed.

    One rule for unlabelled text: a UTF-8 byte-order mark at the start is dropped, each line is
    stripped of surrounding whitespace, blank lines are skipped (they separate nothing here), and a
    line that is not UTF-8 stops the read with an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("text file not found" if not path.exists() else "not a file", str(path))
    opener = lzma.open if path.suffix == ".xz" else open
    seen = False
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"not UTF-8 ({exc.reason} at byte {exc.start})", str(path), lineno
                    ) from None
                if line:
                    seen = True
                    yield lineno, line
    except lzma.LZMAError as exc:
        raise DataError(f"not a readable .xz file ({exc})", str(path)) from None
    if not seen:
        raise DataError("text file has no non-blank line", str(path))


def read_text_file(path: str | Path) -> list[str]:
    """The non-blank lines of a text file (:func:`iter_text_lines`' rule)."""
    return [line for _, line in iter_text_lines(path)]


def ngrams(texts: Iterable[str], n: int = OVERLAP_N) -> set[str]:
    return {t[i : i + n] for t in texts for i in range(len(t) - n + 1)}


def overlaps(text: str, grams: set[str], n: int = OVERLAP_N) -> bool:
    return any(text[i : i + n] in grams for i in range(len(text) - n + 1))


def evenly_kept(index: int, fraction: float) -> bool:
    """Whether the ``index``-th line (0-based) is among an evenly spread ``fraction`` of the lines."""
    return fraction >= 1 or int((index + 1) * fraction) > int(index * fraction)


# Unlabelled corpora known by name (beside the datasets: ``<data root>/../corpus/...``), so a card and
# a run's identity say "xwlb" rather than a path of the machine that built it.
NAMED_TEXT = {"xwlb": Path("corpus") / "xwlb-news" / "xwlb.txt.xz"}


def text_path(spec: str, data_root: str | Path | None = None) -> Path:
    if spec not in NAMED_TEXT:
        return Path(spec)
    from crener.data.datasets import resolve_data_root

    return resolve_data_root(data_root).parent / NAMED_TEXT[spec]


def build_corpus(cfg: PretrainConfig) -> Corpus:
    """Training text of ``cfg.datasets`` (+ ``cfg.text``), with every dev and test sentence removed.

    MSRA is read under the clean protocol, so its last 4,365 training sentences (the clean dev split)
    are held out too. A training sentence whose text equals a dev or test sentence of *any* registered
    dataset is dropped rather than trusted, so no evaluation sentence can reach pretraining. A line of
    unlabelled text (``cfg.text``) is held to more: it is dropped when it shares any
    ``OVERLAP_N``-character substring with a dev or test sentence (the rule the shared news corpus
    was filtered with; checked again here for any file a user brings), and it is split at
    punctuation rather than at a fixed width.
    """
    from crener.config import DataConfig
    from crener.data.datasets import DATASETS, load_dataset

    train_texts: list[str] = []
    held_out: set[str] = set()
    files: dict[str, str] = {}
    dev_text: dict[str, list[str]] = {}
    for name in cfg.datasets:
        data = load_dataset(DataConfig(dataset=name, msra_protocol="clean"), data_root=cfg.data_root)
        for split, path in data.files.items():
            files[f"{name}/{split}"] = path
        train_texts.extend(s.text for s in data.train)
        held_out.update(s.text for s in (*data.dev, *data.test))
        dev_text[name] = [s.text for s in data.dev]
    # The dev and test text of every other registered dataset is held out too: an encoder pretrained
    # on some datasets is fine-tuned and scored on the others. One that cannot be read here cannot be
    # scored here either; say so and go on.
    for name in sorted(set(DATASETS) - set(cfg.datasets)):
        try:
            data = load_dataset(DataConfig(dataset=name, msra_protocol="clean"), data_root=cfg.data_root)
        except DataError as exc:
            log.warning("dev/test text of dataset %s not read, so not held out: %s", name, exc)
            continue
        held_out.update(s.text for s in (*data.dev, *data.test))
        dev_text[name] = [s.text for s in data.dev]
    kept = [t for t in train_texts if t not in held_out]
    pieces = [p for t in kept for p in _cut(t, cfg.max_len)]
    dropped, sentences, split_pieces = len(train_texts) - len(kept), len(kept), len(pieces)
    grams = ngrams(held_out) if cfg.text else set()
    text_lines: dict[str, int] = {}
    for spec in cfg.text:
        path = text_path(spec, cfg.data_root)
        label = f"text/{path.name}"
        files[label] = str(path)
        n = 0
        for n, (_, line) in enumerate(iter_text_lines(path), 1):
            if not evenly_kept(n - 1, cfg.text_fraction):
                continue
            if line in held_out or overlaps(line, grams):
                dropped += 1
                continue
            sentences += 1
            pieces.extend(split_at_punctuation(line, cfg.max_len))
        text_lines[label] = n
    if not pieces:
        raise DataError("the pretraining corpus is empty after removing dev and test sentences")
    return Corpus(pieces, files, held_out, dropped, sentences, dev_text, text_lines, split_pieces)


def resolve_vectors(cfg: PretrainConfig) -> Path | None:
    return vectors_path(cfg.vectors, cfg.data_root)


def read_vectors(path: Path) -> dict[str, np.ndarray]:
    """A word2vec text file (header ``count dim``) -> {token: vector}; errors name the line."""
    vectors: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().split()
        if len(header) != 2:
            raise DataError("expected a word2vec header 'count dim'", str(path), 1)
        dim = int(header[1])
        for lineno, line in enumerate(fh, 2):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) != dim + 1:
                raise DataError(f"expected a token and {dim} numbers", str(path), lineno)
            vectors[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
    return vectors


# Character vectors shipped inside pip packages, read straight from their files (importing either
# package is not needed, and simplechinese's import pulls in more): name -> (package, files, licence).
PACKAGED_VECTORS = {
    "wiki": (
        "simplechinese",
        ("data/all_words.pickle", "data/all_weights_64.npy"),
        "64-d word2vec vectors trained on Chinese Wikipedia, from the simplechinese 0.2.15 package "
        "(MIT per its metadata; the licence of the upstream training data is not stated)",
    ),
    "lac": (
        "jieba",
        ("lac_small/word.dic", "lac_small/model_baseline/word_emb"),
        "128-d character embeddings of Baidu's LAC-small tagger (Apache-2.0), shipped in the jieba 0.42.1 "
        "package (MIT)",
    ),
}
PEOPLE = "people"  # the People's Daily 50-d file in shared/pretrained ("default" names it too)


def vector_sources(spec: str | None) -> list[str]:
    """A ``vectors`` setting -> its sources in order (``people``, ``wiki``, ``lac`` or file paths)."""
    if spec is None or spec.lower() in ("none", ""):
        return []
    return [PEOPLE if part in ("default", PEOPLE) else part for part in spec.split("+")]


def packaged_vector_files(name: str) -> list[Path]:
    package, rel, _ = PACKAGED_VECTORS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        how = (
            "pip install --no-deps simplechinese==0.2.15"
            if package == "simplechinese"
            else "pip install -e '.[vectors]'"
        )
        raise DataError(
            f"--vectors {name} reads the {package} package, which is not installed: {how} "
            "(needed only to build an encoder)"
        )
    files = [Path(spec.origin).parent / r for r in rel]
    for f in files:
        if not f.is_file():
            raise DataError(f"the {package} package has no {'/'.join(Path(*f.parts[-2:]).parts)}", str(f))
    return files


def read_wiki_vectors(words: Path, weights: Path) -> dict[str, np.ndarray]:
    """simplechinese's Wikipedia word2vec: the single characters of its word list, as float32."""
    import pickle

    with open(words, "rb") as fh:
        tokens = pickle.load(fh)  # a list of str, written by the package; nothing else is unpickled
    matrix = np.load(weights, allow_pickle=False)
    if not isinstance(tokens, list) or matrix.ndim != 2 or len(tokens) != len(matrix):
        raise DataError(f"expected a word list as long as the {matrix.shape} matrix", str(words))
    return {
        t: matrix[i].astype(np.float32) for i, t in enumerate(tokens) if isinstance(t, str) and len(t) == 1
    }


def read_paddle_matrix(path: Path, rows: int) -> np.ndarray:
    """A float32 Paddle LoDTensor file (version, LoD, tensor version, TensorDesc, data) -> (rows, d)."""
    blob = path.read_bytes()
    offset = 4  # format version
    (lod_levels,) = struct.unpack_from("<Q", blob, offset)
    offset += 8
    for _ in range(lod_levels):
        (size,) = struct.unpack_from("<Q", blob, offset)
        offset += 8 + size
    offset += 4  # tensor version
    (desc,) = struct.unpack_from("<i", blob, offset)
    data = blob[offset + 4 + desc :]
    if len(data) % (4 * rows):
        raise DataError(f"{len(data)} bytes of data are not {rows} float32 rows", str(path))
    return np.frombuffer(data, dtype="<f4").reshape(rows, -1).copy()


def read_lac_vectors(dic: Path, emb: Path) -> dict[str, np.ndarray]:
    """jieba's LAC-small character embeddings: ``id<TAB>token`` lines, single characters kept."""
    ids: dict[str, int] = {}
    # Split on "\n" alone: some tokens are control characters that str.splitlines would break on.
    for lineno, line in enumerate(dic.read_text(encoding="utf-8").split("\n"), 1):
        if not line:
            continue
        idx, sep, tok = line.partition("\t")
        if not sep or not idx.isdigit():
            raise DataError("expected 'id<TAB>token'", str(dic), lineno)
        ids[tok] = int(idx)
    matrix = read_paddle_matrix(emb, max(ids.values()) + 1)
    return {t: matrix[i] for t, i in ids.items() if len(t) == 1}


@dataclass
class StartVectors:
    """The embeddings' starting vectors: one row a token (sources concatenated), their input files,
    and the tokens that join the vocabulary (those of the People's Daily file or a user's file)."""

    vectors: dict[str, np.ndarray]
    files: dict[str, str]
    vocab_tokens: set[str]
    sources: list[str]


def load_start_vectors(spec: str | None, data_root: str | Path | None = None) -> StartVectors:
    """Read each source of ``spec`` and concatenate them per token.

    Each source is scaled to a mean row norm of 1 first, so a combination weighs its sources alike
    whatever their training made of their norms; a token a source lacks gets zeros in its block.
    Only People's Daily's (or a user file's) characters enter the vocabulary: the packaged sources
    cover far more rare characters than the corpus, and each vocabulary row costs the shipped file
    width x 4 bytes; they start the characters the vocabulary already has."""
    blocks: list[dict[str, np.ndarray]] = []
    files: dict[str, str] = {}
    vocab_tokens: set[str] = set()
    sources = vector_sources(spec)
    for src in sources:
        if src in PACKAGED_VECTORS:
            paths = packaged_vector_files(src)
            block = (read_wiki_vectors if src == "wiki" else read_lac_vectors)(*paths)
            files.update({f"vectors/{src}/{p.name}": str(p) for p in paths})
        else:
            path = vectors_path("default" if src == PEOPLE else src, data_root)
            assert path is not None
            block = read_vectors(path)
            files["vectors" if src == PEOPLE and len(sources) == 1 else f"vectors/{src}"] = str(path)
            vocab_tokens.update(block)
        block = {
            VECTOR_SPECIALS.get(t, t): v for t, v in block.items() if VECTOR_SPECIALS.get(t, t) is not None
        }
        norm = float(np.mean([np.linalg.norm(v) for v in block.values()])) or 1.0
        blocks.append({t: v / norm for t, v in block.items()})
    tokens = sorted(set().union(*blocks)) if blocks else []
    dims = [len(next(iter(b.values()))) for b in blocks]
    merged = {
        t: np.concatenate([b[t] if t in b else np.zeros(d, np.float32) for b, d in zip(blocks, dims)])
        for t in tokens
    }
    return StartVectors(merged, files, vocab_tokens, sources)


def build_vocab(pieces: Iterable[str], vector_tokens: Iterable[str]) -> OrderedDict[str, int]:
    chars = {c for p in pieces for c in p}
    chars.update(t for t in vector_tokens if t not in VECTOR_SPECIALS and len(t) == 1)
    chars -= set(SPECIAL_TOKENS)
    return OrderedDict((tok, i) for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(chars)]))


def unk_probabilities(counts: Counter, vocab: dict[str, int], alpha: float) -> torch.Tensor:
    """Per token id, the probability of replacing it by [UNK] in the input (``unk_rates``):
    alpha / (alpha + count); characters never seen in the corpus and specials get 0."""
    if alpha <= 0:
        return torch.zeros(len(vocab))
    by_id = np.zeros(len(vocab))
    for ch, n in counts.items():
        if ch in vocab:
            by_id[vocab[ch]] = n
    return unk_rates(by_id, alpha, range(len(SPECIAL_TOKENS)))


def orthogonal_projection(d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """A fixed (d_in, d_out) map with orthonormal rows when d_in <= d_out (inner products are kept),
    orthonormal columns otherwise (an orthogonal projection onto d_out dimensions)."""
    gen = torch.Generator().manual_seed(seed)
    big, small = max(d_in, d_out), min(d_in, d_out)
    q, _ = torch.linalg.qr(torch.randn(big, small, generator=gen, dtype=torch.float64))  # (big, small)
    return (q.T if d_in <= d_out else q).float().contiguous()


def init_from_vectors(
    weight: torch.Tensor, vocab: dict[str, int], vectors: dict[str, np.ndarray], seed: int
) -> int:
    """Overwrite rows of ``weight`` (vocab, d) that have a vector; returns how many did."""
    rows, ids = [], []
    for tok, vec in vectors.items():
        target = VECTOR_SPECIALS.get(tok, tok)
        if target is None or target not in vocab:
            continue
        rows.append(vec)
        ids.append(vocab[target])
    if not rows:
        return 0
    mat = torch.from_numpy(np.stack(rows))
    proj = mat @ orthogonal_projection(mat.shape[1], weight.shape[1], seed)
    # Match the mean row norm of the random initialisation the other rows keep.
    target_norm = weight.detach().norm(dim=1).mean()
    proj = proj * (target_norm / proj.norm(dim=1).mean())
    with torch.no_grad():
        weight[torch.tensor(ids)] = proj.to(weight.dtype)
    return len(ids)


# ------------------------------------------------------------------------------------------ batches


def epoch_batches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Length-bucketed batches of at most ``batch_tokens`` padded tokens, shuffled by (seed, epoch).

    Ties in length are broken by the epoch's random order, so batch contents change every epoch while
    the number of batches (a function of the sorted lengths) does not."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        # Sorted ascending: the batch's padded width is the length of its last member.
        while end < len(order) and (end - start + 1) * (lengths[order[end]] + 2) <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def mask_batch(
    ids: torch.Tensor, unk_prob: torch.Tensor, cfg: PretrainConfig, vocab_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for MLM: labels are -100 except at the chosen positions.

    Positions are chosen among characters only (not [CLS], [SEP], padding); of those 80 % become
    [MASK], 10 % a random character and 10 % stay. Independently, characters are replaced by [UNK]
    in the input with their ``unk_prob`` so [UNK] gets trained."""
    real = ids >= len(SPECIAL_TOKENS)
    chosen = (torch.rand(ids.shape, generator=gen) < cfg.mask_rate) & real
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = replace_with_unk(ids, unk_prob, UNK, gen)  # specials have rate 0
    action = torch.rand(ids.shape, generator=gen)
    inputs[chosen & (action < 0.8)] = MASK
    randomise = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=gen)
    inputs[randomise] = random_ids[randomise]
    return inputs, labels


def to_ids(pieces: Sequence[str], vocab: dict[str, int]) -> list[np.ndarray]:
    # int32: a corpus of tens of millions of characters stays a few hundred MB in memory.
    return [np.asarray([CLS, *(vocab.get(c, UNK) for c in p), SEP], dtype=np.int32) for p in pieces]


def pad(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r)
    return ids, (ids != PAD).long()


# ------------------------------------------------------------------------------------------ training


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def mlm_logits(model, inputs: torch.Tensor, attn: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Vocabulary logits at the chosen positions only, (k, V): the output layer is as wide as the
    vocabulary, so scoring every position would cost as much as the encoder itself."""
    hidden = model.bert(input_ids=inputs, attention_mask=attn).last_hidden_state
    return model.cls(hidden[sel])


@torch.inference_mode()
def held_out_accuracy(model, rows: Sequence[np.ndarray], unk_prob, cfg, vocab_size) -> tuple[float, float]:  # noqa: ANN001
    """Masked-token accuracy and loss on the held-out pieces, with fixed masks (seed -1 stream)."""
    model.eval()
    gen = _step_generator(cfg.seed, -1)
    correct = total = 0
    loss_sum = 0.0
    no_unk = torch.zeros_like(unk_prob)  # measure the model, not the input noise
    for start in range(0, len(rows), 64):
        ids, attn = pad(rows[start : start + 64])
        inputs, labels = mask_batch(ids, no_unk, cfg, vocab_size, gen)
        sel = labels != -100
        with autocast(torch.device("cpu"), cfg.bf16):
            logits = mlm_logits(model, inputs, attn, sel).float()
        correct += int((logits.argmax(-1) == labels[sel]).sum())
        total += int(sel.sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum"))
    model.train()
    return correct / max(total, 1), loss_sum / max(total, 1)


@dataclass
class InitEncoder:
    path: str
    vocab: dict[str, int]
    state: dict[str, torch.Tensor]  # the encoder's weights (BertModel names, without "bert.")
    # Its masked-LM head (BertForMaskedLM names), None for a folder written without one.
    head: dict[str, torch.Tensor] | None = None


def check_inputs(cfg: PretrainConfig) -> None:
    """Refuse, before any folder is made or text read, what ``cfg`` reads and cannot find: a
    ``--text`` file (or the named corpus), a source of ``--vectors``, the ``--init-from`` encoder."""
    from crener.encoder import resolve_encoder

    for spec in cfg.text:
        path = text_path(spec, cfg.data_root)
        if path.is_dir():
            raise DataError(f"--text {spec} is a folder, not a file; name the file", str(path))
        if not path.is_file():
            raise DataError(f"--text {spec}: no such file; check the path", str(path))
    for src in vector_sources(cfg.vectors):
        if src in PACKAGED_VECTORS:
            packaged_vector_files(src)
        else:
            vectors_path("default" if src == PEOPLE else src, cfg.data_root)
    if cfg.init_from:
        path = Path(resolve_encoder(cfg.init_from)).expanduser()
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise CheckpointError(
                f"--init-from {cfg.init_from}: no config.json and model.safetensors in {path}"
            )


def load_init_encoder(cfg: PretrainConfig) -> InitEncoder:
    """The encoder ``cfg.init_from`` names, checked to have ``cfg``'s shape."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertTokenizer

    from crener.encoder import resolve_encoder

    path = Path(resolve_encoder(cfg.init_from))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"--init-from {cfg.init_from}: no config.json and model.safetensors in {path}")
    bert = BertConfig.from_pretrained(path)
    shape = {"hidden": bert.hidden_size, "layers": bert.num_hidden_layers, "heads": bert.num_attention_heads,
             "ff": bert.intermediate_size}  # fmt: skip
    wrong = {k: v for k, v in shape.items() if getattr(cfg, k) != v}
    if wrong:
        flags = " ".join(f"--{k} {v}" for k, v in wrong.items())
        raise CrenerError(f"--init-from {cfg.init_from} has another shape: pass {flags}")
    vocab = BertTokenizer.from_pretrained(path).get_vocab()
    head = read_mlm_head(path / MLM_HEAD_NAME, bert.hidden_size, len(vocab))
    if head is None:
        log.info("%s has no %s: the masked-LM head starts fresh", path, MLM_HEAD_NAME)
    return InitEncoder(str(path), vocab, load_file(path / "model.safetensors"), head)


def mlm_head_state(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The masked-LM head of ``model`` (a BertForMaskedLM) as :data:`MLM_HEAD_NAME` stores it: copies,
    since the bias shares its storage with the decoder's, which safetensors refuses to write."""
    own = model.state_dict()
    return {k: own[k].detach().clone().contiguous() for k in (*MLM_HEAD_TRANSFORM, MLM_HEAD_BIAS)}


def read_mlm_head(path: Path, hidden: int, vocab_size: int) -> dict[str, torch.Tensor] | None:
    """The head a folder saved (safetensors, never pickle), checked to fit an encoder of width
    ``hidden`` and ``vocab_size`` tokens; None when there is no such file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        head = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable masked-LM head ({exc})") from None
    expected = {k: (hidden, hidden) if k.endswith("dense.weight") else (hidden,) for k in MLM_HEAD_TRANSFORM}
    expected[MLM_HEAD_BIAS] = (vocab_size,)
    wrong = [
        f"{k} is {tuple(head[k].shape) if k in head else 'missing'}, expected {shape}"
        for k, shape in expected.items()
        if k not in head or tuple(head[k].shape) != shape
    ]
    if wrong or set(head) != set(expected):
        extra = sorted(set(head) - set(expected))
        raise CheckpointError(
            f"{path}: the masked-LM head does not fit this encoder (width {hidden}, {vocab_size} tokens): "
            + "; ".join(wrong + [f"unexpected {k}" for k in extra[:3]])
            + f". Delete {path.name} to start the head fresh"
        )
    return {k: v.float() for k, v in head.items()}


def continue_from(model, vocab: dict[str, int], init: InitEncoder) -> int:  # noqa: ANN001
    """Copy ``init``'s weights into ``model`` (a BertForMaskedLM): every tensor by name, the word
    embeddings row by token (the vocabularies' orders differ); with ``init.head``, the head's
    transform as it is and its output bias by token like the embeddings (tokens new to the
    vocabulary keep their fresh values). Returns the rows carried over."""
    own = model.bert.state_dict()
    emb = "embeddings.word_embeddings.weight"
    shared = {k: v for k, v in init.state.items() if k in own and k != emb and own[k].shape == v.shape}
    missing = sorted(set(init.state) - set(shared) - {emb})
    if missing:
        raise CheckpointError(f"{init.path}: weights that do not fit this encoder: {', '.join(missing[:5])}")
    model.bert.load_state_dict(shared, strict=False)
    pairs = [(vocab[t], i) for t, i in init.vocab.items() if t in vocab]
    new_ids, old_ids = (torch.tensor(x) for x in zip(*pairs))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[new_ids] = init.state[emb][old_ids]
        if init.head is not None:
            model.load_state_dict({k: init.head[k] for k in MLM_HEAD_TRANSFORM}, strict=False)
            # In place: the decoder's bias is this same parameter.
            model.cls.predictions.bias[new_ids] = init.head[MLM_HEAD_BIAS][old_ids]
    return len(pairs)


DEV_PIECES = 500  # pieces of each dataset's dev text scored for masked-token accuracy


def dev_pieces(texts: Sequence[str], cfg: PretrainConfig) -> list[str]:
    """A fixed sample of a dataset's dev text in pieces of at most ``max_len`` (never trained on)."""
    pieces = [p for t in texts for p in _cut(t, cfg.max_len)]
    if len(pieces) <= DEV_PIECES:
        return pieces
    keep = np.sort(np.random.default_rng([cfg.seed, 11]).permutation(len(pieces))[:DEV_PIECES])
    return [pieces[i] for i in keep]


def licences(cfg: PretrainConfig, sources: Sequence[str]) -> dict[str, str]:
    out = {k: v for k, v in LICENCES.items() if k in cfg.datasets}
    for src in sources:
        if src == PEOPLE:
            out["vectors"] = LICENCES["vectors"]
        elif src in PACKAGED_VECTORS:
            out[f"vectors/{src}"] = PACKAGED_VECTORS[src][2]
        else:
            out[f"vectors/{Path(src).name}"] = "a user's file: its licence is the user's to record"
    for spec in cfg.text:
        path = text_path(spec, cfg.data_root)
        readme = path.parent / "README.md"
        out[f"text/{path.name}"] = (
            "research use only; not to be redistributed (see the corpus README)"
            if "research use only" in (readme.read_text(encoding="utf-8") if readme.is_file() else "").lower()
            else "a user's file: its licence is the user's to record"
        )
    return out


@dataclass
class MlmData:
    """The corpus as pretraining reads it: vocabulary, token rows and the [UNK] replacement rates."""

    corpus: Corpus
    start: StartVectors
    init: InitEncoder | None
    vocab: OrderedDict[str, int]
    train_rows: list[np.ndarray]
    held_rows: list[np.ndarray]  # a fixed sample of the corpus, for measuring, never for training
    dev_rows: dict[str, list[np.ndarray]]  # each dataset's dev text
    unk_prob: torch.Tensor
    lengths: list[int]  # characters of each training row
    prep_seconds: float  # reading, filtering and encoding the corpus
    characters: int = 0  # characters of the distinct training pieces (each counted once however often read)

    @property
    def held_out(self) -> int:
        return len(self.held_rows)


def prepare_mlm_data(cfg: PretrainConfig) -> MlmData:
    """Read the corpus and the starting vectors, build the vocabulary and encode the rows."""
    t_prep = time.perf_counter()
    # The encoder continued first: one that does not fit is refused before the corpus is read.
    init = load_init_encoder(cfg) if cfg.init_from else None
    corpus = build_corpus(cfg)
    start = load_start_vectors(cfg.vectors, cfg.data_root)
    vocab = build_vocab(corpus.pieces, start.vocab_tokens | (set(init.vocab) if init else set()))
    # Held-out pieces: a fixed sample of the corpus, for measuring, never for training.
    perm = np.random.default_rng([cfg.seed, 7]).permutation(len(corpus.pieces))
    n_held = min(HELD_OUT, len(corpus.pieces) // 10)
    held_idx, train_idx = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    # --datasets-repeat: the splits' training pieces appear that many times in every epoch's shuffle
    # (a held-out piece in none of them). The [UNK] rates below count each piece once: they follow
    # how rare a character is in the text, not how often the text is sampled.
    once = to_ids([corpus.pieces[i] for i in train_idx], vocab)
    split_rows = [r for i, r in zip(train_idx, once, strict=True) if i < corpus.split_pieces]
    train_rows = once + split_rows * (cfg.datasets_repeat - 1)
    held_rows = to_ids([corpus.pieces[i] for i in held_idx], vocab)
    dev_rows = {name: to_ids(dev_pieces(texts, cfg), vocab) for name, texts in corpus.dev_text.items()}
    counts = Counter(c for i in train_idx for c in corpus.pieces[i])
    unk_prob = unk_probabilities(counts, vocab, cfg.unk_alpha)
    lengths = [len(r) - 2 for r in train_rows]
    characters = sum(lengths[: len(once)])
    prep_seconds = time.perf_counter() - t_prep
    return MlmData(
        corpus, start, init, vocab, train_rows, held_rows, dev_rows, unk_prob, lengths, prep_seconds, characters
    )  # fmt: skip


def build_mlm_model(cfg: PretrainConfig, data: MlmData):  # noqa: ANN201 - transformers.BertForMaskedLM
    """The masked-language model, seeded, its embedding rows from the starting vectors and (with
    ``--init-from``) the weights of the encoder it continues; returns it and the rows initialised."""
    from transformers import BertConfig, BertForMaskedLM

    vocab, start, init = data.vocab, data.start, data.init
    bert_cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.ff, max_position_embeddings=512,
        pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = BertForMaskedLM(bert_cfg)
    initialised = 0
    if start.vectors:
        initialised = init_from_vectors(
            model.bert.embeddings.word_embeddings.weight, vocab, start.vectors, cfg.seed
        )
    log.info("%d of %d vocabulary rows initialised from %s", initialised, len(vocab), "+".join(start.sources))
    if init is not None:
        carried = continue_from(model, vocab, init)
        log.info("continuing %s: %d of %d vocabulary rows carried over", cfg.init_from, carried, len(vocab))
        start.files[f"init/{Path(init.path).name}"] = str(Path(init.path) / "model.safetensors")
        if init.head is not None:
            start.files[f"init/{Path(init.path).name}/mlm_head"] = str(Path(init.path) / MLM_HEAD_NAME)
    return model, initialised


def mlm_optimisation(cfg: PretrainConfig, model: torch.nn.Module):  # noqa: ANN201
    """AdamW (no decay on biases and LayerNorm) and a linear warm-up then decay over ``cfg.steps``."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    warm = max(1, int(cfg.steps * cfg.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        # max(1, ..): the warm-up may cover every step (--steps 1, or --warmup 1).
        lambda s: (s + 1) / warm if s < warm else max(0.0, (cfg.steps - s) / max(1, cfg.steps - warm)),
    )
    return optimizer, scheduler


@dataclass
class MlmProgress:
    """Where pretraining stands: what its resumable state holds besides the weights."""

    step: int = 0
    seconds: float = 0.0  # spent in training steps, over every process of the build
    run_id: str | None = None  # the MLflow run it logs to
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_seen: int = 0
    first_commit: str | None = None  # the commit the build started at


def resume_mlm(
    state_path: Path, identity: str, model, optimizer, scheduler, commit: str | None
) -> MlmProgress:  # noqa: ANN001
    """Restore a killed build's weights, optimiser, schedule and RNG; a fresh start otherwise."""
    if not state_path.exists():
        return MlmProgress(first_commit=commit)
    state = read_state(state_path, "pretraining state")
    if state.get("version") != STATE_VERSION or state.get("identity") != identity:
        raise CheckpointError(
            f"{state_path} belongs to another pretraining configuration; "
            "use another --workdir or delete it to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info("resuming pretraining from step %d (%s)", state["step"], state_path)
    return MlmProgress(
        step=state["step"],
        seconds=state["seconds"],
        run_id=state.get("run_id") or None,
        history=json.loads(state["history"]),
        tokens_seen=int(state.get("tokens", 0)),
        first_commit=state.get("commit", commit),
    )


def start_tracking(cfg: PretrainConfig, out: Path, progress: MlmProgress, vocab_size: int):  # noqa: ANN201
    """The MLflow run the build logs to (the killed build's, when resumed); sets its id in ``progress``."""
    from crener.tracking import Tracker

    logger = Tracker().start_plain_run(
        "crener-pretrain", name=out.name, resume_run_id=progress.run_id,
        tags={"crener.kind": "pretrain", "crener.encoder": out.name},
    )  # fmt: skip
    progress.run_id = logger.run_id
    logger.log_params({**{f"pretrain.{k}": v for k, v in cfg.identity().items()}, "vocab_size": vocab_size})
    return logger


def pretrain(
    cfg: PretrainConfig,
    *,
    workdir: str | Path | None = None,
    track: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Pretrain (or continue a killed run of) ``cfg``; write the encoder and its card to ``cfg.out``.

    ``workdir`` holds the resumable state (default: ``.crener/pretrain/<name of out>``). ``stop_after``
    ends the call after that many steps without writing the encoder (used to test resumption)."""
    out = Path(cfg.out)
    workdir = Path(workdir) if workdir is not None else Path(".crener") / "pretrain" / out.name
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    commit = git_commit()  # the code that runs: HEAD may move while a long build goes on
    data = prepare_mlm_data(cfg)
    per_epoch = len(epoch_batches(data.lengths, cfg.batch_tokens, cfg.seed, 0))
    corpus = data.corpus
    log.info(
        "corpus: %d sentences (%d dropped: also in a dev/test split) -> %d pieces (%d held out), "
        "%d characters, vocabulary %d, %d batches an epoch",
        corpus.sentences, corpus.dropped, len(corpus.pieces), data.held_out, data.characters, len(data.vocab),
        per_epoch,
    )  # fmt: skip
    model, initialised = build_mlm_model(cfg, data)
    optimizer, scheduler = mlm_optimisation(cfg, model)
    state_path = workdir / CHECKPOINT_NAME
    identity = json.dumps(cfg.identity(), sort_keys=True, default=list)
    done = resume_mlm(state_path, identity, model, optimizer, scheduler, commit)
    logger = start_tracking(cfg, out, done, len(data.vocab)) if track else None

    def save_state() -> None:
        save_checkpoint(state_path, {
            "version": STATE_VERSION, "identity": identity, "step": done.step, "seconds": done.seconds,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "run_id": done.run_id or "", "history": json.dumps(done.history), "tokens": done.tokens_seen,
            "commit": done.first_commit,
        })  # fmt: skip

    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    train_mlm(cfg, data, model, optimizer, scheduler, done, last, save_state, logger, progress)
    if done.step < cfg.steps:  # stopped early on purpose (tests)
        return {"step": done.step, "finished": False}
    acc, held_loss = held_out_accuracy(model, data.held_rows, data.unk_prob, cfg, len(data.vocab))
    dev_accuracy = {
        name: round(held_out_accuracy(model, rows, data.unk_prob, cfg, len(data.vocab))[0], 4)
        for name, rows in data.dev_rows.items()
    }
    log.info("masked-token accuracy on each dataset's dev text: %s", dev_accuracy)
    summary = {
        "step": done.step, "finished": True, "seconds": done.seconds, "held_out_mlm_accuracy": acc,
        "held_out_mlm_loss": held_loss, "vocab_size": len(data.vocab), "initialised_rows": initialised,
        "corpus_sentences": corpus.sentences, "corpus_pieces": len(corpus.pieces),
        "corpus_characters": data.characters, "dropped_sentences": corpus.dropped,
        "held_out_pieces": data.held_out, "parameters": sum(p.numel() for n, p in model.bert.named_parameters()),
        "dev_mlm_accuracy": dev_accuracy, "tokens_seen": done.tokens_seen, "text_lines": corpus.text_lines,
        "prep_seconds": data.prep_seconds,
    }  # fmt: skip
    write_encoder(cfg, out, model, data, summary, done, command, commit)
    if logger is not None:
        logger.log_metrics(
            {"final/held_out_mlm_accuracy": acc, "final/seconds": done.seconds}, step=done.step
        )
        logger.set_tags({"crener.state": "finished"})
        logger.terminate("FINISHED")
    log.info("encoder written to %s: held-out masked-token accuracy %.3f after %d steps", out, acc, done.step)
    return summary


def train_mlm(
    cfg: PretrainConfig, data: MlmData, model, optimizer, scheduler, done: MlmProgress, last: int,  # noqa: ANN001
    save_state: Any, logger: Any, progress: bool,
) -> None:  # fmt: skip
    """Train from ``done.step`` to step ``last``, logging every ``cfg.log_every`` steps and saving
    the resumable state every ``cfg.save_every`` (and at ``last``); updates ``done``."""
    from crener.train import progress_bar

    bar = progress_bar(cfg.steps, "pretrain", progress)
    if bar is not None:
        bar.update(done.step)
    model.train()
    per_epoch = len(epoch_batches(data.lengths, cfg.batch_tokens, cfg.seed, 0))
    window_loss = window_correct = window_total = window_tokens = 0.0
    t_window = time.perf_counter()
    batches: list[np.ndarray] = []
    epoch = -1
    while done.step < last:
        step = done.step
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(data.lengths, cfg.batch_tokens, cfg.seed, epoch)
        idx = batches[step % per_epoch]
        t0 = time.perf_counter()
        ids, attn = pad([data.train_rows[i] for i in idx])
        inputs, labels = mask_batch(ids, data.unk_prob, cfg, len(data.vocab), _step_generator(cfg.seed, step))
        sel = labels != -100
        with autocast(torch.device("cpu"), cfg.bf16):
            logits = mlm_logits(model, inputs, attn, sel).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[sel])
        if not torch.isfinite(loss):
            raise CrenerError(f"non-finite pretraining loss at step {step}: lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step = done.step = step + 1
        done.seconds += time.perf_counter() - t0
        n_sel = int(sel.sum())
        window_loss += loss.item() * n_sel
        window_correct += int((logits.detach().argmax(-1) == labels[sel]).sum())
        window_total += n_sel
        window_tokens += int(attn.sum())
        done.tokens_seen += int(attn.sum())
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss):.3f}")
            bar.update(1)
        if step % TRIM_EVERY == 0:
            trim_heap()
        if step % cfg.log_every == 0 or step == last:
            elapsed = max(time.perf_counter() - t_window, 1e-9)
            row = {
                "step": step, "epoch": step / per_epoch,
                "train/mlm_loss": window_loss / max(window_total, 1),
                "train/mlm_accuracy": window_correct / max(window_total, 1),
                "train/tokens_per_s": window_tokens / elapsed,
                "lr": scheduler.get_last_lr()[0],
            }  # fmt: skip
            log_mlm_row(cfg, data, model, row, done, logger)
            window_loss = window_correct = window_total = window_tokens = 0.0
            t_window = time.perf_counter()
        if step % cfg.save_every == 0 or step == last:
            save_state()
    if bar is not None:
        bar.close()


def log_mlm_row(
    cfg: PretrainConfig, data: MlmData, model, row: dict[str, float], done: MlmProgress, logger: Any
) -> None:  # noqa: ANN001
    """Add a logging window's row to the history (every tenth with held-out accuracy), log it."""
    step = int(row["step"])
    if step % (cfg.log_every * 10) == 0 or step == cfg.steps:
        acc, held_loss = held_out_accuracy(model, data.held_rows, data.unk_prob, cfg, len(data.vocab))
        row.update({"held_out/mlm_accuracy": acc, "held_out/mlm_loss": held_loss})
    done.history.append(row)
    log.info(
        "step %d/%d loss %.3f acc %.3f%s %.0f tok/s", step, cfg.steps, row["train/mlm_loss"],
        row["train/mlm_accuracy"],
        f" held-out acc {row['held_out/mlm_accuracy']:.3f}" if "held_out/mlm_accuracy" in row else "",
        row["train/tokens_per_s"],
    )  # fmt: skip
    if logger is not None:
        logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)


def write_encoder(
    cfg: PretrainConfig, out: Path, model, data: MlmData, summary: dict[str, Any], done: MlmProgress,  # noqa: ANN001
    command: str | None, commit: str | None,
) -> None:  # fmt: skip
    """Write the encoder, its masked-LM head, its tokenizer and its card into ``out`` (whole files
    only: built beside it, then moved in)."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab=data.vocab, do_lower_case=False, strip_accents=False)
    tokenizer.save_pretrained(tmp)
    model.bert.save_pretrained(tmp, safe_serialization=True)
    save_file(mlm_head_state(model), tmp / MLM_HEAD_NAME, metadata={"format": "pt"})
    inputs = {**data.corpus.files, **data.start.files}
    card = {
        "name": out.name,
        "command": command or "crener pretrain " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
        "commit": done.first_commit,  # where the build started; a resumed one says where it ended too
        **({"resumed_commit": commit} if commit != done.first_commit else {}),
        "config": cfg.identity(),
        # Whether the head continued the --init-from encoder's (its file is then among the inputs).
        **({"mlm_head": "continued" if data.init.head is not None else "fresh"} if data.init else {}),
        "inputs": {label: {"path": _rel_input(path), "sha256": file_digest(path)} for label, path in inputs.items()},
        "licences": licences(cfg, data.start.sources),
        "summary": summary,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    (tmp / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (tmp / "README.md").write_text(render_card(card, done.history), encoding="utf-8")
    (tmp / "history.json").write_text(json.dumps(done.history, indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def _rel_input(path: str) -> str:
    """An input's path relative to the shared folder (``data/resume/train.char.bmes``) or to this
    repository (a shipped encoder's weights) when it is there: a card names no machine's folders."""
    repo = Path(__file__).resolve().parents[2]  # this file is crener/tools/pretrain.py
    if Path(path).resolve().is_relative_to(repo):
        return Path(path).resolve().relative_to(repo).as_posix()
    parts = Path(path).resolve().parts
    if "shared" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("shared") :])
    return str(path)


def _vectors_phrase(spec: str | None) -> str:
    names = {PEOPLE: "the People's Daily 50-d vectors", "wiki": "Wikipedia 64-d vectors (simplechinese)",
             "lac": "LAC-small 128-d embeddings (jieba)"}  # fmt: skip
    sources = vector_sources(spec)
    if not sources:
        return "no vectors (random initialisation for all)"
    return " + ".join(names.get(src, f"`{src}`") for src in sources) + (
        " concatenated" if len(sources) > 1 else ""
    )


def render_card(card: dict[str, Any], history: Sequence[dict[str, float]]) -> str:
    s = card["summary"]
    cfg = card["config"]
    lines = [
        f"# {card['name']}: a compact Chinese character encoder pretrained by crener",
        "",
        "Built by this project's own command on CPU; no third-party weights. Loads with "
        "`transformers.AutoModel.from_pretrained(<this folder>)` (BERT layout, safetensors, character vocabulary).",
        "",
        "## How it was built",
        "",
        f"- command: `{card['command']}`",
        f"- commit: `{card['commit']}` (torch {card['torch']}, {card['threads']} threads)"
        + (f"; {card['commit_note']}" if card.get("commit_note") else ""),
        *(
            [
                f"- continued from `{cfg['init_from']}` (its weights start every layer and the rows of its "
                "characters; new characters start from the vectors; the masked-LM head "
                + (
                    f"continues from `{cfg['init_from']}`)"
                    if card.get("mlm_head") == "continued"
                    else "starts fresh)"
                )
            ]
            if cfg.get("init_from")
            else []
        ),
        f"- architecture: BERT, {cfg['layers']} layers, width {cfg['hidden']}, {cfg['heads']} heads, "
        f"feed-forward {cfg['ff']}; {s['parameters']:,} parameters; vocabulary {s['vocab_size']:,} "
        f"({s['initialised_rows']:,} rows initialised from {_vectors_phrase(cfg.get('vectors'))} by a fixed "
        "orthogonal projection)",
        f"- objective: masked language modelling ({cfg['mask_rate']:.0%} of characters, 80/10/10), inputs "
        f"replaced by [UNK] with probability {cfg['unk_alpha']}/({cfg['unk_alpha']} + count)",
        f"- corpus: the training splits of {', '.join(cfg['datasets'])}"
        + (f" and {', '.join(_rel_input(t) for t in cfg['text'])}" if cfg["text"] else "")
        + (
            f" (an evenly spread {cfg['text_fraction']:g} of its lines)"
            if cfg.get("text_fraction", 1) < 1
            else ""
        )
        + (
            f"; each training split's pieces read {cfg['datasets_repeat']} times an epoch"
            if cfg.get("datasets_repeat", 1) > 1
            else ""
        )
        + f"; {s['corpus_sentences']:,} sentences ({s['dropped_sentences']:,} dropped because they occur in a "
        f"dev or test split{', or a line of text shares 10 characters with one' if cfg['text'] else ''}), "
        f"{s['corpus_pieces']:,} pieces of at most "
        f"{cfg['max_len']} characters, {s['corpus_characters']:,} characters trained on, "
        f"{s['held_out_pieces']} pieces held out",
        f"- steps: {s['step']:,} of {cfg['batch_tokens']:,}-token batches, learning rate {cfg['lr']}, seed {cfg['seed']}",
        f"- tokens seen: {s.get('tokens_seen', 0):,} (padding excluded)",
        f"- wall time: {s['seconds'] / 60:.1f} min of training steps, after {s.get('prep_seconds', 0) / 60:.1f} "
        "min of reading and encoding the corpus",
        f"- final masked-token accuracy on the held-out pieces: **{s['held_out_mlm_accuracy']:.3f}** "
        f"(loss {s['held_out_mlm_loss']:.3f})",
        "",
        "## Masked-token accuracy on each dataset's dev text (held out from pretraining)",
        "",
        f"Up to {DEV_PIECES} pieces of each dev split, {cfg['mask_rate']:.0%} of characters masked with a fixed draw.",
        "",
        "| dataset | accuracy |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in s.get("dev_mlm_accuracy", {}).items()],
        "",
        "## Inputs (SHA-256; the data files match `shared/data/SHA256SUMS`)",
        "",
        "Only training splits are trained on; dev and test files (and MSRA's clean dev, the end of its "
        "training file) are read to hold their sentences out.",
        "",
        "| input | path | sha256 |",
        "|---|---|---|",
        *[f"| {k} | `{v['path']}` | `{v['sha256']}` |" for k, v in card["inputs"].items()],
        "",
        "## Licences of the inputs",
        "",
        *[f"- {k}: {v}" for k, v in card["licences"].items()],
        "",
        "The weights are derived from these texts; they inherit their research-use terms. OntoNotes 4.0 is "
        "LDC-licensed: use this encoder under the same conditions as the data.",
        "",
        "## Pretraining curve",
        "",
        "| step | epoch | train loss | train acc | held-out acc | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {int(h['step'])} | {h['epoch']:.2f} | {h['train/mlm_loss']:.3f} | {h['train/mlm_accuracy']:.3f} | "
            f"{h['held_out/mlm_accuracy']:.3f} | {h['train/tokens_per_s']:.0f} |"
            for h in history
            if "held_out/mlm_accuracy" in h
        ],
        "",
        f"Rebuild: `{card['command']}` (deterministic for the seed on one CPU with the same thread count).",
        "",
    ]
    return "\n".join(lines)


def config_from_args(args: Any) -> PretrainConfig:
    fields = {
        k: getattr(args, k) for k in PretrainConfig.__dataclass_fields__ if getattr(args, k, None) is not None
    }
    for k in ("datasets", "text"):
        if k in fields:
            fields[k] = tuple(fields[k])
    if getattr(args, "vectors", None) == "none":
        fields["vectors"] = None
    bf16 = fields.pop("bf16", None)  # the CLI's auto | true | false
    if bf16 in ("true", "false"):
        fields["bf16"] = bf16 == "true"
    cfg = replace(PretrainConfig(out=args.out), **fields)  # validates before anything is measured
    if bf16 == "auto":
        from crener.device import bf16_pays

        cfg = replace(cfg, bf16=bf16_pays("cpu"))
    return cfg
