"""Suffix N-gram hashing: pure, vectorised torch code on any device (ENGRAM_SPEC s.3, s.8).

Every constant is an argument; nothing here holds state. Arithmetic is int64 and wraps
like the reference's NumPy code (for canonical ids < V' the products never overflow by
construction of the multipliers; negative pass-through ids may, and wrap identically).

Shape legend: B batch, T positions, N max n-gram order, O = N-1 orders (2..N),
K heads per order, H = O*K hash columns, L Engram layers.
"""

from __future__ import annotations

import torch


def ngram_window_start(
    num_positions: int,
    dead_BT: torch.Tensor | None = None,
    boundary_BT: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """First position each token's n-gram may read; older lookbacks read the pad id.

    - dead token at s (V4.1 latching rule): blocks position s itself and everything older,
      for position s and all later positions;
    - boundary (end-of-document) token at s: belongs to its document, so it blocks
      positions <= s only for the positions after it.
    Returns start_BT (int64) or None when neither mask is given (plain row start at 0).
    """
    if dead_BT is None and boundary_BT is None:
        return None
    ref = dead_BT if dead_BT is not None else boundary_BT
    pos_T = torch.arange(num_positions, device=ref.device if device is None else device)
    barrier_BT = torch.where(dead_BT, pos_T + 1, 0) if dead_BT is not None else None
    if boundary_BT is not None:  # s+1 seen from s+1 on
        after_BT = torch.nn.functional.pad(torch.where(boundary_BT[:, :-1], pos_T[1:], 0), (1, 0))
        barrier_BT = after_BT if barrier_BT is None else torch.maximum(barrier_BT, after_BT)
    return torch.cummax(barrier_BT, dim=1).values


def suffix_ngram_ids(
    ids_BT: torch.Tensor, max_ngram: int, pad_id: int, start_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """ids at lookbacks k = 0..N-1 of every position, pad where blocked: (B, T, N) int64.
    One padded copy read through N-wide windows, not N shifted copies: a decode step's hashing
    is dozens of tiny ops, each ~4 us of dispatch on a CPU (docs/memory.md)."""
    B, T = ids_BT.shape
    padded_BX = torch.nn.functional.pad(ids_BT, (max_ngram - 1, 0), value=pad_id)
    tokens_BTN = padded_BX.unfold(1, max_ngram, 1).flip(-1)  # [t, t-1, ..., t-N+1]
    if start_BT is not None:  # lookback position t - k before the window's start reads the pad id
        lookback_TN = torch.arange(T, device=ids_BT.device)[:, None] - torch.arange(max_ngram, device=ids_BT.device)
        tokens_BTN = torch.where(lookback_TN >= start_BT[..., None], tokens_BTN, pad_id)
    return tokens_BTN


def suffix_ngram_ids_reference(
    ids_BT: torch.Tensor, max_ngram: int, pad_id: int, start_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """The same, one shifted copy per lookback (the readable reference; tested equal)."""
    B, T = ids_BT.shape
    pos_T = torch.arange(T, device=ids_BT.device)
    columns = []
    for k in range(max_ngram):
        shifted_BT = torch.full_like(ids_BT, pad_id)
        if k < T:
            shifted_BT[:, k:] = ids_BT[:, : T - k]
        if start_BT is not None:
            shifted_BT = torch.where(pos_T - k >= start_BT, shifted_BT, pad_id)
        columns.append(shifted_BT)
    return torch.stack(columns, dim=-1)


def hash_ngrams(
    ids_BT: torch.Tensor,
    multipliers_LN: torch.Tensor,
    primes_LOK: torch.Tensor,
    pad_id: int,
    start_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head local hash ids of canonical ids for L layers at once: (L, B, T, O*K) int64.

    mix_n = XOR_{k<n} (x_{t-k} * m_k) (wrapping int64); id = mix_n mod prime (floor mod).
    """
    L, N = multipliers_LN.shape
    tokens_BTN = suffix_ngram_ids(ids_BT.to(torch.int64), N, pad_id, start_BT)
    products_LBTN = tokens_BTN.unsqueeze(0) * multipliers_LN[:, None, None, :]
    mixes = [products_LBTN[..., 0]]
    for k in range(1, N):
        mixes.append(torch.bitwise_xor(mixes[-1], products_LBTN[..., k]))
    mix_LBTO = torch.stack(mixes[1:], dim=-1)  # orders 2..N
    hashes_LBTOK = torch.remainder(mix_LBTO.unsqueeze(-1), primes_LOK[:, None, None, :, :])
    return hashes_LBTOK.flatten(start_dim=-2)
