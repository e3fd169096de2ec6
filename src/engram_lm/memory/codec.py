"""Row encodings for exported tables: fp32, bf16, DeepSeek-V4.1's fp8, and int8 / int4.

fp8 (ENGRAM_SPEC s.8): every row is `dim` e4m3 bytes followed by one ue8m0 byte per 32
columns; a ue8m0 byte e means the power-of-two scale 2**(e - 127). Encoding picks the
smallest power of two that keeps each 32-column block within e4m3's range (|x| <= 448),
so the error of an element is at most 2**-4 of itself (3 mantissa bits, round to nearest)
or, for elements far below their block's maximum, half of e4m3's subnormal step
2**-9 times the scale.

int8 and int4: symmetric integers per 32-column group with one bf16 scale per group after the
codes (int8: `dim` bytes, codes -127..127; int4: two codes a byte, low nibble first, -7..7
stored + 8). The scale is the group's largest |x| over 127 (or 7), rounded up to a bf16 (an
fp16 scale loses its precision below 6e-5: a table of small rows would break the bound), so
every code fits and an element's error is at most half a scale: max|x| of its group / 254
(int8) or / 14 (int4), times (1 + 2**-7) for the scale's rounding (`error_bound`).
"""

from __future__ import annotations

import numpy as np
import torch

E4M3_MAX = 448.0
BLOCK = 32
DTYPES = ("fp32", "bf16", "fp8", "int8", "int4")
INT_LEVELS = {"int8": 127, "int4": 7}


def row_bytes(dtype: str, dim: int) -> int:
    if dtype == "fp32":
        return 4 * dim
    if dtype == "bf16":
        return 2 * dim
    if dtype == "fp8":
        return dim + _num_blocks(dim)
    if dtype == "int8":
        return dim + 2 * _num_blocks(dim)
    if dtype == "int4":
        return (dim + 1) // 2 + 2 * _num_blocks(dim)
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
    if dtype in INT_LEVELS:
        return _encode_int(x, dtype)
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
    if dtype in INT_LEVELS:
        return _decode_int(raw, dtype, dim)
    codes = raw[:, :dim].contiguous().view(torch.float8_e4m3fn).float()
    exponent = raw[:, dim:].float() - 127.0
    scale = torch.pow(2.0, exponent).repeat_interleave(BLOCK, dim=1)[:, :dim]
    return codes * scale


def _int_scales(x_RD: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded groups (R, nb, 32), bf16 scales (R, nb)): max|x| / levels rounded up to a bf16, 1 for an all-zero group."""
    R, D = x_RD.shape
    nb = _num_blocks(D)
    groups = torch.nn.functional.pad(x_RD, (0, nb * BLOCK - D)).view(R, nb, BLOCK)
    want = groups.abs().amax(dim=-1) / levels
    scale = want.to(torch.bfloat16)
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.tensor(float("inf"), dtype=torch.bfloat16)), scale)
    return groups, torch.where(want > 0, scale, torch.ones_like(scale))


def _encode_int(x_RD: torch.Tensor, dtype: str) -> np.ndarray:
    if not torch.isfinite(x_RD).all():
        raise ValueError(f"{dtype} rows must be finite (a NaN or inf has no integer code): export as fp32 or bf16")
    levels = INT_LEVELS[dtype]
    R, D = x_RD.shape
    groups, scale = _int_scales(x_RD, levels)
    if not torch.isfinite(scale).all():
        raise ValueError(f"{dtype}: a group's largest value {float(groups.abs().max()):.3g} is beyond a bf16 scale's range: "
                         "export as fp32 or bf16")  # fmt: skip
    codes = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-levels, levels).to(torch.int8).view(R, -1)[:, :D]
    scale_bytes = scale.view(torch.uint8).view(R, -1)
    if dtype == "int8":
        return torch.cat([codes.view(torch.uint8), scale_bytes], dim=1).numpy()
    nibbles = (codes + 8).to(torch.uint8)  # 1..15
    nibbles = torch.nn.functional.pad(nibbles, (0, D % 2))  # an odd dim: a zero nibble at the end
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return torch.cat([packed, scale_bytes], dim=1).numpy()


def _decode_int(raw: torch.Tensor, dtype: str, dim: int) -> torch.Tensor:
    R, nb = raw.shape[0], _num_blocks(dim)
    width = dim if dtype == "int8" else (dim + 1) // 2
    if dtype == "int8":
        codes = raw[:, :dim].contiguous().view(torch.int8).float()
    else:
        packed = raw[:, :width]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(R, -1)[:, :dim].float() - 8.0
    scale = raw[:, width : width + 2 * nb].contiguous().view(torch.bfloat16).float()
    return codes * scale.repeat_interleave(BLOCK, dim=1)[:, :dim]


def error_bound(rows_RD: torch.Tensor, dtype: str) -> torch.Tensor:
    """The largest error an element may have after encoding as `dtype` (int8, int4): half its group's scale."""
    levels = INT_LEVELS[dtype]
    groups = torch.nn.functional.pad(rows_RD.float(), (0, _num_blocks(rows_RD.shape[1]) * BLOCK - rows_RD.shape[1]))
    amax = groups.view(rows_RD.shape[0], -1, BLOCK).abs().amax(dim=-1)
    return (amax / levels * (1 + 2**-7) / 2).repeat_interleave(BLOCK, dim=1)[:, : rows_RD.shape[1]]
