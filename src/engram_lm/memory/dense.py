"""The device-resident (trainable) memory table: one embedding matrix per Engram layer.

All hash heads of a layer share this table; head j's rows start at the layout's offset j,
so lookups take global rows (NgramHasher(..., global_rows=True)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_lm.memory.table import MemoryTable


class DenseTable(MemoryTable):
    """Device-resident and trainable (an nn.Parameter)."""

    tier = "device"

    def __init__(self, num_rows: int, dim: int, *, init_std: float = 1.0, sparse_grad: bool = False) -> None:
        super().__init__()
        self.sparse_grad = sparse_grad  # True: backward yields a sparse row gradient (training)
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a memory table needs >= 1 row and dim >= 1, got ({num_rows}, {dim})")
        self.num_rows, self.dim, self.init_std = num_rows, dim, init_std
        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)  # nn.Embedding's N(0, 1) by default

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (...) int64 global row ids -> (..., dim)."""
        return F.embedding(rows, self.weight, sparse=self.sparse_grad)

    def placement(self) -> dict:
        w = self.weight
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "bytes": w.numel() * w.element_size(),
                "where": str(w.device), "trainable": True}  # fmt: skip

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}"
