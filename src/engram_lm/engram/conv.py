"""Short causal convolution over the gated memory (ENGRAM_SPEC s.4).

Y = SiLU(Conv1D(RMSNorm(U))) + U is assembled by the caller; this module computes the
SiLU(Conv1D(RMSNorm(U))) part: per-branch RMSNorm, then one depthwise causal conv over
M*D channels (kernel 4, dilation = max n-gram order, no bias). Zero-initialised weights
make it output exactly 0, so Y = U at the start of training.

Shape legend: B batch, T positions, M branches, D hidden, C = M*D channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConvState:
    """The last (kernel - 1) * dilation normalised inputs, for decoding step by step."""

    x_BCP: torch.Tensor


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
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))  # depthwise
        if zero_init:
            nn.init.zeros_(self.weight)
        else:  # nn.Conv1d's default init, as in the reference demo
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @property
    def receptive_past(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def init_state(self, batch: int, device, dtype) -> ConvState:
        """Zeros: the same as the left padding of a sequence start."""
        return ConvState(torch.zeros(batch, self.weight.shape[0], self.receptive_past, device=device, dtype=dtype))

    def forward(self, u_BTMD: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        """SiLU(conv(RMSNorm(u))) for T new positions; with `state`, continues a stream and
        updates the state in place (decoding), equal to running over the whole sequence."""
        B, T, M, D = u_BTMD.shape
        x_BTMD = F.rms_norm(u_BTMD, (D,), eps=self.eps) * self.norm_weight
        x_BCT = x_BTMD.reshape(B, T, M * D).transpose(1, 2)
        if state is None:
            x_BCT = F.pad(x_BCT, (self.receptive_past, 0))  # left pad = causal
        else:
            x_BCT = torch.cat([state.x_BCP, x_BCT], dim=-1)
            state.x_BCP = x_BCT[..., x_BCT.shape[-1] - self.receptive_past :]
        y_BCT = F.conv1d(x_BCT, self.weight, dilation=self.dilation, groups=M * D)
        return F.silu(y_BCT).transpose(1, 2).reshape(B, T, M, D)
