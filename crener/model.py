"""CRENER (method.md §2): encoder -> adapted Transformer -> grid convolution rounds with relation
enhancement -> biaffine + MLP co-predictor.

Every ablation flag of :class:`crener.config.ModelConfig` is resolved in ``__init__``: a removed
part is ``None`` and ``forward`` checks ``is None`` once, so an ablated module is neither built
nor called. ``FAMILY`` at the end registers CRENER in :mod:`crener.registry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crener.config import ModelConfig, RuntimeConfig
from crener.data.batching import Batch
from crener.encoder import CharEncoder
from crener.identity import ENCODER_FIELDS, GRID_FIELDS, GRID_TASK_FIELDS, TRANSFORMER_FIELDS
from crener.layers import AdaptedTransformer, BiLSTM, CoPredictor, GridConvModule, masked_row_col_max
from crener.registry import ModelFamily
from crener.search import space_crener
from crener.tasks import GridTask, Task

# Tag kinds per scheme (eq. 10 concatenates one d_r slice per kind).
TAG_KINDS = {"crener": 4, "w2ner": 2, "ht_only": 2}


class RelationEnhancement(nn.Module):
    """Eqs 11-15: recover subject/object features from the tag grid and refeed them.

    Weights are shared across rounds (TOE). ``block="bert_layer"`` swaps the attention steps for
    TOE's full decoder layer (inner residuals, a GELU FFN), followed by the same outer residual.
    """

    def __init__(self, tag_width: int, hidden: int, heads: int, dropout: float, block: str = "paper"):
        super().__init__()
        self.rec_s = nn.Linear(tag_width, hidden)
        self.rec_o = nn.Linear(tag_width, hidden)
        # Sequence-first modules fed contiguous (N, B, d) inputs (see _mha); the parameters are
        # those of a batch_first module, so checkpoints are unaffected.
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout)
        self.block = block
        if block == "bert_layer":
            self.norm_self = nn.LayerNorm(hidden)
            self.norm_cross = nn.LayerNorm(hidden)
            self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            self.norm_ffn = nn.LayerNorm(hidden)
            self.drop = nn.Dropout(dropout)
        self.out_s = nn.Linear(hidden, hidden)
        self.out_o = nn.Linear(hidden, hidden)
        self.norm_s = nn.LayerNorm(hidden)
        self.norm_o = nn.LayerNorm(hidden)

    @staticmethod
    def _mha(
        attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor
    ) -> torch.Tensor:
        """``attn`` over (B, N, d) inputs, computed sequence-first on contiguous copies.

        A batch_first module transposes its inputs to (N, B, d) views, and under bf16 autocast
        the input projection of such a view runs as a batched matmul against the weight expanded
        N times, a copy of N weight matrices per call (most of an evaluation step at paper widths
        with bf16; reports/performance.md). Same function, same dropout draws.
        """
        q_t = q.transpose(0, 1).contiguous()
        kv_t = q_t if kv is q else kv.transpose(0, 1).contiguous()
        return attn(q_t, kv_t, kv_t, key_padding_mask=pad, need_weights=False)[0].transpose(0, 1)

    def _attend(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a = self._mha(self.self_attn, x, x, pad)
        if self.block == "bert_layer":
            a = self.norm_self(x + self.drop(a))
            c = self._mha(self.cross_attn, a, memory, pad)
            c = self.norm_cross(a + self.drop(c))
            return self.norm_ffn(c + self.drop(self.ffn(c)))
        return self._mha(self.cross_attn, a, memory, pad)

    def forward(self, tf, grid_mask, char_mask, s, o, s_base, o_base):
        pad = ~char_mask
        # eq. 11: per subject i the max over objects j, per object j the max over subjects i
        m_s, m_o = masked_row_col_max(tf, grid_mask)
        h_s, h_o = self.rec_s(m_s), self.rec_o(m_o)
        h_s = self._attend(h_s, s_base, pad)  # eqs 12-13
        h_o = self._attend(h_o, o_base, pad)
        s = self.norm_s(s + F.gelu(self.out_s(h_s)))  # eqs 14-15: residual on the round's input
        o = self.norm_o(o + F.gelu(self.out_o(h_o)))
        return s, o


class CRENER(nn.Module):
    """The full model; see the module docstring. ``forward(batch) -> {"logits": (B, N, N, L)}``."""

    def __init__(
        self, cfg: ModelConfig, num_labels: int, encoder: CharEncoder, runtime: RuntimeConfig | None = None
    ):
        super().__init__()
        self.cfg = cfg
        runtime = runtime or RuntimeConfig()
        # Exact rewrites only (crener.config.RuntimeConfig): they change speed and memory, never a score.
        self.checkpoint_rounds, self.checkpoint_above = runtime.checkpoint_rounds, runtime.checkpoint_above
        d = cfg.hidden
        self.encoder = encoder
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.proj = nn.Linear(encoder.out_dim, d)
        self.transformer = None
        self.lstm = None
        if cfg.context == "transformer":
            self.transformer = AdaptedTransformer(
                d, cfg.tf_layers, cfg.tf_heads, cfg.tf_ff, cfg.tf_dropout,
                key_proj=cfg.key_proj, out_proj=cfg.attn_out_proj, scale=cfg.attn_scale, rel_pos=cfg.rel_pos,
            )  # fmt: skip
        elif cfg.context == "bilstm":
            self.lstm = BiLSTM(d, d)
        self.concat_proj = nn.Linear(2 * d, d) if cfg.concat_bert and cfg.context != "none" else None
        # Without the MLP predictor and with the biaffine on H (the default), nothing downstream
        # reads the grid branch: it would get no gradient and change no score (method.md §3,
        # as in W2NER's own "-MLP" ablation), so it is not built at all.
        grid_branch = cfg.use_grid_mlp or cfg.biaffine_input == "enhanced"
        self.subj = nn.Linear(d, d) if grid_branch else None  # eq. 4
        self.obj = nn.Linear(d, d) if grid_branch else None
        attn_heads = cfg.tf_heads if cfg.attn_matrix == "transformer_probs" else 0
        self.grid = None if not grid_branch else GridConvModule(
            d, cfg.conv_channels,
            dist_dim=cfg.dist_dim if cfg.use_distance_embedding else 0,
            region_dim=cfg.region_dim if cfg.use_region_embedding else 0,
            attn_heads=attn_heads, attn_dim=cfg.attn_dim, dropout=cfg.conv_dropout,
            dilations=cfg.dilations if cfg.use_dilated_conv else None,
            chain=cfg.dconv_chain, orientation=cfg.cln_orientation,
            input_form=runtime.grid_input, space_to_batch=runtime.space_to_batch,
            fused_conv=runtime.fused_conv,
        )  # fmt: skip
        kinds = TAG_KINDS[cfg.tag_scheme]
        grid_dim = self.grid.out_dim if grid_branch else 0
        self.tag_proj = None
        self.enhance = None
        if cfg.use_relation_enhancement and grid_branch:
            self.tag_proj = nn.Linear(grid_dim, kinds * cfg.tag_dim)  # eqs 9-10, one slice per tag kind
            grid_dim = kinds * cfg.tag_dim
            self.enhance = RelationEnhancement(grid_dim, d, cfg.enh_heads, cfg.enh_dropout, cfg.enh_block)
        self.rounds = cfg.rounds
        self.predictor = CoPredictor(
            num_labels, char_dim=d, grid_dim=grid_dim, biaffine_dim=cfg.biaffine_dim, ffn_dim=cfg.ffn_dim,
            dropout=cfg.out_dropout, use_biaffine=cfg.use_biaffine, use_mlp=cfg.use_grid_mlp,
            fast_dropout=cfg.fast_dropout,
        )  # fmt: skip

    def _round(
        self, s: torch.Tensor, o: torch.Tensor, gmask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """One convolution pass and its tag projection (eqs 5-10): the unit checkpointing recomputes."""
        q = self.grid(s, o, gmask, attn)  # (B, N, N, C)
        return self.tag_proj(q) if self.tag_proj is not None else q

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cmask, gmask = batch.char_mask, batch.grid_mask  # (B, N), (B, N, N)
        x = self.encoder(batch.input_ids, batch.attention_mask, batch.n)  # (B, N, d_bert)
        x = self.proj(self.emb_dropout(x))  # (B, N, d_h)
        h, attn = x, None
        if self.transformer is not None:
            h, attn = self.transformer(x, cmask)  # attn: (B, heads, N, N)
        elif self.lstm is not None:
            h = self.lstm(x, batch.lengths)
        if self.concat_proj is not None:
            h = self.concat_proj(torch.cat([x, h], dim=-1))
        if self.grid is None:  # biaffine over H alone ("w/o MLP")
            return {"logits": self.predictor(h, h, None)}
        s = s_base = self.subj(h)
        o = o_base = self.obj(h)
        n = gmask.size(1)
        ckpt = self.training and (self.checkpoint_rounds or 0 < self.checkpoint_above < n)
        for r in range(self.rounds):
            if ckpt:  # keeps only the round's tag grid, recomputes the rest in backward
                tf = checkpoint(self._round, s, o, gmask, attn, use_reentrant=False)
            else:
                tf = self._round(s, o, gmask, attn)  # (B, N, N, K * d_r)
            if self.enhance is not None and r < self.rounds - 1:
                s, o = self.enhance(tf, gmask, cmask, s, o, s_base, o_base)
        if self.cfg.biaffine_input == "enhanced":
            logits = self.predictor(s, o, tf)
        else:
            logits = self.predictor(h, h, tf)
        return {"logits": logits}


def build_crener(cfg: ModelConfig, task: Task, encoder: CharEncoder, runtime: RuntimeConfig) -> CRENER:
    return CRENER(cfg, task.num_labels, encoder, runtime)


# CRENER's own fields: context choice, attention matrix, relation enhancement, biaffine input.
CRENER_FIELDS = (
    "context", "concat_bert", "attn_matrix", "attn_dim", "use_relation_enhancement", "rounds", "tag_dim",
    "enh_heads", "enh_dropout", "enh_block", "biaffine_input",
)  # fmt: skip

FAMILY = ModelFamily(
    name="crener",
    build_model=build_crener,
    build_task=GridTask,
    fields=frozenset(ENCODER_FIELDS + GRID_FIELDS + GRID_TASK_FIELDS + TRANSFORMER_FIELDS + CRENER_FIELDS),
    # its settings, check and ablations: [families.crener] of crener/families.toml
    search_space=space_crener,
    label="CRENER",
    order=0,
    paper_row=True,
)
