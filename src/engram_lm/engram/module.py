"""The Engram fusion module of one layer (ENGRAM_SPEC s.4, with the V4.1 layout of s.8).

    e_t   = concat of the N-gram rows looked up for token t         (d_mem)
    k^(m) = W_K^(m) e_t,  v = W_V e_t                                (one fused matmul)
    a^(m) = sigmoid(squash(RMSNorm(h^(m)) . RMSNorm(k^(m)) / sqrt(D)))
    u^(m) = a^(m) * v
    Y     = u + SiLU(Conv1D(RMSNorm(u)))                             (if use_short_conv)

forward returns Y; the block adds it to the residual stream (H <- H + Y). With
branch_fusion off (the ablation of multi-branch fusion) the module reads the mean of the M
branches as one h, with one key projection, gate and conv norm, and adds the same Y to
every branch. Where the
table lives is decided when the model is assembled: `memory` is any module mapping
global row ids (..., H) to (..., H, head_dim).

Shape legend: B batch, T positions, M branches, G fused branches (M, or 1), D hidden,
H hash columns, E = d_mem.
"""

from __future__ import annotations

import torch
from torch import nn

from engram_lm.config import EngramConfig
from engram_lm.engram.conv import ConvState, ShortConv
from engram_lm.engram.gate import ContextGate
from engram_lm.memory.dense import DenseTable


class Engram(nn.Module):
    def __init__(self, config: EngramConfig, num_rows: int, *, memory: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        G, D = self.fused_branches, config.hidden_size
        self.memory = memory if memory is not None else DenseTable(num_rows, config.head_dim)
        # rows of key_value.weight: G key projections (one per fused branch), then the shared value
        self.key_value = nn.Linear(config.memory_dim, (G + 1) * D, bias=config.projection_bias)
        self.gate = ContextGate(G, D, config.gate_eps) if config.use_gating else None
        self.short_conv = (
            ShortConv(
                D,
                G,
                kernel_size=config.kernel_size,
                dilation=config.max_ngram,
                eps=config.conv_eps,
                zero_init=config.zero_init_conv,
            )
            if config.use_short_conv
            else None
        )
        if config.zero_init_output:
            self.zero_output_()

    @property
    def fused_branches(self) -> int:
        """G: branches with their own key, gate and conv norm (M, or 1 without branch fusion)."""
        return self.config.num_branches if self.config.branch_fusion else 1

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero the value rows (and the bias): Y = 0 until training moves them."""
        nn.init.zeros_(self.key_value.weight[self.fused_branches * self.config.hidden_size :])
        if self.key_value.bias is not None:
            nn.init.zeros_(self.key_value.bias)

    def forward(
        self,
        h: torch.Tensor,
        rows_BTH: torch.Tensor,
        token_mask_BT: torch.Tensor | None = None,
        conv_state: ConvState | None = None,
    ) -> torch.Tensor:
        """h: (B, T, M, D), or (B, T, D) when M = 1; rows_BTH: global row ids (int64).
        token_mask_BT (bool, optional): False forces the gate to 0 (V4.1's token mask).
        conv_state: streaming state of the short conv when decoding (see ShortConv).
        Returns Y with the shape of h."""
        h_BTMD = self._as_branches(h, rows_BTH)
        G, D = self.fused_branches, self.config.hidden_size
        h_BTGD = h_BTMD if G == h_BTMD.shape[2] else h_BTMD.mean(dim=2, keepdim=True)
        e_BTHd = self.memory(rows_BTH)
        if self.config.row_dropout > 0:  # regulariser against memorising repeated data
            e_BTHd = drop_rows(e_BTHd, self.config.row_dropout, self.training)
        e_BTE = e_BTHd.flatten(start_dim=-2)
        if self.config.dropout > 0:  # the same, element-wise
            e_BTE = nn.functional.dropout(e_BTE, self.config.dropout, self.training)
        kv_BTXD = self.key_value(e_BTE).unflatten(-1, (G + 1, D))
        k_BTGD, v_BTD = kv_BTXD[..., :G, :], kv_BTXD[..., G, :]
        if self.gate is not None:
            alpha_BTG = self.gate(h_BTGD, k_BTGD)
        else:
            alpha_BTG = torch.ones(h_BTGD.shape[:3], dtype=v_BTD.dtype, device=v_BTD.device)
        if token_mask_BT is not None:
            alpha_BTG = alpha_BTG * token_mask_BT.unsqueeze(-1).to(alpha_BTG.dtype)
        u_BTGD = alpha_BTG.unsqueeze(-1) * v_BTD.unsqueeze(2)
        y_BTGD = u_BTGD + self.short_conv(u_BTGD, conv_state) if self.short_conv is not None else u_BTGD
        if self.config.output_dropout > 0:  # the same, on what the residual stream receives
            y_BTGD = nn.functional.dropout(y_BTGD, self.config.output_dropout, self.training)
        y_BTMD = y_BTGD.expand_as(h_BTMD)  # without branch fusion: the same Y on every branch
        return y_BTMD if h.dim() == 4 else y_BTMD.squeeze(2)

    def _as_branches(self, h: torch.Tensor, rows_BTH: torch.Tensor) -> torch.Tensor:
        M, D = self.config.num_branches, self.config.hidden_size
        if h.dim() == 3 and M == 1:
            h = h.unsqueeze(2)
        if h.dim() != 4 or h.shape[2] != M or h.shape[3] != D:
            want = f"(B, T, {M}, {D})" + (f" or (B, T, {D})" if M == 1 else "")
            raise ValueError(
                f"hidden states have shape {tuple(h.shape)}, this Engram expects {want}; "
                "check hidden_size and num_branches in the EngramConfig"
            )
        H = self.config.num_hash_columns
        if rows_BTH.dtype != torch.int64 or rows_BTH.shape != (*h.shape[:2], H):
            raise ValueError(
                f"row ids must be int64 of shape (B, T, {H}) matching the hidden states, got "
                f"{rows_BTH.dtype} {tuple(rows_BTH.shape)}; hash with NgramHasher(global_rows=True)"
            )
        return h


def drop_rows(e: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Whole-row dropout on retrieved rows e (..., H, d): while training, each row (one hash
    column's vector at one position) is zeroed with probability p, as a whole, and the kept
    ones are scaled by 1 / (1 - p); the identity otherwise. In the spirit of embedding
    dropout (Gal & Ghahramani 2016; AWD-LSTM, Merity et al. 2018), which drops a word's
    whole vector (there: per word type and sequence; here: per position and column), so the
    model cannot lean on any single table entry."""
    if not training or p == 0:
        return e
    return e * nn.functional.dropout(e.new_ones(*e.shape[:-1], 1), p, True)
