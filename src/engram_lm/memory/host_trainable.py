"""A trainable table in host RAM: the rows stay off the compute device while training.

The weight is a CPU `nn.Parameter` (pinned when CUDA is present) that `model.to(device)`
leaves where it is. A lookup gathers each distinct row once on the host (a sparse
embedding lookup, so the backward pass yields a sparse row gradient on the host) and
uploads the rows with the one pinned, non_blocking idiom; autograd brings the row
gradients back to the host. The table's optimizer (sparse-row Adam, role "table") then
runs on the host with its moments beside the rows, touching only the rows read.
On CPU this is the device table's computation exactly (tested: identical losses).
Not yet done: overlapping the host optimizer step with the next step's compute.

Shape legend: U distinct rows of this call, D row width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_lm.memory.host import upload
from engram_lm.memory.table import MemoryTable


class HostTrainableTable(MemoryTable):
    tier = "ram-trainable"

    def __init__(self, weight: torch.Tensor, device: torch.device | str = "cpu", *, dedup: bool | None = None) -> None:
        """dedup: gather each distinct row once before the upload (default: when the compute
        device is not the host; on CPU the plain lookup is the device table's, bit for bit)."""
        super().__init__()
        self.device = torch.device(device)
        self.dedup = dedup
        host = weight.detach().to("cpu").clone()
        if torch.cuda.is_available():
            host = host.pin_memory()
        self.weight = nn.Parameter(host)  # the same name as DenseTable's: checkpoints are interchangeable
        self.num_rows, self.dim = host.shape

    def _apply(self, fn, recurse=True):
        """Keep the rows on the host when the model moves; follow the compute device only."""
        probe = fn(torch.empty(0))
        if probe.device.type != "meta":
            self.device = probe.device
        return self

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.check_rows(rows)
        if not (self.dedup if self.dedup is not None else self.device.type != "cpu"):
            return F.embedding(rows, self.weight, sparse=True)
        unique_U, inverse = torch.unique(rows.reshape(-1).cpu(), return_inverse=True)
        rows_UD = F.embedding(unique_U, self.weight, sparse=True)  # each distinct row read once
        return upload(rows_UD, self.device).index_select(0, inverse.to(self.device)).view(*rows.shape, self.dim)

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "trainable": True, "where": "host RAM",
                "bytes": self.weight.numel() * self.weight.element_size()}  # fmt: skip


def tables_to_host(model: nn.Module, device: torch.device | str) -> int:
    """Replace every Engram DenseTable of `model` by a HostTrainableTable; returns how many."""
    from engram_lm.memory.dense import DenseTable

    count = 0
    for block in getattr(model, "blocks", []):
        engram = getattr(block, "engram", None)
        if engram is not None and isinstance(engram.memory, DenseTable):
            engram.memory = HostTrainableTable(engram.memory.weight, device=device)
            count += 1
    return count
