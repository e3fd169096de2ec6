"""Multi-branch residual stream: manifold-constrained hyper-connections (mHC).

The residual stream holds M copies x_m (B, T, M, D). Around one sublayer F:
    x' = H_res x + H_post^T F(H_pre x)
with per-token coefficients computed from the stream itself (mHC, arXiv 2512.24880):
    z = RMSNorm(flatten(x));  d = z Phi
    H_pre  = sigmoid(a_pre * d_pre + b_pre)             (1 x M, non-negative)
    H_post = 2 sigmoid(a_post * d_post + b_post)         (1 x M)
    H_res  = Sinkhorn(a_res * d_res + b_res)             (M x M, doubly stochastic)
Sinkhorn-Knopp runs in log space (alternate row and column log-normalisation). Initial
values make it a plain residual around the branch mean: H_pre = 1/M, H_post = 1,
H_res ~ identity. M = 1 is exactly the plain residual x + F(x), with no parameters.

Shape legend: B batch, T positions, M branches, D model dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn(logits_XMM: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Doubly stochastic matrix exp(logits) scaled by rows and columns (last two dims)."""
    log_p = logits_XMM.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
    return log_p.exp().to(logits_XMM.dtype)


class HyperConnection(nn.Module):
    def __init__(self, num_branches: int, dim: int, *, sinkhorn_iters: int = 20, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_branches, self.sinkhorn_iters, self.eps = num_branches, sinkhorn_iters, eps
        M = num_branches
        if M == 1:
            return
        self.phi = nn.Linear(M * dim, 2 * M + M * M, bias=False)
        nn.init.normal_(self.phi.weight, std=0.02)
        self.scale = nn.Parameter(torch.full((3,), 0.01))  # a_pre, a_post, a_res
        self.bias_pre = nn.Parameter(torch.full((M,), math.log(1.0 / (M - 1))))  # sigmoid -> 1/M
        self.bias_post = nn.Parameter(torch.zeros(M))  # 2 sigmoid(0) = 1
        self.bias_res = nn.Parameter(4.0 * torch.eye(M) - 4.0)  # 0 on, -4 off the diagonal

    def coefficients(self, x_BTMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre (B,T,M), H_post (B,T,M), H_res (B,T,M,M))."""
        B, T, M, D = x_BTMD.shape
        z = F.rms_norm(x_BTMD.reshape(B, T, M * D), (M * D,), eps=self.eps)
        d = self.phi(z)
        pre = torch.sigmoid(self.scale[0] * d[..., :M] + self.bias_pre)
        post = 2 * torch.sigmoid(self.scale[1] * d[..., M : 2 * M] + self.bias_post)
        res = sinkhorn(self.scale[2] * d[..., 2 * M :].view(B, T, M, M) + self.bias_res, self.sinkhorn_iters)
        return pre, post, res

    def forward(self, x_BTMD: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.num_branches == 1:
            return x_BTMD + sublayer(x_BTMD[:, :, 0]).unsqueeze(2)
        pre_BTM, post_BTM, res_BTMM = self.coefficients(x_BTMD)
        y_BTD = sublayer(torch.einsum("btm,btmd->btd", pre_BTM, x_BTMD))
        mixed_BTMD = torch.einsum("btmn,btnd->btmd", res_BTMM, x_BTMD)
        return mixed_BTMD + post_BTM.unsqueeze(-1) * y_BTD.unsqueeze(2)
