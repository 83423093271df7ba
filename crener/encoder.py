"""Character encoders: any BERT-style checkpoint via ``from_pretrained``, or the embedded default.

The embedded default is a small, randomly initialised BERT whose vocabulary is the characters
of the training split. It is written to disk in the standard Hugging Face layout and loaded
back with the very same ``from_pretrained`` call a user's bert-base-chinese goes through, so
the loading path is exercised here even though no model hub is reachable.

Chinese BERT tokenises one character into at most one piece, so characters map one-to-one to
tokens: ``[CLS] c_1 .. c_n [SEP]``. A character that tokenises to nothing (some whitespace and
control symbols) maps to ``[UNK]`` (method.md §2.1), which W2NER would leave without a piece.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crener.config import ENCODER_POSITIONS, ModelConfig
from crener.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
# Encoders this project builds with `crener pretrain` and ships (each folder has a README.md card
# with the exact command, commit and input hashes). A name here resolves to its folder.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_ENCODERS = {
    "crener-char": ASSETS_DIR / "crener-char",  # the four training splits
    "crener-xwlb": ASSETS_DIR / "crener-xwlb",  # crener-char continued on the broadcast-news corpus
    "crener-char-18k": ASSETS_DIR / "crener-char-18k",  # crener-char's recipe at 18,000 steps (3x)
}


def resolve_encoder(name: str | os.PathLike) -> str:
    """A shipped encoder's name -> its folder; anything else (a path or hub name) unchanged."""
    text = str(name)
    path = SHIPPED_ENCODERS.get(text)
    if path is None:
        return text
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"the shipped encoder {text!r} is missing from {path}; rebuild it with the command in its card "
            f"(crener pretrain --out {path.relative_to(ASSETS_DIR.parent.parent)}), or pass another --encoder"
        )
    return str(path)


def shipped_weights_digest(name: str | os.PathLike) -> str | None:
    """Hex SHA-256 of a shipped encoder's weights file, or None for any other encoder (a path or
    hub name is the user's to version). Cached on the file's size and modification time."""
    if str(name) not in SHIPPED_ENCODERS:
        return None
    from crener.data.digest import file_digest

    return file_digest(Path(resolve_encoder(name)) / "model.safetensors")


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_POSITIONS = ENCODER_POSITIONS  # BERT's position table; sentences are split to data.max_len <= 510 first


@dataclass
class CharTokenizer:
    """Maps characters to token ids of a loaded tokenizer, one token per character."""

    tokenizer: object
    cls_id: int
    sep_id: int
    pad_id: int
    unk_id: int

    def __post_init__(self) -> None:
        self._cache: dict[str, int] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer) -> CharTokenizer:  # noqa: ANN001 - any HF tokenizer
        return cls(
            tokenizer,
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
        )

    def char_id(self, ch: str) -> int:
        tid = self._cache.get(ch)
        if tid is None:
            pieces = self.tokenizer.tokenize(ch)
            if pieces:
                tid = self.tokenizer.convert_tokens_to_ids(pieces[0])
            else:
                # BERT's cleaning deletes U+FFFD and private-use characters; a character vocabulary
                # (ours) may still hold them, and then they keep their own vector instead of [UNK].
                tid = self.tokenizer.get_vocab().get(ch, self.unk_id)
            if tid is None:
                tid = self.unk_id
            self._cache[ch] = tid
        return tid

    def encode(self, chars: Iterable[str]) -> list[int]:
        """``[CLS] ids.. [SEP]`` for one sentence."""
        return [self.cls_id, *(self.char_id(c) for c in chars), self.sep_id]


def build_embedded_encoder(chars: Iterable[str], cfg: ModelConfig, out_dir: Path, seed: int) -> Path:
    """Write a random BERT with a character vocabulary to ``out_dir`` (HF layout); return it.

    Characters are sorted so the vocabulary, and hence the random init under a fixed seed, is
    independent of file order.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_chars = sorted({c for c in chars if c not in SPECIAL_TOKENS})
    vocab = OrderedDict((tok, i) for i, tok in enumerate([*SPECIAL_TOKENS, *vocab_chars]))
    # transformers 5 ignores BertTokenizer(vocab_file=...): pass the mapping itself. Lower-casing
    # and accent stripping are off so every character keeps its own entry.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=False, strip_accents=False)
    bert_cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.embedded_hidden,
        num_hidden_layers=cfg.embedded_layers,
        num_attention_heads=cfg.embedded_heads,
        intermediate_size=cfg.embedded_ff,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=vocab["[PAD]"],
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(bert_cfg, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(gen_state)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():  # move files in last so a half-written encoder is never picked up
        f.replace(out_dir / f.name)
    tmp.rmdir()
    log.info(
        "embedded encoder: %d characters, width %d, saved to %s",
        len(vocab_chars),
        cfg.embedded_hidden,
        out_dir,
    )
    return out_dir


def load_pretrained(name_or_path: str | os.PathLike) -> tuple[nn.Module, CharTokenizer]:
    """Load a BERT-style encoder and tokenizer with ``from_pretrained``; clear error if missing."""
    from transformers import AutoModel, AutoTokenizer

    name = resolve_encoder(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    # Without a network the hub client retries for about a minute: look first, then use the cache.
    no_network = not offline and not Path(name).expanduser().exists() and not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline or no_network)
        model = AutoModel.from_pretrained(
            name, local_files_only=offline or no_network, add_pooling_layer=False
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load encoder {name!r}: {_why_not_loaded(name, offline, no_network, exc)}. Pass "
            "--encoder PATH to a folder saved with save_pretrained (config.json, weights, vocab.txt), e.g. "
            "a local copy of bert-base-chinese, or use the embedded default (model.encoder=embedded)"
        ) from exc
    return model, CharTokenizer.from_tokenizer(tokenizer)


def check_encoder_name(name: str) -> None:
    """Refuse, before any work, an encoder that cannot load whatever the network: a shipped one that
    is missing, a path that does not exist, a folder without a saved model. Names that need the
    hub (or the ``embedded`` encoder, built by the run) pass."""
    if name == EMBEDDED:
        return
    path = Path(resolve_encoder(name)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"--encoder {name}: the folder lacks a saved model (no config.json in {path})")
    if not path.exists() and _looks_like_path(str(name)):
        raise CheckpointError(f"--encoder {name}: no such folder")


def _looks_like_path(name: str) -> bool:
    """Hub names are 'model' or 'owner/model': a leading / . ~ or a second separator makes a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


HUB_PROBE_S = 3.0  # seconds to wait for the hub's address before calling the network absent


def _hub_reachable() -> bool:
    """Whether the Hugging Face Hub (``$HF_ENDPOINT``) answers a TCP connection within seconds."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_S).close()
    except OSError:
        return False
    return True


def _why_not_loaded(name: str, offline: bool, no_network: bool, exc: Exception) -> str:
    """The reason ``from_pretrained(name)`` failed, in the user's terms: a folder that is missing or
    incomplete, hub downloads turned off, or a download that could not happen."""
    path = Path(name).expanduser()
    if path.is_dir():
        return f"the folder lacks a saved model ({str(exc).strip().splitlines()[0]})"
    if not path.exists() and _looks_like_path(name):
        return "no such folder"
    if offline:
        return "it is not a local folder and hub downloads are off (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to allow them"
    if no_network:
        return "it is not a local folder or in the local cache, and it could not be downloaded: the Hugging Face Hub cannot be reached (no network?)"
    return f"it is not a local folder and could not be downloaded from the Hugging Face Hub ({str(exc).strip().splitlines()[0]})"


def unk_rates(counts: np.ndarray, alpha: float, special_ids: Iterable[int]) -> torch.Tensor:
    """The [UNK] replacement rule of pretraining and fine-tuning, per token id: alpha / (alpha + count).

    ``counts`` holds each id's occurrences in the training text; ids never seen and ``special_ids``
    get 0. Rare characters are replaced most often, so [UNK] stays a trained vector (alpha > 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.where(counts > 0, alpha / (alpha + np.maximum(counts, 1.0)), 0.0)
    probs[list(special_ids)] = 0.0
    return torch.from_numpy(probs).float()


def replace_with_unk(
    input_ids: torch.Tensor, probs: torch.Tensor, unk_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``input_ids`` with each token replaced by ``unk_id`` with its probability in ``probs``."""
    hit = torch.rand(input_ids.shape, generator=generator) < probs[input_ids]
    return input_ids.masked_fill(hit, unk_id)


# Frozen encoders' features, shared by every run of a process that uses the same weights (a sweep
# trains dozens of cells over the same sentences): encoder identity -> token ids -> (n, d) features.
FEATURE_CACHE_MAX_FLOATS = 1 << 28  # 1 GiB of fp32 a process; past it, features are computed, not kept


class FeatureCache(dict):
    """token ids -> (n, d) features, counting the floats it holds (checked against the cap)."""

    def __init__(self) -> None:
        super().__init__()
        self.floats = 0


_FEATURE_CACHES: dict[tuple, FeatureCache] = {}


def feature_cache(name_or_path: str | os.PathLike, last4_mean: bool, top_layers: int = 0) -> FeatureCache:
    """The process-wide cache of a frozen encoder's features, keyed by its weights' file and mode
    (``top_layers`` > 0: what the layers below the top ``top_layers`` give, :meth:`CharEncoder.freeze`)."""
    path = Path(resolve_encoder(name_or_path))
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stamp = tuple((str(w.resolve()), w.stat().st_size, w.stat().st_mtime_ns) for w in weights)
    return _FEATURE_CACHES.setdefault((str(path.resolve()), stamp, last4_mean, top_layers), FeatureCache())


class CharEncoder(nn.Module):
    """BERT over ``[CLS] chars [SEP]`` -> one vector per character, (B, N, d_bert)."""

    def __init__(self, bert: nn.Module, last4_mean: bool = True):
        super().__init__()
        self.bert = bert
        self.last4_mean = last4_mean
        self.out_dim = int(bert.config.hidden_size)
        self.frozen = False  # no layer trains (see freeze)
        self.top_layers = 0  # > 0: only the top this many layers train, over cached lower ones
        self.cache: FeatureCache | None = None
        self.source = ""  # name or folder the weights were loaded from (set by the loader)

    def freeze(self, cache: FeatureCache | None = None, top_layers: int = 0) -> None:
        """Make the encoder a fixed feature extractor: no gradient, its dropout off for good, and,
        with ``cache``, each distinct sentence encoded once, alone and unpadded (so equal to the
        uncached features up to float rounding, and the same whatever batch first met it).

        ``top_layers`` = k > 0 freezes all but the top k Transformer layers: the frozen part
        (embeddings and the layers below) runs once per sentence and ``cache`` keeps what it
        gives, the top k layers run every step and train. Their output equals the whole
        encoder's up to float rounding (tests/test_encoder_top.py)."""
        layers = self._layers()
        if top_layers and not 0 < top_layers <= len(layers):
            raise ValueError(f"top_layers={top_layers}: the encoder has {len(layers)} layers")
        self.frozen = not top_layers
        self.top_layers = top_layers
        self.cache = cache
        for p in self.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - top_layers :] if top_layers else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def _layers(self) -> nn.ModuleList:
        try:
            return self.bert.encoder.layer  # BERT-like models of transformers
        except AttributeError:
            raise ValueError(
                f"{type(self.bert).__name__} has no encoder.layer list: only the whole encoder can "
                "be fine-tuned or frozen (train.encoder_top_layers=0)"
            ) from None

    def train(self, mode: bool = True) -> CharEncoder:
        super().train(mode)
        if self.frozen or self.top_layers:
            self.bert.eval()  # the frozen part never drops out: its cached features are fixed
            layers = self._layers()
            for layer in layers[len(layers) - self.top_layers :] if self.top_layers else []:
                layer.train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chars: int) -> torch.Tensor:
        if self.top_layers:
            return self._top(input_ids, attention_mask, n_chars)
        if not self.frozen:
            return self._encode(input_ids, attention_mask, n_chars)
        with torch.no_grad():
            if self.cache is None:
                return self._encode(input_ids, attention_mask, n_chars)
            return self._cached(input_ids, attention_mask, n_chars)

    def _lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, compute) -> list:  # noqa: ANN001
        """Per sentence, ``compute(ids, mask)`` of it alone and unpadded ([CLS] chars [SEP]): from
        the cache when it has it, else computed once and kept (under the cache's float cap)."""
        cache = self.cache
        widths = attention_mask.sum(dim=1).tolist()  # characters + [CLS] and [SEP]
        keys = [tuple(row[:w]) for row, w in zip(input_ids.tolist(), widths)]
        out = []
        for b, k in enumerate(keys):
            value = cache.get(k) if cache is not None else None
            if value is None:
                # Normal tensors even under evaluation's inference mode: training reuses them later.
                # Each sentence encoded alone, unpadded: its features then do not depend on which
                # batch (of which padded width) first met it, so a cell's result does not depend on
                # the cells a sweep process ran before it. Each is encoded once, so this costs little.
                with torch.inference_mode(False), torch.no_grad():
                    ids = input_ids[b : b + 1, : widths[b]].clone()
                    mask = attention_mask[b : b + 1, : widths[b]].clone()
                    value = compute(ids, mask)
                size = sum(t.numel() for t in value) if isinstance(value, tuple) else value.numel()
                if cache is not None and cache.floats + size <= FEATURE_CACHE_MAX_FLOATS:
                    cache[k] = value
                    cache.floats += size
            out.append(value)
        return out

    def _cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chars: int) -> torch.Tensor:
        def features(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self._encode(ids, mask, ids.size(1) - 2).float()[0].cpu().clone()

        return _padded(self._lookup(input_ids, attention_mask, features), n_chars, input_ids.device)

    def _top(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chars: int) -> torch.Tensor:
        """The top ``top_layers`` layers over the frozen part's cached output (see :meth:`freeze`)."""
        layers = self._layers()
        first = len(layers) - self.top_layers  # index of the first trained layer
        # hidden_states[i]: the embeddings (i = 0) or layer i's output; the features average the
        # last four of them (or take the last), some of which may lie in the frozen part.
        n_states = len(layers) + 1
        window = range(max(0, n_states - 4), n_states) if self.last4_mean else range(n_states - 1, n_states)

        def lower(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            states = self.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            frozen = [states[i] for i in window if i <= first]
            fixed = torch.stack(frozen).sum(dim=0) if frozen else torch.zeros_like(states[first])
            return states[first].float()[0].cpu().clone(), fixed.float()[0].cpu().clone()

        cached = self._lookup(input_ids, attention_mask, lower)
        width, device = input_ids.size(1), input_ids.device
        hidden = _padded([h for h, _ in cached], width, device)
        fixed = _padded([f for _, f in cached], width, device)
        # Additive mask over the keys (B, 1, 1, width): padded positions take no attention.
        keep = attention_mask[:, None, None, :].to(hidden.dtype)
        mask = (1.0 - keep) * torch.finfo(hidden.dtype).min
        total = fixed
        for i, layer in enumerate(layers[first:], start=first + 1):
            hidden = layer(hidden, attention_mask=mask)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
            if i in window:
                total = total + hidden
        return (total / len(window))[:, 1 : n_chars + 1]

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_chars: int) -> torch.Tensor:
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.last4_mean,
        )
        if self.last4_mean:
            layers = out.hidden_states[-4:]  # fewer than 4 layers: mean of what exists
            hidden = torch.stack(layers, dim=0).mean(dim=0)
        else:
            hidden = out.last_hidden_state
        return hidden[:, 1 : n_chars + 1]  # drop [CLS] and everything after the last character


def _padded(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Per-sentence (n_b, d) features -> (B, width, d) on ``device``, zeros after each row's end."""
    out = torch.zeros(len(rows), width, rows[0].size(-1), device=device)
    for b, row in enumerate(rows):
        out[b, : row.size(0)] = row.to(device)
    return out


# The People's Daily character vectors, relative to the folder above the dataset root (shared/).
VECTORS_REL = Path("pretrained") / "people2014_char_w2v_50d" / "char_vec.txt"


def vectors_path(spec: str | None, data_root: str | Path | None = None) -> Path | None:
    """A vectors setting -> its file: ``none`` (or empty) -> None; ``default`` -> the People's Daily
    vectors beside the dataset root (``shared/pretrained``); anything else is a path."""
    if spec is None or spec.lower() in ("none", ""):
        return None
    if spec != "default":
        path = Path(spec)
    else:
        from crener.data.datasets import resolve_data_root

        path = resolve_data_root(data_root).parent / VECTORS_REL
    if not path.is_file():
        raise DataError("character vectors not found (pass a word2vec file's path, or none)", str(path))
    return path
