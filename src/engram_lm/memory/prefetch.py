"""Deterministic prefetch: fetch a layer's rows in the background while earlier blocks run.

Row ids depend only on tokens, so the model knows every Engram layer's rows before block
0 starts. `PrefetchingTable.prefetch(rows)` starts the slow gather on a worker thread (on
CUDA it then uploads on a side stream through pinned memory and records an event);
`table(rows)` waits only for that work (the event / the future), or gathers synchronously
when no prefetch for these rows is pending. A failure in the background is re-raised in
the caller, and waiting has a timeout, so nothing hangs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engram_lm.memory.table import MemoryTable

WAIT_TIMEOUT_S = 300.0
MIN_ASYNC_ROWS = 4096  # below this a hand-off to the worker costs more than the gather itself


def _single_threaded() -> None:
    """The worker's own ops run on one thread. OpenMP's thread count is per calling thread,
    so this leaves the compute threads alone; without it the worker starts a second
    OpenMP team that spins against the compute team on the same cores (measured on 2
    cores: every block 3-4x slower while it lives, prefill 2.8x slower)."""
    torch.set_num_threads(1)


class PrefetchingTable(MemoryTable):
    tier = "prefetch"

    def __init__(self, inner: MemoryTable, device: torch.device | str = "cpu", min_rows: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.min_rows = MIN_ASYNC_ROWS if min_rows is None else min_rows
        self.num_rows, self.dim = inner.num_rows, inner.dim
        self.device = torch.device(device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch",
                                            initializer=_single_threaded)  # fmt: skip
        self._pending: tuple[torch.Tensor, Future] | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetched = self.synchronous = 0

    def prefetch(self, rows: torch.Tensor) -> None:
        self.check_rows(rows)
        self._drain()  # at most one fetch in flight per table
        if rows.numel() < self.min_rows:  # e.g. a decode step: fetched in forward instead
            return
        self._pending = (rows, self._executor.submit(self._fetch, rows))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is rows:
            vectors, event = pending[1].result(timeout=WAIT_TIMEOUT_S)  # re-raises worker errors
            self.prefetched += 1
            return self._hand_over(vectors, event)
        if pending is not None:  # a prefetch for other rows: finish it, then fetch these
            pending[1].result(timeout=WAIT_TIMEOUT_S)
        self.synchronous += 1
        return self._hand_over(*self._fetch(rows))

    def _hand_over(self, vectors: torch.Tensor, event: torch.cuda.Event | None) -> torch.Tensor:
        if event is not None:  # the compute stream waits for the copy, and owns the memory after
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            vectors.record_stream(stream)
        return vectors

    def _fetch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        host = self.inner.gather_host(rows)
        if self._stream is None:
            return host.to(self.device), None
        with torch.cuda.stream(self._stream):
            staged = host if host.is_pinned() else host.pin_memory()
            vectors = staged.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return vectors, event

    def _drain(self) -> None:
        if self._pending is not None:
            _, future = self._pending
            self._pending = None
            future.result(timeout=WAIT_TIMEOUT_S)

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        return self.inner.gather_host(rows)

    def placement(self) -> dict:
        return {**self.inner.placement(), "prefetch": "cuda side stream" if self._stream else "worker thread"}

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
