"""CPU threads that follow the machine's load, so a shared machine slows a run by its share.

PyTorch starts one OpenMP thread per core. On a machine where other work holds a core, a
team of two threads waits at every barrier for the one the scheduler parked, spinning the
while: measured here (2 cores, the quickstart's Engram model, 40 steps) 7,271 tok/s quiet,
2,119 beside one busy process and 1,334 beside two, where one thread gives 4,447 and
2,777 (its fair share). Waiting passively (OMP_WAIT_POLICY=PASSIVE) avoids the spin but costs
35% on a quiet machine (4,745 tok/s).

So a CPU run counts, every few seconds, the cores other processes kept busy (the machine's
busy time from /proc/stat less this process's own CPU time) and uses the cores left:
    threads = clamp(round(cores - busy_elsewhere), 1, cores)
It goes back up when the other work ends, never above torch's own starting count. A thread
count the user set (OMP_NUM_THREADS) is left alone, as is every machine without /proc/stat.
The thread count changes float sums in their last bits (40 steps: val loss 5.86927 at 2
threads, 5.86772 at 1): a run that must repeat bit for bit sets OMP_NUM_THREADS.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

CHECK_EVERY_S = 5.0


def threads_for(cores: int, busy_elsewhere: float) -> int:
    """The threads to use when other processes keep `busy_elsewhere` cores busy (a float)."""
    return max(1, min(cores, math.floor(cores - busy_elsewhere + 0.5)))


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def user_chose_threads() -> bool:
    """True when OMP_NUM_THREADS fixes the thread count."""
    return bool(os.environ.get("OMP_NUM_THREADS", "").strip())


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall_s: float
    machine_busy_s: float  # all cores, every process
    own_cpu_s: float  # this process, every thread


def read_cpu() -> CpuSample | None:
    """One reading of the machine's busy time and this process's CPU time; None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy_ticks = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return CpuSample(time.monotonic(), busy_ticks / os.sysconf("SC_CLK_TCK"), time.process_time())


def busy_elsewhere(before: CpuSample, after: CpuSample) -> float:
    """Cores other processes kept busy between two readings."""
    wall = after.wall_s - before.wall_s
    if wall <= 0:
        return 0.0
    others = (after.machine_busy_s - before.machine_busy_s) - (after.own_cpu_s - before.own_cpu_s)
    return max(0.0, others / wall)


class ThreadGovernor:
    """Sets torch's intra-op threads from the load every `every_s` seconds (call `tick()` often;
    it costs a clock read between checks). `enabled` is False where the user fixed the count or
    the machine has no /proc/stat; `changes` lists (threads, busy_elsewhere) as decided."""

    def __init__(self, *, every_s: float = CHECK_EVERY_S, cores: int | None = None,
                 read: Callable[[], CpuSample | None] = read_cpu, set_threads: Callable[[int], None] = torch.set_num_threads,
                 enabled: bool | None = None) -> None:  # fmt: skip
        self.every_s, self.read, self.set_threads = every_s, read, set_threads
        self.cores = cores or min(usable_cores(), torch.get_num_threads())
        self._last = read()
        self.enabled = (not user_chose_threads() if enabled is None else enabled) and self._last is not None
        self.threads = torch.get_num_threads()
        self.changes: list[tuple[int, float]] = []

    def tick(self, now_s: float | None = None) -> int | None:
        """Adjust when a check is due (`now_s`: the monotonic clock, read when not given); the
        new thread count when it changed, else None."""
        if not self.enabled or (now_s if now_s is not None else time.monotonic()) - self._last.wall_s < self.every_s:
            return None
        now = self.read()
        if now is None:
            return None
        elsewhere, self._last = busy_elsewhere(self._last, now), now
        threads = threads_for(self.cores, elsewhere)
        if threads == self.threads:
            return None
        self.set_threads(threads)
        self.threads = threads
        self.changes.append((threads, round(elsewhere, 2)))
        return threads


_PROCESS_GOVERNOR: ThreadGovernor | None = None


def process_governor() -> ThreadGovernor:
    """The one governor of this process, made at its first CPU run: torch's thread count is
    process state, so a second run (the quickstart's Engram model) goes on from the first's
    decision, and the ceiling stays torch's count before any run lowered it."""
    global _PROCESS_GOVERNOR
    if _PROCESS_GOVERNOR is None:
        _PROCESS_GOVERNOR = ThreadGovernor()
    return _PROCESS_GOVERNOR
