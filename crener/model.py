"""CRENER (method.md §2): encoder -> adapted Transformer -> grid convolution rounds with relation
enhancement -> biaffine + MLP co-predictor.

Every ablation flag of :class:`crener.config.ModelConfig` is resolved in ``__init__``: a removed
part is ``None`` and ``forward`` checks ``is None`` once, so an ablated module is neither built
nor called. ``build_model`` is the one place that wires a config to a model family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from crener.config import ModelConfig
from crener.data.batching import Batch
from crener.data.features import NUM_DIST_IDS, NUM_REGION_IDS, distance_ids, region_ids
from crener.encoder import CharEncoder
from crener.layers import (
    MLP,
    AdaptedTransformer,
    Biaffine,
    BiLSTM,
    ConditionalLayerNorm,
    DilatedConvBlock,
    GridDropout,
    masked_row_col_max,
)
from crener.tasks import Task

# Tag kinds per scheme (eq. 10 concatenates one d_r slice per kind).
TAG_KINDS = {"crener": 4, "w2ner": 2, "ht_only": 2}


class GridConvModule(nn.Module):
    """One convolution pass (eqs 5-8): CLN, grid embeddings, 1x1 conv, dilated convs.

    Returns Q, (B, N, N, out_dim), zero on padded cells. ``attn_heads`` > 0 adds the attention
    matrix embedding E^a built from the Transformer's last-layer probabilities.
    """

    def __init__(
        self,
        hidden: int,
        channels: int,
        *,
        dist_dim: int = 0,
        region_dim: int = 0,
        attn_heads: int = 0,
        attn_dim: int = 0,
        dropout: float = 0.5,
        dilations: tuple[int, ...] | None = (1, 2, 3),
        chain: bool = False,
        orientation: str = "paper",
        input_form: str = "split",
        space_to_batch: bool = True,
    ):
        super().__init__()
        self.orientation = orientation
        self.input_form = input_form
        self.dropout = dropout
        self.cln = ConditionalLayerNorm(hidden, hidden)
        self.dist_emb = nn.Embedding(NUM_DIST_IDS, dist_dim) if dist_dim else None
        self.region_emb = nn.Embedding(NUM_REGION_IDS, region_dim) if region_dim else None
        self.attn_proj = nn.Linear(attn_heads, attn_dim) if attn_heads else None
        in_dim = hidden + dist_dim + region_dim + (attn_dim if attn_heads else 0)
        self.reduce = nn.Linear(in_dim, channels)  # the 1x1 convolution, channels-last
        self.dconv = DilatedConvBlock(channels, dilations, chain, space_to_batch) if dilations else None
        self.out_dim = self.dconv.out_dim if self.dconv is not None else channels

    def forward(
        self,
        s: torch.Tensor,
        o: torch.Tensor,
        mask: torch.Tensor,
        attn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        form = {"split": self._split, "concat": self._concat, "factored": self._factored}[self.input_form]
        c = form(s, o, mask, attn)  # (B, N, N, d_c), the same function in each form (tested)
        if self.dconv is not None:
            c = self.dconv(c, mask)  # (B, N, N, rates * d_c)
        return c

    def _concat(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """Eq. 7 as written: concatenate [CLN(s, o); E^d; E^r; E^a] on the grid, then the 1x1 conv."""
        b, n = s.size(0), s.size(1)
        v = self.cln(o, s) if self.orientation == "paper" else self.cln(s, o).transpose(1, 2)
        parts = [v]
        for emb, ids_fn in ((self.dist_emb, distance_ids), (self.region_emb, region_ids)):
            if emb is not None:
                parts.append(emb(ids_fn(n, s.device)).expand(b, -1, -1, -1))
        if self.attn_proj is not None:
            parts.append(self.attn_proj(attn.to(s.dtype).permute(0, 2, 3, 1)))
        x = torch.cat(parts, dim=-1)  # (B, N, N, in_dim)
        keep = self._channel_keep(b, x.size(-1), s)  # the same draws as the factored path
        if keep is not None:
            x = x * keep[:, None, None, :]
        return F.gelu(self.reduce(x)) * mask[..., None].to(x.dtype)

    def _split(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """Eq. 7 with only the CLN grid materialised (the default form).

        The 1x1 conv is linear, so it splits over the concatenated parts: the d_h-wide CLN grid
        goes through one large matmul, while each d_E-wide embedding goes through its small
        table (ids x d_c) before a one-hot matmul puts it on the grid, and the attention matrix
        through a heads -> d_c map. Channel dropout (a per-example mask on input channels) folds
        into gamma, beta and those small maps. This saves the (B, N, N, d_h + 3 d_E) concatenation
        and its dropout product, forward and backward, in every round.
        """
        w = self.reduce.weight  # (d_c, in_dim), column blocks: [CLN | dist | region | attn]
        keep = self._channel_keep(s.size(0), w.size(1), s)  # (B, in_dim) or None
        normed, gamma, beta = self._cln_factors(s, o, keep)  # (B, N, d_h) each
        if self.orientation == "paper":  # row i conditions, column j is normalised
            v = torch.addcmul(beta[:, :, None], gamma[:, :, None], normed[:, None])
        else:  # W2NER's code: the transpose, row i normalised, column j conditions
            v = torch.addcmul(beta[:, None], gamma[:, None], normed[:, :, None])
        c = F.linear(v, w[:, : normed.size(-1)], self.reduce.bias)  # (B, N, N, d_c)
        return F.gelu(self._small_parts(c, keep, attn)) * mask[..., None].to(c.dtype)

    def _cln_factors(
        self, s: torch.Tensor, o: torch.Tensor, keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised, gamma, beta) of the CLN grid, with channel dropout folded into gamma and beta."""
        x, cond = (o, s) if self.orientation == "paper" else (s, o)
        normed, gamma, beta = self.cln.parts(x, cond)  # (B, N, d_h) each
        if keep is not None:
            hidden = normed.size(-1)
            gamma = gamma * keep[:, None, :hidden]
            beta = beta * keep[:, None, :hidden]
        return normed, gamma, beta

    def _small_parts(
        self, c: torch.Tensor, keep: torch.Tensor | None, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """``c`` (B, N, N, d_c) plus the 1x1 conv of the distance, region and attention parts.

        Each embedding goes through its small table (ids x d_c, channel dropout folded in) and a
        one-hot matmul puts it on the grid: a gather's backward (index_put with accumulation into
        a 20-row table) cost more than the whole forward of this part.
        """
        n = c.size(1)
        w = self.reduce.weight
        col = self.cln.gamma.out_features
        onehots, projs = [], []
        for emb, ids_fn in ((self.dist_emb, distance_ids), (self.region_emb, region_ids)):
            if emb is None:
                continue
            dim = emb.embedding_dim
            table = emb.weight[None]  # (1, ids, d_E)
            if keep is not None:
                table = table * keep[:, None, col : col + dim]
            projs.append(table @ w[:, col : col + dim].t())  # (B or 1, ids, d_c)
            onehots.append(F.one_hot(ids_fn(n, c.device), emb.num_embeddings))  # (N, N, ids)
            col += dim
        if projs:
            onehot = torch.cat(onehots, dim=-1).reshape(n * n, -1).to(c.dtype)
            proj = torch.cat(projs, dim=1)  # (B or 1, ids, d_c): all with dropout or none
            c = c + torch.matmul(onehot, proj).reshape(-1, n, n, c.size(-1))  # broadcast over B if 1
        if self.attn_proj is not None:
            c = c + self._attn_part(attn.to(c.dtype), w[:, col:], keep[:, col:] if keep is not None else None)
        return c

    def _attn_part(self, probs: torch.Tensor, w_a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The attention embedding through the 1x1 conv: (B, heads, N, N) -> (B, N, N, d_c)."""
        if keep is not None:
            w_a = w_a[None] * keep[:, None, :]  # (B, d_c, d_E)
        w_eff = w_a @ self.attn_proj.weight  # (B or -, d_c, heads): attn_proj then the 1x1 conv
        b_eff = w_a @ self.attn_proj.bias  # (B or -, d_c)
        if w_eff.dim() == 2:
            return torch.einsum("bhij,ch->bijc", probs, w_eff) + b_eff
        return torch.einsum("bhij,bch->bijc", probs, w_eff) + b_eff[:, None, None, :]

    def _factored(
        self, s: torch.Tensor, o: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor | None
    ) -> torch.Tensor:
        """C = GELU(Conv1x1(Dropout2d([CLN(s, o); E^d; E^r; E^a]))), the input of the dilated convs.

        Computed without materialising the concatenated (B, N, N, d_h + 3 d_E) input: the 1x1
        conv is linear, so it is applied to each part separately (the CLN grid through its
        factors, each embedding through its small table), and channel dropout, a per-example
        mask on input channels, folds into those factors. Same function as the naive form (a
        test checks it). Not the default: its (B, N, d_c, d_h) factor is no smaller than the grid
        while N < d_c, and on CPU it measured slower (W2NER at paper widths: 10.1 vs 12.5
        training sentences/s, 2.9 vs 2.4 GB peak, `crener bench --suite levers`).
        """
        w = self.reduce.weight  # (d_c, in_dim), column blocks: [CLN | dist | region | attn]
        keep = self._channel_keep(s.size(0), w.size(1), s)  # (B, in_dim) or None
        # CLN part: out[i, j] = W_v (gamma_i * n_j + beta_i), rows condition, columns are normalised.
        normed, gamma, beta = self._cln_factors(s, o, keep)  # (B, N, d_h) each
        w_v = w[:, : normed.size(-1)]
        g = gamma[:, :, None, :] * w_v[None, None]  # (B, N, d_c, d_h): W_v diag(gamma_i)
        c = torch.matmul(g, normed.transpose(1, 2)[:, None])  # (B, N, d_c, N): row i, column j
        c = c.transpose(2, 3) + (beta @ w_v.t())[:, :, None, :]  # (B, N, N, d_c)
        if self.orientation != "paper":
            c = c.transpose(1, 2)  # W2NER code: normalise the row, condition on the column
        return F.gelu(self._small_parts(c + self.reduce.bias, keep, attn)) * mask[..., None].to(c.dtype)

    def _channel_keep(self, b: int, width: int, like: torch.Tensor) -> torch.Tensor | None:
        """Dropout2d's per-example channel mask, scaled by 1 / (1 - p); None when inactive."""
        if not self.training or self.dropout == 0.0:
            return None
        keep = torch.empty(b, width, device=like.device, dtype=like.dtype).bernoulli_(1 - self.dropout)
        return keep / (1 - self.dropout)


class RelationEnhancement(nn.Module):
    """Eqs 11-15: recover subject/object features from the tag grid and refeed them.

    Weights are shared across rounds (TOE). ``block="bert_layer"`` swaps the attention steps for
    TOE's full decoder layer (inner residuals, a GELU FFN), followed by the same outer residual.
    """

    def __init__(self, tag_width: int, hidden: int, heads: int, dropout: float, block: str = "paper"):
        super().__init__()
        self.rec_s = nn.Linear(tag_width, hidden)
        self.rec_o = nn.Linear(tag_width, hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
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

    def _attend(self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        if self.block == "bert_layer":
            a = self.norm_self(x + self.drop(a))
            c = self.cross_attn(a, memory, memory, key_padding_mask=pad, need_weights=False)[0]
            c = self.norm_cross(a + self.drop(c))
            return self.norm_ffn(c + self.drop(self.ffn(c)))
        return self.cross_attn(a, memory, memory, key_padding_mask=pad, need_weights=False)[0]

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


class CoPredictor(nn.Module):
    """Biaffine over character pairs plus an MLP over grid features; scores are summed (eqs 16-18)."""

    def __init__(
        self,
        num_labels: int,
        *,
        char_dim: int,
        grid_dim: int,
        biaffine_dim: int,
        ffn_dim: int,
        dropout: float,
        use_biaffine: bool = True,
        use_mlp: bool = True,
        fast_dropout: bool = False,
    ):
        super().__init__()
        self.dropout = GridDropout(dropout, fast_dropout)
        self.mlp_s = MLP(char_dim, biaffine_dim, dropout, fast_dropout) if use_biaffine else None
        self.mlp_o = MLP(char_dim, biaffine_dim, dropout, fast_dropout) if use_biaffine else None
        self.biaffine = Biaffine(biaffine_dim, num_labels) if use_biaffine else None
        self.mlp_rel = MLP(grid_dim, ffn_dim, dropout, fast_dropout) if use_mlp else None
        self.linear = nn.Linear(ffn_dim, num_labels) if use_mlp else None

    @torch.no_grad()
    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Start each label's score at ``bias`` (its prior log-odds, say) instead of about 0.

        The summed score has two constant terms, the MLP head's bias and the biaffine's [1; 1]
        entry of U (eq. 16); the first that exists takes ``bias`` and the other is zeroed, so every
        logit moves by exactly ``bias`` minus the old constant."""
        bias = bias.to(self.biaffine.weight if self.biaffine is not None else self.linear.weight)
        affine_const = None
        if self.biaffine is not None and self.biaffine.bias_x and self.biaffine.bias_y:
            affine_const = self.biaffine.weight[:, -1, -1]
        if self.linear is not None:
            self.linear.bias.copy_(bias)
            if affine_const is not None:
                affine_const.zero_()
        elif affine_const is not None:
            affine_const.copy_(bias)
        else:
            raise ValueError("the biaffine was built without its constant term: no output bias to set")

    def forward(self, s: torch.Tensor, o: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        logits = None
        if self.biaffine is not None:
            logits = self.biaffine(self.dropout(self.mlp_s(s)), self.dropout(self.mlp_o(o)))
        if self.mlp_rel is not None:
            y = self.linear(self.dropout(self.mlp_rel(grid)))
            logits = y if logits is None else logits + y
        return logits  # (B, N, N, L)


class CRENER(nn.Module):
    """The full model; see the module docstring. ``forward(batch) -> {"logits": (B, N, N, L)}``."""

    def __init__(self, cfg: ModelConfig, num_labels: int, encoder: CharEncoder):
        super().__init__()
        self.cfg = cfg
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
            input_form=cfg.grid_input, space_to_batch=cfg.space_to_batch,
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
        for r in range(self.rounds):
            if self.cfg.checkpoint_rounds and self.training:
                q = checkpoint(self.grid, s, o, gmask, attn, use_reentrant=False)
            else:
                q = self.grid(s, o, gmask, attn)  # (B, N, N, C)
            tf = self.tag_proj(q) if self.tag_proj is not None else q  # (B, N, N, K * d_r)
            if self.enhance is not None and r < self.rounds - 1:
                s, o = self.enhance(tf, gmask, cmask, s, o, s_base, o_base)
        if self.cfg.biaffine_input == "enhanced":
            logits = self.predictor(s, o, tf)
        else:
            logits = self.predictor(h, h, tf)
        return {"logits": logits}


def build_model(cfg: ModelConfig, task: Task, encoder: CharEncoder) -> nn.Module:
    """Wire a config to a model family. Baselines live in ``baselines/`` and are imported lazily."""
    if cfg.name == "crener":
        return CRENER(cfg, task.num_labels, encoder)
    import importlib

    try:
        module = importlib.import_module(f"baselines.{cfg.name}")
    except ModuleNotFoundError as exc:
        raise ValueError(f"model {cfg.name!r} is not available: {exc}") from exc
    return module.build_model(cfg, task, encoder)
