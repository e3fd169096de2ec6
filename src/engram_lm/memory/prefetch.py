"""Deterministic prefetch: fetch a layer's rows in the background while earlier blocks run.

Row ids depend only on tokens, so the model knows every Engram layer's rows before block
0 starts. `PrefetchingTable.prefetch(rows)` starts the slow gather on a worker thread (on
CUDA it then uploads on a side stream through pinned memory and records an event);
`table(rows)` waits only for that work (the event / the future), or gathers synchronously
when no prefetch for these rows is pending. A failure in the background is re-raised in
the caller, and waiting has a timeout, so nothing hangs.

Whether a prefetch is handed to the worker at all is decided from measurement
(`policy="auto"`, memory/handoff.py): where there is nothing to overlap (rows in RAM or
the page cache, cores busy with compute) the table learns that the synchronous gather is
faster and stops paying for the hand-off. `policy="always"` / `"never"` fix the mode.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engram_lm.memory.forksafe import ProcessLocal, ProcessLock
from engram_lm.memory.handoff import HandOffPolicy
from engram_lm.memory.table import MemoryTable

WAIT_TIMEOUT_S = 300.0
POLICIES = ("auto", "always", "never")


@dataclass
class _Pending:
    rows: torch.Tensor
    future: Future | None  # None: this prefetch was decided synchronous
    started: float


def single_threaded_worker() -> None:
    """The worker's own ops run on one thread. OpenMP's thread count is per calling thread,
    so this leaves the compute threads alone; without it the worker starts a second
    OpenMP team that spins against the compute team on the same cores (measured on 2
    cores: every block 3-4x slower while it lives, prefill 2.8x slower)."""
    torch.set_num_threads(1)


class PrefetchingTable(MemoryTable):
    tier = "prefetch"

    def __init__(self, inner: MemoryTable, device: torch.device | str = "cpu", policy: str = "auto") -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"prefetch policy must be one of {POLICIES}, got {policy!r}")
        self.inner, self.policy = inner, policy
        self.handoff = HandOffPolicy()
        self.num_rows, self.dim = inner.num_rows, inner.dim
        self.device = torch.device(device)
        # the worker thread of this process: a forked child has none of its parent's threads, so it starts its own
        self._executors = ProcessLocal(lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch",
                                                                  initializer=single_threaded_worker))  # fmt: skip
        self._lock = ProcessLock()  # callers on several threads take turns with the one pending fetch
        self._pending: _Pending | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.prefetched = self.synchronous = 0

    def prefetch(self, rows: torch.Tensor) -> None:
        self.check_rows(rows)
        with self._lock:
            executor = self._executor()
            self._drain()  # at most one fetch in flight per table
            mode = {"always": "async", "never": "sync"}.get(self.policy) or self.handoff.choose(rows.numel())
            future = executor.submit(self._fetch, rows) if mode == "async" else None
            self._pending = _Pending(rows, future, time.perf_counter())

    def _executor(self) -> ThreadPoolExecutor:
        """This process's worker; in a forked child, a new one, and the parent's pending fetch
        (on a thread the child does not have) forgotten."""
        if self._executors.forked:
            self._pending = None
        return self._executors.get()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._take(rows)

    def _take(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows: the pending fetch's when it is for these very rows, else read now."""
        self._executor()
        pending, self._pending = self._pending, None
        if pending is None or pending.rows is not rows:
            self.check_rows(rows)  # prefetched rows were checked by prefetch
        if pending is not None and pending.rows is rows:
            if pending.future is not None:
                vectors = self._hand_over(*pending.future.result(timeout=WAIT_TIMEOUT_S))  # re-raises worker errors
                self.prefetched += 1
            else:
                vectors = self._hand_over(*self._fetch(rows))
                self.synchronous += 1
            mode = "sync" if pending.future is None else "async"
            self.handoff.record(rows.numel(), mode, time.perf_counter() - pending.started)
            return vectors
        if pending is not None and pending.future is not None:  # a prefetch for other rows: finish it first
            pending.future.result(timeout=WAIT_TIMEOUT_S)
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
        pending, self._pending = self._pending, None
        if pending is not None and pending.future is not None:
            pending.future.result(timeout=WAIT_TIMEOUT_S)

    def gather_host(self, rows: torch.Tensor) -> torch.Tensor:
        return self.inner.gather_host(rows)

    def placement(self) -> dict:
        return {**self.inner.placement(), "prefetch": "cuda side stream" if self._stream else "worker thread",
                "prefetch_policy": self.policy, "prefetched": self.prefetched, "synchronous": self.synchronous}

    def close(self) -> None:
        if not self._executors.forked:
            self._executors.get().shutdown(wait=True, cancel_futures=True)
        self.inner.close()
