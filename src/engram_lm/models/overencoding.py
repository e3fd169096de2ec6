"""Over-Encoding (OE), the memory baseline, as its own paper defines it.

Huang et al. 2025, "Over-Tokenized Transformer: Vocabulary is Generally Worth Scaling"
(arXiv 2501.16975), s.3 (Over-Encoding). The paper's text was not reachable from our
machines; the formulation below follows two public implementations that state it and
agree with each other (LongCat's n-gram embedding in SGLang, and Marin's OE/OT
reproduction), and each choice names where it comes from:

    OE(x)_t = ( E[x_t] + sum_{i=2..n} sum_{j=1..k} W_ij T_ij[h_ij(t)] ) / (1 + k (n - 1))

- hierarchical n-gram input vocabulary: the 1-gram (token) embedding plus 2..n-gram
  embeddings (paper s.3.2, "hierarchical encoding");
- each order is split over k tables with distinct moduli m_ij = m + 2 t + 1 (t the table's
  index): the paper's "m + 2" trick, so two n-grams that collide in one table rarely
  collide in another; odd moduli as in LongCat, since V is a power of two here;
- h_ij = polynomial index of the i-gram in base V modulo m_ij, zero padding before the row
  or document start (hashing/polynomial.py);
- each table is d / (k (n - 1)) wide and projected back to d by its own W_ij (no bias), so
  the n-gram part carries as many numbers as the token embedding;
- the sum is divided by 1 + k (n - 1) (both implementations);
- tables are initialised like the token embedding, W_ij like every other linear layer;
  tables train with Adam at the base learning rate, like the token embedding (the paper
  gives OE no learning-rate multiplier; `OVERENCODING_TABLE_LR_MULT`).

Shape legend: B batch, T positions, H = k (n - 1) tables, W table width, D model width.
"""

from __future__ import annotations

import torch
from torch import nn

from engram_lm.config import OverEncodingConfig, overencoding_for_budget  # noqa: F401  (re-exported)
from engram_lm.hashing.hasher import NgramHistory
from engram_lm.hashing.ngram import ngram_window_start
from engram_lm.hashing.polynomial import polynomial_ngram_ids, polynomial_weights
from engram_lm.memory.dense import DenseTable

OVERENCODING_TABLE_LR_MULT = 1.0  # OE tables train like the token embedding


class OverEncodingHasher:
    """Raw ids -> global rows (B, T, H) of the concatenated tables; decoding via `step`."""

    def __init__(self, config: OverEncodingConfig, vocab_size: int) -> None:
        moduli = config.moduli()
        self.width = config.max_ngram - 1
        self.weights_HN = polynomial_weights(vocab_size, moduli)
        self.moduli_H = torch.tensor([m for _, m in moduli], dtype=torch.int64, device="cpu")  # also under meta
        self.offsets_H = torch.cumsum(self.moduli_H, 0) - self.moduli_H

    def hash_all(self, ids_BT: torch.Tensor, *, eod_id: int | None = None) -> torch.Tensor:
        boundary_BT = ids_BT == eod_id if eod_id is not None else None
        start_BT = ngram_window_start(ids_BT.shape[1], None, boundary_BT, ids_BT.device)
        return self._global(ids_BT, start_BT)

    def init_history(self, batch_size: int, device: torch.device | str = "cpu") -> NgramHistory:
        ids = torch.zeros((batch_size, self.width), dtype=torch.int64, device=device)
        return NgramHistory(ids, torch.ones((batch_size, self.width), dtype=torch.bool, device=device))

    def step(self, history: NgramHistory, ids_BS: torch.Tensor, *, eod_id: int | None = None):
        """((B, S, H) rows of S new tokens, updated history); equal to hash_all at those positions."""
        ids_BX = torch.cat([history.ids_BK, ids_BS.to(torch.int64)], dim=1)
        dead_BX = torch.cat([history.blocked_BK, torch.zeros_like(ids_BS, dtype=torch.bool)], dim=1)
        boundary_BX = (ids_BX == eod_id) if eod_id is not None else torch.zeros_like(dead_BX)
        boundary_BX[:, : self.width] = False
        start_BX = ngram_window_start(ids_BX.shape[1], dead_BX, boundary_BX)
        rows_BXH = self._global(ids_BX, start_BX)
        blocked_BX = dead_BX | boundary_BX
        return rows_BXH[:, self.width :], NgramHistory(ids_BX[:, -self.width :], blocked_BX[:, -self.width :])

    def _global(self, ids_BT: torch.Tensor, start_BT: torch.Tensor | None) -> torch.Tensor:
        dev = ids_BT.device
        local_BTH = polynomial_ngram_ids(ids_BT, self.weights_HN.to(dev), self.moduli_H.to(dev), start_BT)
        return local_BTH + self.offsets_H.to(dev)


class OverEncoding(nn.Module):
    """The over-encoded input embedding; `forward` takes the token embedding E[x_t]."""

    def __init__(self, config: OverEncodingConfig, dim: int, init_std: float) -> None:
        super().__init__()
        self.config = config
        self.num_tables = config.num_tables
        self.memory = DenseTable(config.total_rows, config.table_dim, init_std=init_std, sparse_grad=True)
        self.proj = nn.ModuleList(nn.Linear(config.table_dim, dim, bias=False) for _ in range(self.num_tables))

    def forward(self, x_BTD: torch.Tensor, rows_BTH: torch.Tensor) -> torch.Tensor:
        e_BTHW = self.memory(rows_BTH)
        ngram_BTD = sum(proj(e_BTHW[..., j, :]) for j, proj in enumerate(self.proj))
        if self.config.combine == "add_mean":
            return x_BTD + ngram_BTD / self.num_tables
        return (x_BTD + ngram_BTD) / (1 + self.num_tables)
