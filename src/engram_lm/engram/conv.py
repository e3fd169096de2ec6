"""Short causal convolution over the gated memory (ENGRAM_SPEC s.4).

Y = SiLU(Conv1D(RMSNorm(U))) + U is assembled by the caller; this module computes the
SiLU(Conv1D(RMSNorm(U))) part: per-branch RMSNorm, then one depthwise causal conv over
M*D channels (kernel 4, dilation = max n-gram order, no bias). Zero-initialised weights
make it output exactly 0, so Y = U at the start of training.

Without gradients (inference), the depthwise conv is computed as what it is, a sum over its K
taps of the channel weights times the input shifted by k * dilation, time-major: K
multiply-adds, no transposes. F.conv1d costs a oneDNN convolution setup per call: 120-167 us of
a CPU decode step at the quickstart shape, where the taps cost 50-60 us. The two give the same
bits (tested); training keeps F.conv1d, whose backward the study's runs were trained with, so
a training run's losses stay bit for bit what they were (`reference_conv` is the same path).

Shape legend: B batch, T positions, M branches, D hidden, C = M*D channels, P = (K-1) * dilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvState:
    """The last (kernel - 1) * dilation normalised inputs, for decoding step by step."""

    x_BPC: torch.Tensor


class ShortConv(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_branches: int,
        *,
        kernel_size: int = 4,
        dilation: int = 1,
        eps: float = 1e-5,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size, self.dilation, self.eps = kernel_size, dilation, eps
        channels = hidden_size * num_branches
        self.norm_weight = nn.Parameter(torch.ones(num_branches, hidden_size))
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))  # depthwise, nn.Conv1d's layout
        if zero_init:
            nn.init.zeros_(self.weight)
        else:  # nn.Conv1d's default init, as in the reference demo
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @property
    def receptive_past(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def init_state(self, batch: int, device, dtype) -> ConvState:
        """Zeros: the same as the left padding of a sequence start."""
        return ConvState(torch.zeros(batch, self.receptive_past, self.weight.shape[0], device=device, dtype=dtype))

    def forward(self, u_BTMD: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        """SiLU(conv(RMSNorm(u))) for T new positions; with `state`, continues a stream and
        updates the state in place (decoding), equal to running over the whole sequence."""
        B, T, M, D = u_BTMD.shape
        P = self.receptive_past
        x_BTC = (F.rms_norm(u_BTMD, (D,), eps=self.eps) * self.norm_weight).reshape(B, T, M * D)
        if state is None:
            x_BXC = F.pad(x_BTC, (0, 0, P, 0))  # left pad = causal
        else:
            x_BXC = torch.cat([state.x_BPC, x_BTC], dim=1)
            state.x_BPC = x_BXC[:, x_BXC.shape[1] - P :]
        if torch.is_grad_enabled() and (x_BXC.requires_grad or self.weight.requires_grad):
            y_BTC = self._conv1d(x_BXC)  # training: the backward every run was trained with
        else:
            y_BTC = self._taps(x_BXC, T)
        return F.silu(y_BTC).reshape(B, T, M, D)

    def _taps(self, x_BXC: torch.Tensor, T: int) -> torch.Tensor:
        """y_t = sum_k w_k * x_(t + k * dilation) in the padded frame: K multiply-adds."""
        w_KC = self.weight[:, 0, :].t().contiguous()  # each tap's weights contiguous: the multiply-adds vectorise
        y_BTC = x_BXC[:, :T] * w_KC[0]
        for k in range(1, self.kernel_size):
            y_BTC = torch.addcmul(y_BTC, x_BXC[:, k * self.dilation : k * self.dilation + T], w_KC[k])
        return y_BTC

    def _conv1d(self, x_BXC: torch.Tensor) -> torch.Tensor:
        y_BCT = F.conv1d(x_BXC.transpose(1, 2), self.weight, dilation=self.dilation, groups=self.weight.shape[0])
        return y_BCT.transpose(1, 2)


def reference_conv(conv: ShortConv, u_BTMD: torch.Tensor) -> torch.Tensor:
    """The same output through one F.conv1d over the whole sequence (the readable reference)."""
    B, T, M, D = u_BTMD.shape
    x_BCT = (F.rms_norm(u_BTMD, (D,), eps=conv.eps) * conv.norm_weight).reshape(B, T, M * D).transpose(1, 2)
    y_BCT = F.conv1d(F.pad(x_BCT, (conv.receptive_past, 0)), conv.weight, dilation=conv.dilation, groups=M * D)
    return F.silu(y_BCT).transpose(1, 2).reshape(B, T, M, D)
