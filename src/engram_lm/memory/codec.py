"""Row encodings for exported tables: fp32, bf16, and DeepSeek-V4.1's fp8.

fp8 (ENGRAM_SPEC s.8): every row is `dim` e4m3 bytes followed by one ue8m0 byte per 32
columns; a ue8m0 byte e means the power-of-two scale 2**(e - 127). Encoding picks the
smallest power of two that keeps each 32-column block within e4m3's range (|x| <= 448),
so the error of an element is at most 2**-4 of itself (3 mantissa bits, round to nearest)
or, for elements far below their block's maximum, half of e4m3's subnormal step
2**-9 times the scale.
"""

from __future__ import annotations

import numpy as np
import torch

E4M3_MAX = 448.0
BLOCK = 32
DTYPES = ("fp32", "bf16", "fp8")


def row_bytes(dtype: str, dim: int) -> int:
    if dtype == "fp32":
        return 4 * dim
    if dtype == "bf16":
        return 2 * dim
    if dtype == "fp8":
        return dim + _num_blocks(dim)
    raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")


def _num_blocks(dim: int) -> int:
    return (dim + BLOCK - 1) // BLOCK


def encode_rows(rows_RD: torch.Tensor, dtype: str) -> np.ndarray:
    """(R, D) float -> (R, row_bytes) uint8."""
    x = rows_RD.detach().float().cpu()
    if dtype == "fp32":
        return x.numpy().view(np.uint8).reshape(x.shape[0], -1)
    if dtype == "bf16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)
    if dtype != "fp8":
        raise ValueError(f"unknown table dtype {dtype!r}; choose one of {DTYPES}")
    R, D = x.shape
    nb = _num_blocks(D)
    padded = torch.nn.functional.pad(x, (0, nb * BLOCK - D)).view(R, nb, BLOCK)
    amax = padded.abs().amax(dim=-1).clamp_min(1e-30)
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX)).clamp(-127, 127)
    scale = torch.pow(2.0, exponent)
    codes = (padded / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    code_bytes = codes.view(torch.uint8).view(R, nb * BLOCK)[:, :D]
    scale_bytes = (exponent + 127).to(torch.uint8)
    return torch.cat([code_bytes, scale_bytes], dim=1).numpy()


def decode_rows(raw_RB: np.ndarray | torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    """(R, row_bytes) uint8 -> (R, D) float32."""
    raw = raw_RB.contiguous() if isinstance(raw_RB, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(raw_RB))
    R = raw.shape[0]
    if R == 0:  # an empty call (a strided empty view cannot be reinterpreted)
        return torch.empty(0, dim)
    if dtype == "fp32":
        return raw.view(torch.float32).view(R, dim)
    if dtype == "bf16":
        return raw.view(torch.bfloat16).view(R, dim).float()
    codes = raw[:, :dim].contiguous().view(torch.float8_e4m3fn).float()
    exponent = raw[:, dim:].float() - 127.0
    scale = torch.pow(2.0, exponent).repeat_interleave(BLOCK, dim=1)[:, :dim]
    return codes * scale
