"""The SSD tier: rows of an exported table read with many requests in flight.

A page fault on an mmap is one synchronous read at a time (queue depth 1); an NVMe drive
serves several times more random reads per second at queue depth 32. `SsdTable` reads the
rows of a call as aligned 4 KiB-block requests (O_DIRECT where the file system allows it,
so the page cache is neither polluted nor needed), all of them handed to the kernel as one
batch of native AIO requests with `queue_depth` in flight (memory/aio.py; a pool of
`preadv` threads where AIO is unavailable):
- rows are deduplicated per call, and so are blocks: rows that share a block cost one read;
- a row costs at most one aligned block read when the row size divides the block size
  (fp32/bf16 rows), at most two otherwise (fp8 rows with their scale bytes);
- every block lands in one reused page-aligned buffer and rows are cut out of it with one
  vectorised gather: no Python work per row or per block;
- the same file format as the mmap tier (memory/export.py), decoded after the read;
- safe from several threads (the buffer is one call's at a time) and in a forked child (its own
  buffer copy and AIO context: memory/forksafe.py).
Timings belong to `engram bench offload` on a quiet machine.

Shape legend: U distinct rows of a call, K distinct block runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from engram_lm.memory.aio import BLOCK, DEFAULT_QUEUE_DEPTH, BlockReader, aligned_buffer
from engram_lm.memory.codec import decode_rows, row_bytes
from engram_lm.memory.forksafe import ProcessLock
from engram_lm.memory.host import upload
from engram_lm.memory.table import MemoryTable


_BUFFERED_DEVICES: set[int] = set()  # file systems already said to refuse O_DIRECT (said once each)


def _open(path: Path) -> tuple[int, bool]:
    """A read-only descriptor, O_DIRECT when the file system supports it. The fallback to
    buffered reads (tmpfs and some overlay file systems refuse O_DIRECT) is said once per
    file system on stderr: reads stay correct but go through the page cache."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            device = os.stat(path).st_dev
            if device not in _BUFFERED_DEVICES:
                _BUFFERED_DEVICES.add(device)
                print(f"engram-lm: {path.parent} refuses O_DIRECT; reading its tables through the page cache instead "
                      "(correct, but the rows also take page-cache memory; put the tables on a disk file system "
                      "such as ext4 or xfs for direct reads)", file=sys.stderr)  # fmt: skip
    return os.open(path, os.O_RDONLY), False


class SsdTable(MemoryTable):
    tier = "ssd"

    def __init__(self, path: Path, num_rows: int, dim: int, dtype: str, *, device: torch.device | str = "cpu",
                 queue_depth: int = DEFAULT_QUEUE_DEPTH, engine: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.path, self.num_rows, self.dim, self.dtype = Path(path), num_rows, dim, dtype
        self.device = torch.device(device)
        self.row_bytes = row_bytes(dtype, dim)
        self.file_bytes = num_rows * self.row_bytes
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != self.file_bytes:
            what = "missing" if size < 0 else f"{size:,} bytes"
            raise ValueError(f"table file {self.path} is {what}, expected {self.file_bytes:,} bytes; re-export it")
        self.fd, self.direct = _open(self.path)
        self.queue_depth = queue_depth
        self.reader = BlockReader(self.fd, str(self.path), self.file_bytes, queue_depth=queue_depth, engine=engine)
        self._buffer = aligned_buffer(BLOCK)  # private: a forked child reads into its own copy
        self._buffer_lock = ProcessLock()  # one call at a time owns the reused buffer (threads: a prefetcher, servers)
        self.blocks_read = self.rows_read = 0

    def blocks_of(self, unique_U: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distinct first blocks K, blocks spanned per distinct block K) for sorted unique rows."""
        start = unique_U * self.row_bytes // BLOCK
        end = ((unique_U + 1) * self.row_bytes - 1) // BLOCK
        first, index = np.unique(start, return_index=True)
        span = np.maximum.reduceat(end, index) - first + 1 if len(first) else first
        return first, span

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        unique, inverse = self.unique_rows(rows)  # range-checked
        vectors = decode_rows(self.read_raw(unique), self.dtype, self.dim)
        return vectors.index_select(0, inverse).view(*rows.shape, self.dim)

    def read_raw(self, unique_U: np.ndarray) -> np.ndarray:
        """The encoded bytes (U, row_bytes) of sorted, distinct, in-range rows, read from the disk."""
        u = np.asarray(unique_U, dtype=np.int64)
        if len(u) == 0:
            return np.empty((0, self.row_bytes), dtype=np.uint8)
        with self._buffer_lock:
            return self._read_locked(u)

    def _read_locked(self, u: np.ndarray) -> np.ndarray:
        first, span = self.blocks_of(u)
        starts = (np.cumsum(span) - span) * BLOCK  # where each block run lands in the buffer
        total = int(span.sum()) * BLOCK
        if len(self._buffer) < total:
            self._buffer.close()
            self._buffer = aligned_buffer(total)
        self.reader.read(first * BLOCK, span * BLOCK, self._buffer, starts)
        self.blocks_read += int(span.sum())
        self.rows_read += len(u)
        which = np.searchsorted(first, u * self.row_bytes // BLOCK, side="right") - 1
        at = starts[which] + u * self.row_bytes - first[which] * BLOCK  # each row's first byte
        data = np.frombuffer(self._buffer, dtype=np.uint8, count=total)
        windows = np.lib.stride_tricks.sliding_window_view(data, self.row_bytes)
        raw = windows[at]  # (U, row_bytes), a copy: the buffer is reused by the next call
        del data, windows
        return raw

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return upload(self.gather_host(rows), self.device)  # gather_host checks the ids

    def close(self) -> None:
        if getattr(self, "reader", None) is not None:
            self.reader.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "bytes": self.file_bytes,
                "where": str(self.path), "dtype": self.dtype, "o_direct": self.direct,
                "queue_depth": self.queue_depth, "engine": self.reader.engine}  # fmt: skip
