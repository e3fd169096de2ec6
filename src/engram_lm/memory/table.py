"""The memory-table interface every storage tier implements.

A table maps global row ids (any shape, int64) to vectors (..., dim) on the compute
device. Tiers differ only in where rows live; the model calls the same two methods on all
of them, so `forward` never branches on storage:
    table.prefetch(rows)  start fetching these rows (a no-op where rows are at hand)
    table(rows)           the vectors; waits only for what is not yet ready
`placement()` reports rows, bytes and where they are, for logs; `close()` releases files,
threads and I/O contexts (wrappers close what they wrap).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class MemoryTable(nn.Module):
    num_rows: int
    dim: int
    tier: str = "abstract"

    def prefetch(self, rows: torch.Tensor) -> None:
        """Start fetching `rows` for the next call; tiers without latency ignore it."""

    def close(self) -> None:
        """Release files, worker threads and I/O contexts; tiers that hold none ignore it."""

    def placement(self) -> dict[str, Any]:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim}

    def check_rows(self, rows: torch.Tensor) -> None:
        """int64 ids inside [0, num_rows): a tier never returns another row (or stale bytes) for an id it lacks.
        The host tiers read the ids on the host anyway, so the range check costs no extra sync there."""
        if rows.dtype != torch.int64:
            raise ValueError(f"row ids must be int64, got {rows.dtype}")
        if rows.numel():
            lo, hi = (int(v) for v in torch.aminmax(rows))
            if lo < 0 or hi >= self.num_rows:
                self._refuse(lo, hi)

    def unique_rows(self, rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The sorted distinct ids of `rows` (host, NumPy) and each id's place among them, range-checked
        as check_rows does but from the sorted ids' two ends (no pass of its own: the tiers that
        deduplicate anyway check here)."""
        if rows.dtype != torch.int64:
            raise ValueError(f"row ids must be int64, got {rows.dtype}")
        unique, inverse = torch.unique(rows.reshape(-1).cpu(), return_inverse=True)
        u = unique.numpy()
        if len(u) and (u[0] < 0 or u[-1] >= self.num_rows):
            self._refuse(int(u[0]), int(u[-1]))
        return u, inverse

    def _refuse(self, lo: int, hi: int) -> None:
        raise ValueError(f"row ids {lo}..{hi} fall outside this {self.tier} table's {self.num_rows:,} rows: the "
                         "hashing and the table disagree (another layout, model or export); use the table "
                         "exported for this model")  # fmt: skip
