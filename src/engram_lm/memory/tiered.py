"""The tier for tables that may not fit in RAM: rows held in a memory budget, misses read
from the disk at depth.

`TieredTable` serves each call's distinct rows from its own row store in RAM (encoded bytes,
as on disk: an fp8 row costs its 160-264 bytes, not 4 x dim) when it holds them, and sends
only the misses to the deep-queue O_DIRECT reader of the `ssd` tier (memory/ssd.py), in one
batch. Why not the page cache (the mmap tier, or buffered reads): a page fault is one read at
a time, so a cold mmap reads 3-5x slower than the deep queue, and the page cache keeps 4 KiB
pages for rows of 160-264 bytes; the row store keeps whole rows only, up to a budget the user
sets, and its hits cost what the mmap tier's warm reads cost (one gather from memory).

Admission and eviction (N-gram reads are Zipfian): while the store has room, every missed row
enters it. Once full, a missed row enters only if it has been missed before (a per-row
saturating count, halved once every `age_every` calls that miss, a slice per such call:
one-off rows never displace anything), in
place of a slot that has not been read since a victim draw last passed over it: each entrant
draws 8 slots at random and takes one without its read mark, and every slot drawn loses its
mark (CLOCK's second chance, sampled: O(misses) per call, no scan of the store). A hit costs
one mark; the warm path is one index lookup, one mark and one gather.
Memory: the budget for rows (its 4 KiB pages resident as rows arrive), plus 5 bytes per table row (slot index and miss count) and 9 per slot, touched when
the table opens: a first touch is a page fault, and faults next to the disk reads made the
first calls of a fresh table up to 7x slower than the ssd tier's (measured on a 4 GiB table
in this VM), so the index is paid for once, up front.

Threads take turns on the store (one lock, held for a call). A child forked from a process that
holds the table gets a private copy of the store and the index (copy-on-write: no memory until
one of them writes), consistent with its own counters, and its own disk reader (memory/ssd.py);
the two then fill their stores apart.

Shape legend: U distinct rows of a call, M of them missed.
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

from engram_lm.memory.aio import DEFAULT_QUEUE_DEPTH
from engram_lm.memory.codec import decode_rows, row_bytes
from engram_lm.memory.forksafe import ProcessLock
from engram_lm.memory.host import upload
from engram_lm.memory.ssd import SsdTable
from engram_lm.memory.table import MemoryTable

VICTIM_SAMPLES = 8  # slots drawn per entrant when the store is full


def anonymous_array(shape: tuple[int, ...], dtype, *, touch: bool) -> np.ndarray:
    """Zeroed anonymous memory as an array. With `touch`, on transparent huge pages where the
    kernel allows (one fault per 2 MiB instead of per 4 KiB) and every page touched now: a first
    touch costs a page fault (in a VM, a host fault too: measured up to 7x slower first calls
    on a 4 GiB table's index), which does not belong beside the disk reads of a call. Without
    `touch`, plain pages that fault in as used: a huge-page fault under page-cache pressure
    compacts memory synchronously (measured: a 52.8 GB table's cold prefill calls at p99 3x the
    ssd tier's), so memory filled call by call stays on 4 KiB pages."""
    nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # a forked child gets its own copy, as of its other state
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and touch:
        try:
            buf.madvise(advice)
        except OSError:
            pass
    array = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    if touch:
        array.fill(0)
    return array


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_bytes(text: str | int) -> int:
    """'512M', '4GiB', '2.5G', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    number = s[:-1] if s[-1:] in "KMGT" and s else s
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"memory budget {text!r}: write a size such as 512M, 4G or 1073741824") from None
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return int(value * scale)


def budget_shares(total: int | str | None, sizes: list[int]) -> list[int]:
    """Each table's share of a memory budget for all of them, in proportion to its file size and
    at most that size; `total` None: half the memory this machine has available (1 GiB where
    that is unknown)."""
    if total is None:
        free = available_memory_bytes()
        total = free // 2 if free is not None else 1 << 30
    total, whole = parse_bytes(total), sum(sizes)
    return [min(size, total * size // whole) if whole else 0 for size in sizes]


def table_budgets(total: int | str | None, dtype: str, shapes: list[tuple[int, int]]) -> list[int]:
    """`budget_shares` for tables given as (rows, dim) in an export's dtype."""
    return budget_shares(total, [rows * row_bytes(dtype, dim) for rows, dim in shapes])


def tiered_table(path: Path, rows: int, dim: int, dtype: str, *, budget_bytes: int | None = None,
                 device: torch.device | str = "cpu", shared_key: str | None = None) -> "TieredTable":  # fmt: skip
    """A tiered table over an exported file; without a budget, the default share (the whole
    file, or half the available memory). With `shared_key` (the file's content sha256), its row
    store is the one every process on the host serving that file maps (memory/shared_tiered.py)."""
    if budget_bytes is None:
        budget_bytes = table_budgets(None, dtype, [(rows, dim)])[0]
    if shared_key is not None:
        from engram_lm.memory.shared_tiered import SharedTieredTable

        return SharedTieredTable(path, rows, dim, dtype, budget_bytes=budget_bytes, device=device, content_sha256=shared_key)
    return TieredTable(path, rows, dim, dtype, budget_bytes=budget_bytes, device=device)


class TieredTable(MemoryTable):
    tier = "tiered"

    def __init__(self, path: Path, num_rows: int, dim: int, dtype: str, *, budget_bytes: int,
                 device: torch.device | str = "cpu", queue_depth: int = DEFAULT_QUEUE_DEPTH, engine: str = "auto",
                 age_every: int = 1000, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.num_rows, self.dim, self.dtype = num_rows, dim, dtype
        self.device = torch.device(device)
        self.row_bytes = row_bytes(dtype, dim)
        if budget_bytes < self.row_bytes:
            raise ValueError(f"memory budget {budget_bytes:,} bytes holds no row of {self.row_bytes} bytes; give at least "
                             "a few MB (or use the ssd tier, which holds no row)")  # fmt: skip
        self.capacity = min(num_rows, budget_bytes // self.row_bytes)
        need = self.capacity * self.row_bytes + 5 * num_rows
        free = available_memory_bytes()
        if free is not None and need > free:
            raise ValueError(f"memory budget of {self.capacity:,} rows ({self.capacity * self.row_bytes / 2**20:,.0f} MiB, "
                             f"+ {5 * num_rows / 2**20:,.0f} MiB of row index) exceeds the {free / 2**20:,.0f} MiB this "
                             "machine has available: give a smaller budget")  # fmt: skip
        self.disk = SsdTable(path, num_rows, dim, dtype, queue_depth=queue_depth, engine=engine)  # checks the file
        self.path, self.age_every = Path(path), age_every
        self._allocate()
        with warnings.catch_warnings():  # the store is writable; torch warns about non-writable NumPy buffers only
            warnings.simplefilter("ignore", UserWarning)
            self._store_t = torch.from_numpy(self.store)
        self._counts = [0, 0, 0]  # calls, hits, misses (distinct rows per call)
        self._age_chunk = -(-num_rows // age_every)
        self._rng = np.random.default_rng(seed)
        self._lock = ProcessLock()  # a prefetch worker and the caller never interleave on the store

    def _allocate(self) -> None:
        """The store and its index, this process's own (memory/shared_tiered.py maps them from /dev/shm).
        Slot s holds a row at store[s]; store[0] is never used, so that slot_of can say "not held" with 0.
        The store's pages appear as rows arrive (filled in order); the index is touched now."""
        self.store = anonymous_array((self.capacity + 1, self.row_bytes), np.uint8, touch=False)
        self.slot_of = anonymous_array((self.num_rows,), np.int32, touch=True)  # 0: not held
        self.seen = anonymous_array((self.num_rows,), np.uint8, touch=True)  # per row: misses while not held, saturating
        self.ref = anonymous_array((self.capacity + 1,), np.uint8, touch=True)  # per slot: read since a draw passed it
        self.row_in = anonymous_array((self.capacity + 1,), np.int64, touch=True)  # slot -> row
        self._age_at = np.zeros(1, dtype=np.int64)  # where the next slice of miss counts is halved
        self._used = np.zeros(1, dtype=np.int64)  # slots filled (in order) so far

    @property
    def hits(self) -> int:
        return self._counts[1]

    @property
    def misses(self) -> int:
        return self._counts[2]

    @property
    def used(self) -> int:
        return int(self._used[0])

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def gather_raw(self, unique_U: np.ndarray) -> torch.Tensor:
        """Encoded bytes (U, row_bytes) of sorted, distinct, in-range rows: held ones from the
        store, the rest read from the disk in one batch and admitted."""
        with self._lock:  # counters live in a list: an nn.Module's __setattr__ costs microseconds per call
            slots = self.slot_of[unique_U].astype(np.int64)  # NumPy indexes 3x faster with int64 than int32
            n_held = np.count_nonzero(slots)
            counts = self._counts  # calls, hits, misses (distinct rows)
            counts[0] += 1
            counts[1] += n_held
            if n_held == len(unique_U):  # the warm path: one mark, one gather
                self.ref[slots] = 1
                return self._store_t.index_select(0, torch.from_numpy(slots))  # torch's row gather beats NumPy's
            counts[2] += len(unique_U) - n_held
            self._age()  # only where rows are missed: the only place the counts decide anything
            held = slots > 0
            self.ref[slots[held]] = 1
            out = np.empty((len(unique_U), self.row_bytes), dtype=np.uint8)
            out[held] = self.store[slots[held]]
            missed = unique_U[~held]
            seen = self.seen[missed]
            seen += seen < 255
            self.seen[missed] = seen
            raw = self.disk.read_raw(missed)
            out[~held] = raw
            self._admit(missed, raw, seen)
            return torch.from_numpy(out)

    def _age(self) -> None:
        """Halve the next 1/age_every of the miss counts: every count halves once per age_every
        calls that miss, a slice at a time (halving a 320M-row table's counts at once stalls one
        call ~0.2 s; a warm call, all hits, pays nothing)."""
        start = int(self._age_at[0])
        stop = min(start + self._age_chunk, self.num_rows)
        np.right_shift(self.seen[start:stop], 1, out=self.seen[start:stop])
        self._age_at[0] = 0 if stop == self.num_rows else stop

    def _admit(self, missed_M: np.ndarray, raw_M: np.ndarray, seen_M: np.ndarray) -> None:
        used = int(self._used[0])
        room = min(self.capacity - used, len(missed_M))
        if room:
            self._fill(np.arange(used + 1, used + room + 1), missed_M[:room], raw_M[:room])
            self._used[0] = used + room
        keen = seen_M[room:] >= 2  # missed before: a one-off row never displaces anything
        if not keen.any():
            return
        rest, rest_raw = missed_M[room:][keen], raw_M[room:][keen]
        drawn = self._rng.integers(1, self.capacity + 1, size=(len(rest), VICTIM_SAMPLES))
        victims = drawn[np.arange(len(rest)), self.ref[drawn].argmin(axis=1)]
        free = self.ref[victims] == 0  # not read since a draw last passed over it
        self.ref[drawn] = 0  # every slot drawn loses its mark: read again, or be replaced next time
        victims, first = np.unique(victims[free], return_index=True)
        if len(victims):
            chosen = np.nonzero(free)[0][first]
            self._fill(victims, rest[chosen], rest_raw[chosen])

    def _fill(self, slots: np.ndarray, rows: np.ndarray, raw: np.ndarray) -> None:
        """Put `rows` into `slots`, unmapping the rows those slots held (a fresh slot's row_in maps no row to it)."""
        old = self.row_in[slots]
        self.slot_of[old[self.slot_of[old] == slots]] = 0
        self.store[slots] = raw
        self.row_in[slots] = rows
        self.slot_of[rows] = slots

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        unique, inverse = self.unique_rows(rows)  # range-checked
        vectors = decode_rows(self.gather_raw(unique), self.dtype, self.dim)
        return vectors.index_select(0, inverse).view(*rows.shape, self.dim)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return upload(self.gather_host(rows), self.device)  # gather_host checks the ids

    def close(self) -> None:
        self.disk.close()

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "dtype": self.dtype,
                "where": str(self.path), "budget_rows": self.capacity, "held_rows": self.used,
                "budget_bytes": self.capacity * self.row_bytes, "index_bytes": 5 * self.num_rows + 9 * self.capacity,
                "hit_rate": self.hit_rate, "o_direct": self.disk.direct}  # fmt: skip
