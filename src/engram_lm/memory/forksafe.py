"""State a process must not share with a child it forks, rebuilt in the child on first use.

Data loaders, servers and multiprocessing pools fork. A child inherits a copy of every lock (held
or not, by threads the child does not have), the descriptors of kernel AIO contexts it cannot use
(io_submit answers EINVAL), and thread pools without their threads. `ProcessLocal` holds such a
thing per process: `get()` returns this process's, making a new one after a fork. A child is told
by a generation count that `os.register_at_fork` bumps in it (as CPython's own threading and
random modules reset themselves): a check costs one global read, where os.getpid() is a system
call (0.19 us here). Measured with timeit: a ProcessLock costs 0.24 us per use, a plain lock 0.16,
one built on os.getpid() 0.79 (on a tiered tier's ~18 us warm decode call, the difference counts).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
_generation = 0  # bumped in the child right after every fork()


def _forked() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class ProcessLocal(Generic[T]):
    """`make()`'s result, made again in a process that forked from the one that made it."""

    __slots__ = ("_make", "_generation", "_value")

    def __init__(self, make: Callable[[], T]) -> None:
        self._make, self._generation = make, _generation
        self._value = make()

    def get(self) -> T:
        if self._generation != _generation:
            self._value, self._generation = self._make(), _generation
        return self._value

    @property
    def forked(self) -> bool:
        """True in a child that has not yet called get()."""
        return self._generation != _generation


class ProcessLock:
    """A threading.Lock for this process: a child after fork() gets a fresh, unheld one."""

    __slots__ = ("_lock", "_generation")

    def __init__(self) -> None:
        self._lock, self._generation = threading.Lock(), _generation

    def __enter__(self) -> "ProcessLock":
        if self._generation != _generation:
            self._lock, self._generation = threading.Lock(), _generation
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
