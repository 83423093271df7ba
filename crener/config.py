"""The one typed configuration of crener: model (with every ablation flag), data, training, run.

All dataclasses are frozen and every field has a default; the defaults are the paper's full
CRENER model (method.md §4.2). Variants (rows of Table 6) and profiles (smoke/quick/full/paper)
are named sets of overrides (:mod:`crener.profiles`) applied with :func:`RunConfig.with_overrides`,
never by mutation. This module is a leaf: it imports the standard library and
:mod:`crener.errors` only, so reading or building a config loads no model family and no torch;
run identity lives in :mod:`crener.identity`.
Values that come from the data (the number of labels, the vocabulary) are arguments of
``build_model`` and are never written back here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from crener.errors import ConfigError

# Validation limits (no field or default is defined here).
# The position table of every character encoder crener builds or loads (BERT's 512; crener.encoder
# uses it); [CLS] and [SEP] take two, so a piece of a sentence holds at most 510 characters.
ENCODER_POSITIONS = 512
MIN_LEN, MAX_LEN = 8, ENCODER_POSITIONS - 2  # bounds of data.max_len
# Widths, depths, head counts and caps that must be >= 1.
POSITIVE_MODEL_FIELDS = (
    "embedded_hidden", "embedded_layers", "embedded_heads", "embedded_ff", "hidden", "tf_layers",
    "tf_heads", "tf_ff", "dist_dim", "region_dim", "attn_dim", "conv_channels", "tag_dim", "enh_heads",
    "biaffine_dim", "ffn_dim", "max_paths", "lstm_hidden",
)  # fmt: skip
DROPOUT_FIELDS = ("emb_dropout", "tf_dropout", "conv_dropout", "enh_dropout", "out_dropout")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Section numbers refer to method.md."""

    name: str = (
        "crener"  # which model family (crener.registry): crener | w2ner | bert_softmax | bert_crf | tener
    )
    # --- character encoder (§2.1) ---
    encoder: str = "embedded"  # "embedded" (local random BERT) or a from_pretrained name/path
    embedded_hidden: int = 256  # width of the embedded BERT-shaped encoder
    embedded_layers: int = 2  # its depth
    embedded_heads: int = 4  # its attention heads
    embedded_ff: int = 1024  # its feed-forward width
    last4_mean: bool = True  # mean of the last four hidden layers (W2NER resume-zh)
    emb_dropout: float = 0.5  # dropout on encoder output before the projection to d_h
    # Pretrained vectors for a family's own character embeddings (TENER: its paper started from
    # Gigaword's): none | default (the People's Daily 50-d vectors in shared/pretrained) | a
    # word2vec text file. The path is keyed as written: a file's contents are the user's to version.
    char_vectors: str = "none"
    hidden: int = 512  # d_h, width of character representations
    # --- context layer (§2.1 step 4); "none" is Table 6's "w/o Transformer" ---
    context: str = "transformer"  # transformer | none | bilstm (W2NER's BiLSTM)
    tf_layers: int = 2  # adapted Transformer layers
    tf_heads: int = 8  # its heads (head dim = hidden / heads)
    tf_ff: int = 1024  # its feed-forward width
    tf_dropout: float = 0.15  # hidden and attention dropout (TENER)
    key_proj: bool = True  # project keys (CRENER text); False = TENER code
    attn_out_proj: bool = False  # output projection after concatenating heads (TENER: none)
    attn_scale: bool = False  # 1/sqrt(d_k) scaling (diagnostic only; unscaled is faithful)
    rel_pos: str = "full"  # full | none | symmetric relative positions (extra ablation)
    concat_bert: bool = False  # H = Linear([BERT; Transformer]) instead of the Transformer output
    # --- grid features (§2.3) ---
    cln_orientation: str = "paper"  # paper: row conditions column; code: W2NER's transpose
    use_distance_embedding: bool = True  # E^d; False is "w/o Distance matrix"
    use_region_embedding: bool = True  # E^r; False is "w/o Region matrix"
    attn_matrix: str = "transformer_probs"  # E^a source: transformer_probs | none
    dist_dim: int = 20  # d_E of the distance embedding
    region_dim: int = 20  # d_E of the region embedding
    attn_dim: int = 20  # d_E of the attention-matrix embedding
    conv_channels: int = 96  # d_c
    conv_dropout: float = 0.5  # Dropout2d before the 1x1 conv
    use_dilated_conv: bool = True  # eq. 8; False is "w/o Dilated convolution"
    dilations: tuple[int, ...] = (1, 2, 3)  # dilation rates
    dconv_chain: bool = False  # chain the dilated convs (W2NER code) instead of parallel (paper)
    # --- relation enhancement (§2.3 eqs 9-10, §2.4) ---
    use_relation_enhancement: bool = True  # eqs 9-15; False is "w/o Enhancement"
    rounds: int = 3  # R convolution passes (R - 1 feedbacks)
    tag_dim: int = 96  # d_r per tag slice
    enh_heads: int = 8  # heads of the enhancement attentions
    enh_dropout: float = 0.1  # their dropout
    enh_block: str = "paper"  # paper | bert_layer (TOE's decoder layer)
    # Predictor dropouts from uniform draws instead of CPU bernoulli_: the same law, faster on CPU,
    # but off by default: not shown harmless to scores (reports/decisions.md).
    fast_dropout: bool = False
    # --- co-predictor (§2.5) ---
    use_biaffine: bool = True  # eq. 16; False is "w/o Biaffine"
    use_grid_mlp: bool = True  # eq. 17; False is "w/o MLP"
    biaffine_dim: int = 512  # d_b
    ffn_dim: int = 288  # hidden width of the MLP predictor
    out_dropout: float = 0.33  # dropout in both predictor halves
    biaffine_input: str = "encoder"  # encoder (H) | enhanced (S^(R), O^(R))
    # --- labels, loss, decoding (§1, §2.6) ---
    tag_scheme: str = "crener"  # crener (4 tags) | w2ner (NNW, THW); w2ner is "w/o relation"
    ht_typed: str = "both"  # both | thc_only: which head-tail tags carry the type
    loss: str = "zlpr"  # zlpr (multi-label threshold, eq. 19) | ce (softmax, W2NER scheme only)
    ht_mode: str = "union"  # decoder: union | intersect | thc_only
    link_mode: str = "and"  # decoder: and | nnc_only | or
    contiguous_only: bool = False  # decoder: only k = m + 1 successors (diagnostic)
    max_paths: int = 1000  # decoder: cap on paths per head-tail candidate
    # Start each output score at its training label prior (ZLPR: log-odds; CE: log prior) instead
    # of about 0; positive cells are rare, so a 0 start spends its first steps pushing all down.
    prior_bias: bool = False
    # Decoder: after training, move every decision threshold by the one shift (evaluation's
    # CALIBRATION_SHIFTS) with the best dev F1, and decode test and `crener predict` with it. An
    # undertrained grid model ranks entity cells first before its scores cross 0 (`crener curves`).
    calibrate: bool = False
    lstm_hidden: int = 512  # total BiLSTM width when context = bilstm

    def __post_init__(self) -> None:
        # Checks that need no model family; what a family can build is checked where a run is
        # built (crener.registry.check_model), so building a config loads no family module.
        _check_choice("model.context", self.context, ("transformer", "none", "bilstm"))
        _check_choice("model.rel_pos", self.rel_pos, ("full", "none", "symmetric"))
        _check_choice("model.cln_orientation", self.cln_orientation, ("paper", "code"))
        _check_choice("model.attn_matrix", self.attn_matrix, ("transformer_probs", "none"))
        _check_choice("model.enh_block", self.enh_block, ("paper", "bert_layer"))
        _check_choice("model.biaffine_input", self.biaffine_input, ("encoder", "enhanced"))
        _check_choice("model.tag_scheme", self.tag_scheme, ("crener", "w2ner", "ht_only"))
        _check_choice("model.ht_typed", self.ht_typed, ("both", "thc_only"))
        _check_choice("model.loss", self.loss, ("zlpr", "ce"))
        _check_choice("model.ht_mode", self.ht_mode, ("union", "intersect", "thc_only"))
        _check_choice("model.link_mode", self.link_mode, ("and", "nnc_only", "or"))
        _check_positive("model", self, POSITIVE_MODEL_FIELDS)
        for name in DROPOUT_FIELDS:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: a dropout must be in [0, 1)")
        if self.context == "transformer" and self.hidden % self.tf_heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.tf_heads={self.tf_heads}"
            )
        if self.use_relation_enhancement and self.hidden % self.enh_heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.enh_heads={self.enh_heads}"
            )
        if self.embedded_hidden % self.embedded_heads:
            raise ConfigError(
                f"model.embedded_hidden={self.embedded_hidden} is not divisible by "
                f"model.embedded_heads={self.embedded_heads}"
            )
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ConfigError(f"model.dilations={self.dilations}: dilations must be positive integers")


def check_grid_fields(m: ModelConfig) -> None:
    """The combinations a grid model (CRENER, W2NER) cannot build; their families' ``check``."""
    if not (m.use_biaffine or m.use_grid_mlp):
        raise ConfigError(
            "model.use_biaffine and model.use_grid_mlp cannot both be false: no predictor left "
            "(set one of them to true, or use variant no_biaffine / no_mlp)"
        )
    if m.attn_matrix == "transformer_probs" and m.context != "transformer":
        raise ConfigError(
            "model.attn_matrix=transformer_probs needs model.context=transformer; "
            "set model.attn_matrix=none when the adapted Transformer is removed"
        )
    if m.loss == "ce" and m.tag_scheme != "w2ner":
        raise ConfigError("model.loss=ce is single-label and only fits model.tag_scheme=w2ner (§2.6)")
    if m.rounds < 1:
        raise ConfigError("model.rounds must be >= 1")
    if m.use_relation_enhancement and m.rounds < 2:
        raise ConfigError("relation enhancement needs model.rounds >= 2 (one feedback at least)")
    if not m.use_relation_enhancement and m.rounds != 1:
        raise ConfigError("without relation enhancement the conv module runs once: set model.rounds=1")
    if m.biaffine_input == "enhanced" and not m.use_relation_enhancement:
        raise ConfigError("model.biaffine_input=enhanced needs model.use_relation_enhancement=true")
    if m.tag_scheme == "w2ner" and m.ht_mode != "union":
        raise ConfigError("the W2NER scheme has THW only: leave model.ht_mode=union")


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is cut."""

    dataset: str = "resume"  # weibo | resume | ontonotes4 | msra (or a registered name)
    weibo_coarse: bool = False  # Weibo: 4 coarse types instead of the 8 fine labels
    msra_protocol: str = "lineage"  # MSRA has no dev: lineage (dev = test) | clean (last 4,365 train)
    max_len: int = 256  # longer sentences are split at punctuation, never inside an entity
    train_limit: int = 0  # >0: train on the first N sentences after a seeded shuffle (budgets)
    eval_limit: int = 0  # >0: evaluate dev on its first N sentences only
    test_limit: int = 0  # >0: score test on a fixed sample (seed 0) of N sentences; 0 = whole split

    def __post_init__(self) -> None:
        _check_choice("data.msra_protocol", self.msra_protocol, ("lineage", "clean"))
        if not MIN_LEN <= self.max_len <= MAX_LEN:
            raise ConfigError(
                f"data.max_len={self.max_len}: must be between {MIN_LEN} and {MAX_LEN} characters "
                f"(the character encoder reads at most {MAX_LEN}: {ENCODER_POSITIONS} positions less "
                "[CLS] and [SEP]; longer sentences are cut into pieces of max_len)"
            )
        for name in ("train_limit", "eval_limit", "test_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}={getattr(self, name)}: must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and evaluation (method.md §4)."""

    seed: int = 0  # seeds python, numpy and torch; logged with every run
    epochs: int = 10  # passes over the training split
    batch_size: int = 12  # sentences per batch when max_cells = 0 or sorted_batches
    max_cells: int = 0  # >0: batches hold at most this many grid cells (B * N^2), length-bucketed
    # The paper's batches: batch_size sentences from length-sorted buckets; max_cells (if > 0) is
    # then only a memory guard that splits a batch above it (logged).
    sorted_batches: bool = False
    lr: float = 1e-3  # learning rate of everything but the pretrained encoder
    encoder_lr: float = 5e-6  # learning rate of the pretrained (or embedded) encoder
    # With encoder_lr > 0: 0 fine-tunes the whole encoder; k > 0 only its top k Transformer
    # layers, the part below frozen and run once per sentence (its output cached), so a step
    # costs the top k layers' passes, not the whole encoder's. [UNK] replacement (unk_alpha)
    # needs the whole encoder: it is refused with k > 0.
    encoder_top_layers: int = 0
    weight_decay: float = 0.0  # AdamW weight decay
    warmup: float = 0.1  # fraction of steps with linear warm-up, then linear decay to 0
    clip: float = 5.0  # global gradient-norm clip
    # bf16 autocast (CUDA and CPU). Profiles and --set also take "auto", resolved by
    # crener.profiles.build_run_config to what this machine's measured matmul peaks favour
    # (crener.device.bf16_pays); the run records the value it got.
    bf16: bool = False
    max_steps: int = 0  # >0: at most this many optimiser steps per epoch (the first of its shuffled batches)
    # Fine-tuning input noise: each character becomes [UNK] with probability a / (a + its training
    # count), so rare characters most often and the [UNK] vector stays trained for unseen ones.
    unk_alpha: float = 0.0
    # >0: stop after this many epochs in a row without a better dev F1; the best checkpoint is
    # tested as always. The schedule keeps its planned length, so stopping only truncates it.
    patience: int = 0

    @property
    def caches_features(self) -> bool:
        """Whether the encoder (or its lower part) is frozen and read through the process-wide
        feature cache, so a sentence is encoded once, not at every step."""
        return self.encoder_lr == 0 or self.encoder_top_layers > 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs={self.epochs}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size={self.batch_size}: must be >= 1")
        if self.unk_alpha < 0:
            raise ConfigError(f"train.unk_alpha={self.unk_alpha}: must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed}: a seed must be >= 0")
        if self.encoder_top_layers and (self.unk_alpha or not self.encoder_lr):
            raise ConfigError(
                f"train.encoder_top_layers={self.encoder_top_layers} trains the encoder's top layers: it "
                f"needs train.encoder_lr > 0 (now {self.encoder_lr}) and train.unk_alpha = 0 (now "
                f"{self.unk_alpha}; [UNK] inputs change every layer's output, so the lower layers cannot be "
                "cached); set train.encoder_top_layers=0 to fine-tune the whole encoder"
            )
        for name in ("max_cells", "max_steps", "patience", "encoder_top_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 0 (0 = off)")
        if not self.lr > 0 or not self.encoder_lr >= 0:
            raise ConfigError(
                f"train.lr={self.lr} must be > 0 and train.encoder_lr={self.encoder_lr} >= 0 "
                "(0 freezes the encoder)"
            )
        if self.weight_decay < 0 or not self.clip > 0 or not 0 <= self.warmup <= 1:
            raise ConfigError(
                f"train.weight_decay={self.weight_decay} must be >= 0, train.clip={self.clip} > 0 "
                f"and train.warmup={self.warmup} in [0, 1]"
            )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast a run runs: fields that cannot change its result.

    Each one only places the work or rewrites it exactly (each rewrite tested equal to the plain
    form), so run identity (:mod:`crener.identity`) skips this whole section: changing one keeps
    a run's key, and a sweep finds its finished runs wherever and however they ran.
    """

    # Where the dataset files are; their digest, not their place, is in the key.
    # None: --data-root, then $CRENER_DATA, then ../shared/data.
    data_root: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; devices differ only in float rounding
    threads: int = 0  # >0: torch.set_num_threads
    # glibc: big tensors from the malloc heap instead of fresh mmaps that page-fault on every use
    # (process-wide, see crener.train.keep_large_tensors_on_heap). Off: within noise for cell-budget
    # batches, and with fixed batches of 12 faster but at about twice the peak memory
    # (`crener bench --suite levers`; figures: reports/performance.md).
    heap_tensors: bool = False
    # >0: a DataLoader with this many worker processes collates training batches ahead of the
    # step (pinned for CUDA); 0: collation in the training loop. The same batches either way.
    loader_workers: int = 0
    progress: bool = True  # progress bar with loss and speed
    # Grid-cell budget of evaluation batches (no dropout, padding-invariant predictions). Small
    # batches keep the (B, N, N, d) grids in cache, so on CPU they evaluate faster than 200k-cell
    # ones (`crener bench --suite levers`; figures: reports/performance.md). On a GPU larger
    # batches may pay: raise it there.
    eval_max_cells: int = 16_000
    # >0: dev F1 every N steps into curve.json (learning-start diagnostic); evaluation draws
    # nothing random, so the training run is the same.
    eval_every: int = 0
    # Exact rewrites of the grid module (tested equal), measured by `crener bench --suite levers`.
    # How the 1x1 conv meets its input: split (CLN grid through one matmul, embeddings through
    # their small tables) | concat (eq. 7 as written) | factored (nothing grid-sized before it);
    # the same dropout draws in each.
    grid_input: str = "split"
    # Dilated depthwise convs as undilated ones over interleaved sub-grids (CPU bf16 training).
    space_to_batch: bool = True
    # The dilated-conv group as one op: on CPU, crener/dconv.c (fp32 or fp64, and in fp32 when
    # training under bf16 autocast; chained rates one call a rate; built on first use, the library's
    # convs where no C compiler works); else GELU, masks and concatenation as one autograd op
    # around the library's convs.
    # False: the plain path.
    fused_conv: bool = True
    # Activation checkpointing of the conv rounds, always (recomputed in backward with the RNG
    # state restored) ...
    checkpoint_rounds: bool = False
    # ... and of the rounds of batches whose longest sentence is longer than this (0: never): long
    # grids then cost about half the memory, while the common lengths keep their speed.
    checkpoint_above: int = 256
    # Minutes this run was planned for (`--time-budget`, crener.budget): a record, not a setting;
    # what the minutes bought is in train.epochs and train.max_steps, which the key holds.
    time_budget: float = 0.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", self.device):
            raise ConfigError(f"runtime.device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        for name in ("threads", "loader_workers", "eval_every", "checkpoint_above"):
            if getattr(self, name) < 0:
                raise ConfigError(f"runtime.{name}={getattr(self, name)}: must be >= 0 (0 = off)")
        if self.eval_max_cells < 1:
            raise ConfigError(f"runtime.eval_max_cells={self.eval_max_cells}: must be >= 1")
        _check_choice("runtime.grid_input", self.grid_input, ("split", "concat", "factored"))


# The flat names the runtime fields had before they were one section. Old MLflow params, old
# sweep and tuning files and old --set habits use them; they keep working through these aliases.
RUNTIME_ALIASES: dict[str, str] = {
    f"{section}.{name}": f"runtime.{name}"
    for section, names in (
        ("data", ("data_root",)),
        ("train", ("progress", "device", "threads", "heap_tensors", "loader_workers", "eval_max_cells",
                   "eval_every")),
        ("model", ("grid_input", "space_to_batch", "checkpoint_rounds", "checkpoint_above")),
    )
    for name in names
}  # fmt: skip
SECTIONS = ("model", "data", "train", "runtime")  # the sections of RunConfig, as flat-name prefixes


def canonical_key(key: str) -> str:
    """The flat name a config key has today (``train.progress`` -> ``runtime.progress``)."""
    return RUNTIME_ALIASES.get(key, key)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. ``profile`` and ``variant`` are labels of the overrides applied."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    profile: str = "custom"
    variant: str = "full"

    @property
    def label(self) -> str:
        """``crener:full/resume/s0``: how logs, sweeps and MLflow run names show this run."""
        return run_label(self.model.name, self.variant, self.data.dataset, self.train.seed)

    def flatten(self) -> dict[str, Any]:
        """``{"model.hidden": 512, ..., "profile": "quick"}``: the form logged as MLflow params."""
        flat: dict[str, Any] = {"profile": self.profile, "variant": self.variant}
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                flat[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`flatten`; values may be strings (as MLflow returns them)."""
        return cls().with_overrides(flat)

    def with_overrides(self, overrides: dict[str, Any]) -> RunConfig:
        """A new config with ``{"section.field": value}`` applied; unknown keys are an error.

        The old flat names of the runtime fields (:data:`RUNTIME_ALIASES`) are accepted too."""
        sections: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in ("profile", "variant"):
                top[key] = str(value)
                continue
            section, _, name = canonical_key(key).partition(".")
            if section not in sections:
                expected = ", ".join(f"{s}.*" for s in SECTIONS)
                raise ConfigError(f"unknown config key {key!r} (expected {expected})")
            cls_ = type(getattr(self, section))
            hints = _type_hints(cls_)
            if name not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(cls_))
                close = difflib.get_close_matches(name, list(hints), n=1)
                hint = f"did you mean {section}.{close[0]}? " if close else ""
                raise ConfigError(f"unknown config key {key!r}; {hint}{section} has: {known}")
            sections[section][name] = _coerce(value, hints[name], key)
        replaced = {
            section: dataclasses.replace(getattr(self, section), **sections[section]) for section in SECTIONS
        }
        return dataclasses.replace(self, **replaced, **top)


def run_label(model: str, variant: str, dataset: str, seed: int | str) -> str:
    """``{model}:{variant}/{dataset}/s{seed}``, the one spelling of a run's label."""
    return f"{model}:{variant}/{dataset}/s{seed}"


def parse_set(items: list[str] | None) -> dict[str, str]:
    """``["model.hidden=64", ...]`` from ``--set`` into a dict (values coerced later)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. --set model.hidden=64), got {item!r}")
        out[key.strip()] = value.strip()
    return out


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # get_type_hints re-evaluates every annotation string (~70 ms a config); sweeps resolve hundreds.
    return typing.get_type_hints(cls)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_positive(section: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{section}.{name}={value}: must be a positive integer (>= 1)")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a CLI or MLflow string into the field's declared type (:class:`ConfigError` if it is
    not one)."""
    try:
        return _coerce_value(value, hint, key)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        kind = {int: "an integer", float: "a number", bool: "a boolean"}.get(hint)
        if typing.get_origin(hint) is tuple:
            kind = "integers separated by commas, e.g. 1,2,3"
        raise ConfigError(
            f"{key}: expected {kind or 'a value of type ' + str(hint)}, got {value!r}"
        ) from None


def _coerce_value(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value in ("None", "none", "")):
            return None
        return _coerce_value(value, args[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").replace(" ", "").split(",") if v]
        return tuple(int(v) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
    if hint is float:
        return float(value)
    return str(value)
