"""A hot-row cache in front of a slower tier (N-gram accesses are Zipfian).

Bounded to `capacity` rows kept on the compute device. Admission is frequency-aware (a
TinyLFU-style rule): every distinct row read bumps a small saturating counter; a missed
row enters the cache only once it has been seen `admit_after` times, and when the cache is
full it replaces the least-frequently-used slot only if it is more frequent than that
slot. Counters halve every `age_every` lookups so old popularity fades. Bookkeeping is
vectorised per call (no Python loop over rows). Counters: `hits`, `misses` count row
reads (duplicates within a call included), `hit_rate` = hits / (hits + misses).
"""

from __future__ import annotations

import torch

from engram_lm.memory.forksafe import ProcessLock
from engram_lm.memory.host import upload
from engram_lm.memory.table import MemoryTable


class CachedTable(MemoryTable):
    tier = "cache"

    def __init__(
        self,
        slow: MemoryTable,
        capacity: int,
        *,
        device: torch.device | str = "cpu",
        admit_after: int = 2,
        age_every: int = 1000,
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 row, got {capacity}")
        self.slow, self.capacity = slow, min(capacity, slow.num_rows)
        self.num_rows, self.dim = slow.num_rows, slow.dim
        self.device, self.admit_after, self.age_every = torch.device(device), admit_after, age_every
        self.values = torch.zeros(self.capacity, self.dim, device=self.device)
        self.slot_of = torch.full((self.num_rows,), -1, dtype=torch.int32)  # row -> slot, host side
        self.row_in = torch.full((self.capacity,), -1, dtype=torch.int64)  # slot -> row
        self.freq = torch.zeros(self.num_rows, dtype=torch.uint8)
        self.hits = self.misses = self.lookups = 0
        self._lock = ProcessLock()  # the slots, counters and values change on every call: one call at a time

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset_counters(self) -> None:
        self.hits = self.misses = 0

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        return self.forward(rows).cpu()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        self.check_rows(rows)
        with self._lock:
            return self._lookup(rows)

    def _lookup(self, rows: torch.Tensor) -> torch.Tensor:
        flat = rows.reshape(-1).cpu()
        unique, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        slots = self.slot_of[unique].long()
        hit = slots >= 0
        self.hits += int(counts[hit].sum())
        self.misses += int(counts[~hit].sum())
        self.freq[unique] = (self.freq[unique].int() + 1).clamp_max(255).to(torch.uint8)
        out = torch.empty(len(unique), self.dim, device=self.device)
        out[hit.to(self.device)] = self.values[slots[hit].to(self.device)]
        missed = unique[~hit]
        if len(missed):
            fetched = upload(self.slow.gather_host(missed), self.device).to(out.dtype)
            out[(~hit).to(self.device)] = fetched
            self._admit(missed, fetched)
        self._age()
        return out[inverse.to(self.device)].view(*rows.shape, self.dim)

    def _admit(self, missed: torch.Tensor, fetched: torch.Tensor) -> None:
        eligible = self.freq[missed] >= self.admit_after
        if not eligible.any():
            return
        cand = missed[eligible]
        cand_vals = fetched[eligible.to(fetched.device)]
        cand_freq = self.freq[cand]
        free = (self.row_in < 0).nonzero().flatten()
        n_free = min(len(free), len(cand))
        order = torch.argsort(cand_freq, descending=True)  # most frequent candidates first
        cand, cand_vals, cand_freq = cand[order], cand_vals[order.to(cand_vals.device)], cand_freq[order]
        self._place(free[:n_free], cand[:n_free], cand_vals[:n_free])
        rest, rest_vals, rest_freq = cand[n_free:], cand_vals[n_free:], cand_freq[n_free:]
        if len(rest) == 0:
            return
        occupied = (self.row_in >= 0).nonzero().flatten()
        slot_freq = self.freq[self.row_in[occupied]]
        k = min(len(rest), len(occupied))
        victims = occupied[torch.topk(slot_freq.int(), k, largest=False).indices]
        wins = rest_freq[:k].int() > self.freq[self.row_in[victims]].int()
        if wins.any():
            victims = victims[wins]
            self.slot_of[self.row_in[victims]] = -1
            self._place(victims, rest[:k][wins], rest_vals[:k][wins.to(rest_vals.device)])

    def _place(self, slots: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> None:
        if len(slots) == 0:
            return
        self.values[slots.to(self.device)] = vals
        self.row_in[slots] = rows
        self.slot_of[rows] = slots.to(torch.int32)

    def _age(self) -> None:
        self.lookups += 1
        if self.lookups % self.age_every == 0:
            self.freq >>= 1

    def close(self) -> None:
        self.slow.close()

    def placement(self) -> dict:
        return {"tier": self.tier, "rows": self.num_rows, "dim": self.dim, "capacity_rows": self.capacity,
                "bytes": self.values.numel() * self.values.element_size(), "where": str(self.device),
                "in_front_of": self.slow.placement(), "hit_rate": self.hit_rate}  # fmt: skip
