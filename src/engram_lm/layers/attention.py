"""Causal multi-head self-attention with RoPE, PyTorch SDPA, and an optional KV cache;
grouped-query attention when there are fewer key/value heads than query heads.

Shape legend: B batch, T new positions, S cached + new positions, H query heads, G key/value
heads, K head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram_lm.layers.rope import apply_rope


@dataclass
class KVCache:
    """Preallocated keys/values of one layer; `length` positions are filled."""

    k_BHSK: torch.Tensor
    v_BHSK: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, device, dtype) -> "KVCache":
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def append(self, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k_BHTK.shape[2]
        if self.length + T > self.k_BHSK.shape[2]:
            raise ValueError(
                f"KV cache holds {self.k_BHSK.shape[2]} positions; cannot add {T} after {self.length}. "
                "Raise max_seq_len or generate fewer tokens"
            )
        self.k_BHSK[:, :, self.length : self.length + T] = k_BHTK
        self.v_BHSK[:, :, self.length : self.length + T] = v_BHTK
        self.length += T
        return self.k_BHSK[:, :, : self.length], self.v_BHSK[:, :, : self.length]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        self.wqkv = nn.Linear(dim, (H + 2 * G) * K, bias=False)  # rows: queries, keys, values
        self.wo = nn.Linear(H * K, dim, bias=False)

    def forward(
        self, x_BTD: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        if G == H:
            q, k, v = self.wqkv(x_BTD).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)
        else:
            q_BTHK, k_BTGK, v_BTGK = self.wqkv(x_BTD).split((H * K, G * K, G * K), dim=-1)
            q, k, v = (t.view(B, T, -1, K).transpose(1, 2) for t in (q_BTHK, k_BTGK, v_BTGK))
        q, k = apply_rope(q, cos_TK, sin_TK), apply_rope(k, cos_TK, sin_TK)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)
        gqa = {"enable_gqa": True} if G != H else {}  # each key/value head serves H / G query heads
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:  # new queries sit at positions past..past+T-1 and see every earlier key
            S = past + T
            mask_TS = torch.ones(T, S, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS, **gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * K))
