"""Context-aware gating (ENGRAM_SPEC s.4 and s.8), one gate per residual branch.

alpha = sigmoid(squash(RMSNorm(h; w_q) . RMSNorm(k; w_k) / sqrt(D))), with the demo's
squash s -> sign(s) * sqrt(max(|s|, 1e-6)). V4.1's folded form
sum(h * q_w * k_w * key) / (rms(h) rms(key) sqrt(D)) is the same number with w_q = q_w,
w_k = k_w, so both layouts use this one module.

Shape legend: B batch, T positions, M branches, D hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def squash(score: torch.Tensor) -> torch.Tensor:
    """sign(s) * sqrt(max(|s|, 1e-6)): compresses large scores before the sigmoid."""
    return score.abs().clamp_min(1e-6).sqrt() * score.sign()


def gate_values(
    h_BTMD: torch.Tensor,
    k_BTMD: torch.Tensor,
    query_weight_MD: torch.Tensor,
    key_weight_MD: torch.Tensor,
    eps: float | None,
) -> torch.Tensor:
    """alpha for every branch: (B, T, M). eps=None uses finfo(dtype).eps (nn.RMSNorm default)."""
    D = h_BTMD.shape[-1]
    q_BTMD = F.rms_norm(h_BTMD, (D,), eps=eps) * query_weight_MD
    k_BTMD = F.rms_norm(k_BTMD, (D,), eps=eps) * key_weight_MD
    score_BTM = (q_BTMD * k_BTMD).sum(dim=-1) / math.sqrt(D)
    return torch.sigmoid(squash(score_BTM))


class ContextGate(nn.Module):
    def __init__(self, num_branches: int, hidden_size: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.query_weight = nn.Parameter(torch.ones(num_branches, hidden_size))  # demo: norm2
        self.key_weight = nn.Parameter(torch.ones(num_branches, hidden_size))  # demo: norm1

    def forward(self, h_BTMD: torch.Tensor, k_BTMD: torch.Tensor) -> torch.Tensor:
        return gate_values(h_BTMD, k_BTMD, self.query_weight, self.key_weight, self.eps)
