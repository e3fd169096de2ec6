"""DeepSeekMoE: shared experts + fine-grained routed experts, top-k, aux-loss-free balancing.

Routing (DeepSeek-V3): affinity s = sigmoid(router(x)); experts are *selected* by top-k of
s + b, where b is a per-expert bias that is not trained by gradients; the gate weights are
the selected s, normalised to sum to 1 (times route_scale). After each optimizer step the
bias moves by a fixed rate toward balance: b_e += rate * sign(mean_load - load_e)
(arXiv 2408.15664). Dispatch sorts token slots by expert and runs each expert once on its
contiguous slice: a loop over experts, never over tokens.

Shape legend: N tokens, D model dim, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from engram_lm.layers.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(
        self, dim: int, num_routed: int, num_shared: int, top_k: int, expert_hidden: int, route_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.num_routed, self.top_k, self.route_scale = num_routed, top_k, route_scale
        self.router = nn.Linear(dim, num_routed, bias=False)
        self.register_buffer("route_bias", torch.zeros(num_routed))  # balancing state, no gradient
        self.register_buffer("load", torch.zeros(num_routed))  # slots routed since the last bias update
        self.experts = nn.ModuleList(SwiGLU(dim, expert_hidden) for _ in range(num_routed))
        self.shared = SwiGLU(dim, num_shared * expert_hidden) if num_shared > 0 else None

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids (N, K), gate weights (N, K))."""
        scores_NE = torch.sigmoid(self.router(x_ND).float())
        expert_NK = torch.topk(scores_NE + self.route_bias, self.top_k, dim=-1).indices
        weight_NK = scores_NE.gather(-1, expert_NK)
        weight_NK = weight_NK / weight_NK.sum(-1, keepdim=True) * self.route_scale
        return expert_NK, weight_NK.to(x_ND.dtype)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        expert_NK, weight_NK = self.route(x_ND)
        if self.training:
            self.load += torch.bincount(expert_NK.flatten(), minlength=self.num_routed).to(self.load.dtype)
        out_ND = self.dispatch(x_ND, expert_NK, weight_NK)
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND.view_as(x_BTD)

    def dispatch(self, x_ND: torch.Tensor, expert_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
        flat_expert = expert_NK.flatten()
        order = torch.argsort(flat_expert, stable=True)  # slots grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.num_routed).tolist()  # one sync per layer
        flat_weight = weight_NK.flatten()
        out_ND = torch.zeros_like(x_ND)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                slots = order[start : start + count]
                tokens = slots // self.top_k
                out_ND.index_add_(0, tokens, expert(x_ND[tokens]) * flat_weight[slots, None])
            start += count
        return out_ND

    @torch.no_grad()
    def update_route_bias(self, rate: float) -> None:
        """Aux-loss-free balancing step; resets the load counter."""
        if self.load.sum() > 0:
            self.route_bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
