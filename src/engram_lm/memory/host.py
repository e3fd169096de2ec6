"""Tables outside the compute device: host RAM, and a memory-mapped file on SSD.

Both gather rows on the host (deduplicated: each distinct row is read once per call),
then upload them to the compute device with one pinned-buffer, non_blocking copy.
Read-only: these tiers serve inference.
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

from engram_lm.memory.codec import decode_rows, row_bytes
from engram_lm.memory.table import MemoryTable


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The one upload idiom: pinned staging when CUDA is the target, non_blocking copy."""
    if device.type != "cuda":
        return host
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class HostTable(MemoryTable):
    """Rows in host RAM (pinned when CUDA is present), gathered with index_select."""

    tier = "ram"

    def __init__(self, weight: torch.Tensor, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        weight = weight.detach().to("cpu")
        if torch.cuda.is_available():
            weight = weight.pin_memory()
        self.weight_host = weight  # a plain attribute: never moved by .to(device)
        self.num_rows, self.dim = weight.shape

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1).cpu()
        return self.weight_host.index_select(0, flat).view(*rows.shape, self.dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.check_rows(rows)
        return upload(self.gather_host(rows), self.device)

    def placement(self) -> dict:
        w = self.weight_host
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "bytes": w.numel() * w.element_size(),
                "where": "host RAM" + (" (pinned)" if w.is_pinned() else "")}  # fmt: skip


class MmapTable(MemoryTable):
    """Encoded rows (fp32, bf16 or fp8) in a file, memory-mapped; decoded after the read."""

    tier = "mmap"

    def __init__(self, path: Path, num_rows: int, dim: int, dtype: str, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.path, self.num_rows, self.dim, self.dtype = Path(path), num_rows, dim, dtype
        self.device = torch.device(device)
        expected = num_rows * row_bytes(dtype, dim)
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != expected:
            what = "missing" if size < 0 else f"{size:,} bytes"
            raise ValueError(
                f"table file {self.path} is {what}, expected {expected:,} bytes ({num_rows:,} rows of {dtype}, "
                f"dim {dim}); re-export it with `engram export-memory`"
            )
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(num_rows, row_bytes(dtype, dim)))
        try:  # rows are read at random: no 128 KiB read-around per page fault
            self.data._mmap.madvise(mmap.MADV_RANDOM)
        except (AttributeError, OSError, ValueError):
            pass
        with warnings.catch_warnings():  # read-only mapping: torch warns it cannot be written
            warnings.simplefilter("ignore", UserWarning)
            self.data_t = torch.from_numpy(self.data)  # zero-copy view of the mapping

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        # torch ops release the GIL (numpy fancy indexing does not), so a prefetch thread
        # reading pages here does not stall the compute thread's Python dispatch
        unique, inverse = self.unique_rows(rows)  # sorted reads, range-checked
        vectors = decode_rows(self.data_t.index_select(0, torch.from_numpy(unique)), self.dtype, self.dim)
        return vectors.index_select(0, inverse).view(*rows.shape, self.dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return upload(self.gather_host(rows), self.device)  # gather_host checks the ids

    def close(self) -> None:
        """Drop the mapping (unmapped once no gathered view refers to it): only pages no
        process maps can be evicted from the page cache."""
        self.data_t = self.data = None

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "bytes": int(self.data.size),
                "where": str(self.path), "dtype": self.dtype}  # fmt: skip
