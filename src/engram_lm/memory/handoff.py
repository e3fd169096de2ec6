"""Whether a background fetch pays, decided from measurement.

A prefetch hands the gather to a worker so that it overlaps the blocks before the Engram
layer. That pays when the gather is slow (cold SSD reads) and there is an idle unit to run
it on; it costs when the rows are already in RAM or the page cache and the cores are busy
with compute (measured on 2 cores: up to 9% slower warm). Neither case is known in advance,
and a cache warms up, so `HandOffPolicy` measures both ways and keeps the faster:

- what is timed is the whole interval from `prefetch(rows)` (right after hashing) to the
  Engram layer holding its rows: the blocks before it plus whatever of the fetch is not
  hidden. Both modes cover the same work, so the shorter interval is the better mode,
  whatever the cause (a slow gather, a hand-off, compute slowed by a busy worker);
- intervals are per row read and kept per size class (powers of two of the row count), so
  a decode step (tens of rows) and a prefill (thousands) decide separately;
- each class tries each mode `explore` times (alternating, the synchronous gather first:
  a first contact costs what it would without prefetch), then uses the mode with the
  lower median of its last `window` intervals, the hand-off only when it wins by more than
  `margin` (a tie goes to the synchronous gather: no thread, nothing to contend); every `recheck_every`-th call of a class
  tries the other mode once, so a change (a cache that has warmed, a load that came or
  went) is noticed. The price of staying adaptive is one call in `recheck_every` in the
  slower mode.
Pure bookkeeping: no threads, no clocks (the caller passes the seconds).
"""

from __future__ import annotations

import statistics
from collections import deque

MODES = ("sync", "async")


class HandOffPolicy:
    def __init__(self, *, explore: int = 2, window: int = 5, recheck_every: int = 32, margin: float = 0.03) -> None:
        if explore < 1 or window < 1 or recheck_every < 2 or not 0 <= margin < 1:
            raise ValueError("explore and window must be >= 1, recheck_every >= 2 and margin in [0, 1)")
        self.explore, self.window, self.recheck_every, self.margin = explore, window, recheck_every, margin
        self._samples: dict[int, dict[str, deque]] = {}
        self._calls: dict[int, int] = {}

    @staticmethod
    def size_class(num_rows: int) -> int:
        return max(int(num_rows), 1).bit_length()

    def _class(self, num_rows: int) -> tuple[int, dict[str, deque]]:
        c = self.size_class(num_rows)
        if c not in self._samples:
            self._samples[c] = {m: deque(maxlen=self.window) for m in MODES}
            self._calls[c] = 0
        return c, self._samples[c]

    def best(self, num_rows: int) -> str | None:
        """The faster mode for this size class once both are measured, else None."""
        _, samples = self._class(num_rows)
        if any(len(samples[m]) == 0 for m in MODES):
            return None
        sync, hand_off = (statistics.median(samples[m]) for m in MODES)
        return "async" if hand_off < sync * (1 - self.margin) else "sync"

    def choose(self, num_rows: int) -> str:
        c, samples = self._class(num_rows)
        self._calls[c] += 1
        seen = {m: len(samples[m]) for m in MODES}
        if min(seen.values()) < self.explore and self._calls[c] <= 2 * self.explore:
            return "sync" if seen["sync"] <= seen["async"] else "async"  # alternate, sync first
        best = self.best(num_rows) or "sync"
        if self._calls[c] % self.recheck_every == 0:
            return "sync" if best == "async" else "async"
        return best

    def record(self, num_rows: int, mode: str, seconds: float) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _, samples = self._class(num_rows)
        samples[mode].append(seconds / max(int(num_rows), 1))

    def summary(self) -> dict[str, dict[str, float | None]]:
        """size class (as 'rows<2^c') -> median seconds per row of each mode, for reports."""
        out = {}
        for c, samples in sorted(self._samples.items()):
            out[f"rows<2^{c}"] = {m: (statistics.median(samples[m]) if samples[m] else None) for m in MODES}
        return out
