"""The tiered tier with its row store shared by every process on the host that serves the table.

`SharedTieredTable` is the tiered tier (memory/tiered.py: admission, CLOCK eviction, the
deep-queue reader for misses) over a `SharedRowStore` (memory/shared_store.py) instead of its
own memory: a row one process admitted is a hit for all. Reads take no lock: a slot's row is
kept when its seq was even and unchanged around the copy and the slot still holds the row asked
for; anything else is a miss, read from the disk by the process that needs it (outside any lock),
then admitted under the store's writer lock, which first drops the rows another process admitted
meanwhile. A process that finds the lock held does not wait: it serves its rows and leaves their
admission to a later miss (their miss counts kept), so no call waits for another's admission (a
blocking lock made the 52.8 GB table's decode p99 11 ms against 3 ms for private stores). Admissions are journaled (shared_store.py), so a process killed mid-admission leaves
the store consistent for the others.

Shape legend: U distinct rows of a call, M of them missed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engram_lm.memory.shared_store import JOURNAL, SHM, SharedRowStore, store_name
from engram_lm.memory.tiered import TieredTable


class SharedTieredTable(TieredTable):
    def __init__(self, path: Path, num_rows: int, dim: int, dtype: str, *, budget_bytes: int, content_sha256: str,
                 shm: Path = SHM, **kwargs) -> None:  # fmt: skip
        """`content_sha256`: the table file's hash (an export's manifest has it): it names the store."""
        self._content, self._shm = content_sha256, Path(shm)
        super().__init__(path, num_rows, dim, dtype, budget_bytes=budget_bytes, **kwargs)

    def _allocate(self) -> None:
        self.shared = SharedRowStore(store_name(self._content), self.num_rows, self.capacity, self.row_bytes, self.dtype,
                                     folder=self._shm)  # fmt: skip
        s = self.shared
        self.store, self.slot_of, self.seen, self.ref, self.row_in, self.seq = s.rows, s.slot_of, s.seen, s.ref, s.row_in, s.seq
        self._used, self._age_at = s.used, s.age_at  # in the header: every process sees them

    def gather_raw(self, unique_U: np.ndarray) -> torch.Tensor:
        """Encoded bytes (U, row_bytes) of sorted, distinct, in-range rows: the store's rows that a
        consistent read returns, the rest read from the disk in one batch and admitted."""
        counts = self._counts
        counts[0] += 1
        slots = self.slot_of[unique_U].astype(np.int64)
        before = self.seq[slots]
        got = self._store_t.index_select(0, torch.from_numpy(slots))  # a copy, between two reads of the versions
        good = (slots > 0) & (self.row_in[slots] == unique_U) & (before == self.seq[slots]) & (before & 1 == 0)
        n_good = int(np.count_nonzero(good))
        counts[1] += n_good
        if n_good == len(unique_U):  # the warm path: one gather, two version reads, one mark
            self.ref[slots] = 1
            return got
        self.ref[slots[good]] = 1
        missed = unique_U[~good]
        counts[2] += len(missed)
        seen = self.seen[missed]  # counts shared by all processes; a lost increment between two of them is harmless
        seen += seen < 255
        self.seen[missed] = seen
        raw = self.disk.read_raw(missed)  # the slow part, outside every lock
        out = got.numpy()
        out[~good] = raw
        if self._fresh(missed).any():  # replicas miss the same hot rows at once: the first to admit them spares the rest the lock
            with self._lock, self.shared.try_lock() as held:  # this process's threads; the others, if free now
                if held:  # else another process is admitting: these rows wait for the next miss (their counts kept)
                    self.shared.repair()  # a writer killed mid-admission: its slots emptied before anything else
                    self._age()
                    fresh = self._fresh(missed)  # again, under the lock
                    self._admit(missed[fresh], raw[fresh], seen[fresh])
        return got

    def _fresh(self, rows: np.ndarray) -> np.ndarray:
        """Which of these rows no process holds whole: a slot's claim checked against the row it holds and its
        version even (odd: being written, or left half-written by a process that died, which the lock repairs)."""
        slots = self.slot_of[rows]
        return ~((slots > 0) & (self.row_in[slots] == rows) & (self.seq[slots] & 1 == 0))

    def _fill(self, slots: np.ndarray, rows: np.ndarray, raw: np.ndarray) -> None:
        """Journaled: the journal first, the slots marked odd while they change, then even again."""
        for a in range(0, len(slots), JOURNAL):
            s, r, w = slots[a : a + JOURNAL], rows[a : a + JOURNAL], raw[a : a + JOURNAL]
            self.shared.begin(s, r)
            self.seq[s] += 1
            old = self.row_in[s]
            held = old >= 0
            mine = self.slot_of[old[held]] == s[held]
            self.slot_of[old[held][mine]] = 0
            self.store[s] = w
            self.row_in[s] = r
            self.slot_of[r] = s
            self.seq[s] += 1
            self.shared.commit()

    def close(self) -> None:
        super().close()
        self.__dict__.pop("_store_t", None)
        for name in ("store", "slot_of", "seen", "ref", "row_in", "seq", "_used", "_age_at"):
            self.__dict__.pop(name, None)
        self.shared.close()

    def placement(self) -> dict:
        return {**super().placement(), "shared": str(self.shared.path)}
