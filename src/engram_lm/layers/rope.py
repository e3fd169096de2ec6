"""Rotary position embeddings (RoPE), rotate-half form.

Shape legend: B batch, T positions, H heads, K head dim.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim // 2), float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_TK = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles_TK.cos(), angles_TK.sin()


def apply_rope(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :K/2], x[..., K/2:]) by the position angles; cos/sin cover T."""
    half = x_BHTK.shape[-1] // 2
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    cos, sin = cos_TK.to(x_BHTK.dtype), sin_TK.to(x_BHTK.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
