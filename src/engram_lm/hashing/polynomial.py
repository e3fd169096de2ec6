"""Over-Encoding's n-gram index (Huang et al. 2025, arXiv 2501.16975): pure torch, any device.

The i-gram ending at t is read as a number in base V (the raw vocabulary size) and
reduced modulo the table's own size:

    h_i(t) = (x_t + x_{t-1} V + ... + x_{t-i+1} V^{i-1}) mod m

Positions before the row start (or before a document start) read token 0, the paper's
zero padding. No tokenizer compression: Over-Encoding hashes raw ids. Each term is reduced
separately, so with V < 2^31 and m < 2^31 no int64 product overflows.

Shape legend: B batch, T positions, N max n-gram order, H tables (orders 2..N, k per order).
"""

from __future__ import annotations

import torch

from engram_lm.hashing.ngram import suffix_ngram_ids


def polynomial_weights(vocab_size: int, moduli: list[tuple[int, int]]) -> torch.Tensor:
    """(H, N) int64: V^j mod m_h for each table h = (order, modulus) and lookback j; zero
    for lookbacks beyond the table's order, so one contraction serves every order."""
    N = max(order for order, _ in moduli)
    rows = [[pow(vocab_size, j, m) if j < order else 0 for j in range(N)] for order, m in moduli]
    return torch.tensor(rows, dtype=torch.int64, device="cpu")


def polynomial_ngram_ids(
    ids_BT: torch.Tensor, weights_HN: torch.Tensor, moduli_H: torch.Tensor, start_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Local row ids (B, T, H) int64 of every table: sum_j x_{t-j} * (V^j mod m) mod m."""
    N = weights_HN.shape[1]
    tokens_BTN = suffix_ngram_ids(ids_BT.to(torch.int64), N, 0, start_BT)
    terms_BTHN = torch.remainder(tokens_BTN.unsqueeze(2) * weights_HN, moduli_H.unsqueeze(-1))
    return torch.remainder(terms_BTHN.sum(dim=-1), moduli_H)
