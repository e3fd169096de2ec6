"""One host-wide row store for the tiered tier, mapped by every process that serves the same table.

Four replicas of a model each holding their own hot rows need four budgets; mapped from one
file in /dev/shm they need one. The file is named from the table's content hash, its budget and
checked against its budget and row format, so two different tables never meet:

    /dev/shm/engram-lm-<hash>.store   header | journal | seq | row_in | ref | slot_of | seen | rows
    /dev/shm/engram-lm-<hash>.lock    flock'ed by writers; the kernel releases it when a holder dies

Readers take no lock (seqlock): a slot's `seq` is odd while a writer changes it; a reader copies
a slot's row between two reads of its seq and keeps it only when both are the same even number
and `row_in` still names the row it asked for; anything else is read from the disk as a miss.
So a reader never waits for a writer. Writers (admissions, evictions, the miss counts' aging,
opening and closing) take the lock. An admission first writes what it is about to change into
the journal (slots, the rows they held, the rows they will hold) and marks it applying; a writer
killed at any instruction leaves either an unapplied journal (nothing changed) or an applying
one, which the next writer to take the lock repairs: every slot it names is emptied (its seq
made even, both rows unmapped from it), so no half-written row is ever served. The header
registers each process (pid and start time); the last one out (the others dead or gone) removes
the files, and a store left half-built by a creator that died is rebuilt, never served. A store
opened with another table, budget or row format than the one mapped is refused, naming both.
x86-64 keeps loads ordered with loads and stores with stores, which the seqlock needs; other
architectures are not supported by this store (the private tiered tier works everywhere).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import weakref
from pathlib import Path

import numpy as np

from engram_lm.memory.forksafe import ProcessLocal

SHM = Path("/dev/shm")
MAGIC = b"ENGRAMSH"
VERSION = 1
MAX_PROCS = 256
JOURNAL = 1 << 16  # admissions journaled (and applied) in chunks of this many slots
CLEAN, APPLYING = 0, 1
HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("ready", "<u4"), ("key", "S96"), ("num_rows", "<i8"),
                   ("capacity", "<i8"), ("row_bytes", "<i8"), ("used", "<i8", (1,)), ("age_at", "<i8", (1,)),
                   ("journal_state", "<i8"), ("journal_n", "<i8"), ("procs", "<i8", (MAX_PROCS, 2))])  # fmt: skip
HEADER_BYTES = 1 << 16
assert HEADER.itemsize <= HEADER_BYTES


def store_name(content_sha256: str) -> str:
    """The file stem: the table's content hash (its budget and row format are checked against the header)."""
    return f"engram-lm-{content_sha256[:32]}"


def layout(num_rows: int, capacity: int, row_bytes: int) -> dict[str, tuple[int, np.dtype, tuple[int, ...]]]:
    """Every array of the file: name -> (byte offset, dtype, shape), 64-byte aligned."""
    parts = [("journal", np.int64, (JOURNAL, 3)), ("seq", np.uint32, (capacity + 1,)), ("row_in", np.int64, (capacity + 1,)),
             ("ref", np.uint8, (capacity + 1,)), ("slot_of", np.int32, (num_rows,)), ("seen", np.uint8, (num_rows,)),
             ("rows", np.uint8, (capacity + 1, row_bytes))]  # fmt: skip
    out, offset = {}, HEADER_BYTES
    for name, dtype, shape in parts:
        out[name] = (offset, np.dtype(dtype), shape)
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 64) * 64
    out["_end"] = (offset, np.dtype(np.uint8), (0,))
    return out


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(procs: np.ndarray) -> np.ndarray:
    """Per registered (pid, start time): is that very process still running (not a reused pid)?"""
    return np.array([bool(p) and _start_time(int(p)) == int(t) for p, t in procs], dtype=bool)


def _any_alive(procs: np.ndarray) -> bool:
    return bool(_alive(procs).any())


class SharedRowStore:
    """The mapped file and its arrays (`journal`, `seq`, `row_in`, `ref`, `slot_of`, `seen`, `rows`, the
    header's `used` and `age_at`), registered for this process; `lock()` for writers."""

    def __init__(self, name: str, num_rows: int, capacity: int, row_bytes: int, row_format: str, *,
                 folder: Path = SHM) -> None:  # fmt: skip
        self.path, self.lock_path = Path(folder) / f"{name}.store", Path(folder) / f"{name}.lock"
        self.key = f"rows {num_rows}, budget {capacity} rows of {row_bytes} bytes, {row_format}".encode()
        self.parts = layout(num_rows, capacity, row_bytes)
        self.size = self.parts["_end"][0]
        if not self.path.exists():  # refused before anything is created or mapped
            self._check_room()
        # flock belongs to an open file description, which fork() shares: a child opens its own
        self._lock_fds = ProcessLocal(lambda: os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600))
        self._pid = os.getpid()
        with self.lock():
            fresh = self._open_or_create()
            self._map()
            if fresh:
                self._initialise(num_rows, capacity, row_bytes)
            self.repair()
            self._register()
        self._finalizer = weakref.finalize(self, _release, self._mm, self.path, self.lock_path, self._pid, self._lock_fds)

    # ---- the file ------------------------------------------------------------------------------
    def _open_or_create(self) -> bool:
        """Under the lock: open the store (False), or create it (True) when it is missing or was left
        stale or half-built by processes no longer alive. A store in use with another budget or row
        format is refused, naming both."""
        header = self._read_header()
        if header is not None and header["ready"] == 1 and bytes(header["key"]) == self.key and \
                self.path.stat().st_size == self.size:  # fmt: skip
            return False
        if header is not None and _any_alive(header["procs"]):
            self._refuse(header)
        self._check_room()
        self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)
        return True

    def _read_header(self):
        if not self.path.exists() or self.path.stat().st_size < HEADER.itemsize:
            return None
        header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
        return header if header["magic"] == MAGIC and header["version"] == VERSION else None

    def _check_room(self) -> None:
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        if self.size > free:
            raise ValueError(f"{self.path.parent} has {free / 2**20:,.0f} MiB free, the shared store needs "
                             f"{self.size / 2**20:,.0f} MiB (rows, index and header): give a smaller budget, or "
                             "enlarge /dev/shm (mount -o remount,size=...)")  # fmt: skip

    def _map(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.header = np.frombuffer(self._mm, dtype=HEADER, count=1)
        for name, (offset, dtype, shape) in self.parts.items():
            if name != "_end":
                count = int(np.prod(shape))
                setattr(self, name, np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset).reshape(shape))
        self.used, self.age_at = self.header["used"][0], self.header["age_at"][0]  # 1-element views into the header

    def _initialise(self, num_rows: int, capacity: int, row_bytes: int) -> None:
        h = self.header[0]
        h["version"], h["key"], h["num_rows"], h["capacity"], h["row_bytes"] = VERSION, self.key, num_rows, capacity, row_bytes
        self.row_in.fill(-1)  # slot 0 is never used: slot_of says "not held" with 0
        h["magic"] = MAGIC
        h["ready"] = 1  # last: a store without it was left half-built

    def _refuse(self, header) -> None:
        raise ValueError(f"the shared store {self.path} holds this table as {bytes(header['key']).decode(errors='replace')}; "
                         f"this process asks for {self.key.decode()}: open it with the same budget and row format as "
                         "the processes already serving it, or with shared=False")  # fmt: skip

    # ---- writers ---------------------------------------------------------------------------------
    def lock(self) -> "_FileLock":
        return _FileLock(self._lock_fds.get())

    def try_lock(self) -> "_FileLock":
        """The lock if no other process holds it now, else nothing (`with store.try_lock() as held:`)."""
        return _FileLock(self._lock_fds.get(), wait=False)

    def begin(self, slots: np.ndarray, new_rows: np.ndarray) -> None:
        """Journal a change of these slots (under the lock), then mark it applying."""
        n = len(slots)
        self.journal[:n, 0], self.journal[:n, 1], self.journal[:n, 2] = slots, self.row_in[slots], new_rows
        self.header["journal_n"] = n
        self.header["journal_state"] = APPLYING

    def commit(self) -> None:
        self.header["journal_state"] = CLEAN

    def repair(self) -> int:
        """Under the lock: empty every slot an interrupted admission named; how many."""
        if int(self.header["journal_state"][0]) != APPLYING:
            return 0
        n = int(self.header["journal_n"][0])
        slots = self.journal[:n, 0].copy()
        self.seq[slots] |= 1  # a writer's state: readers skip these slots while they are emptied
        for rows in (self.journal[:n, 1], self.journal[:n, 2]):  # the rows they held and were to hold
            valid = rows >= 0
            mine = self.slot_of[rows[valid]] == slots[valid]
            self.slot_of[rows[valid][mine]] = 0
        self.row_in[slots] = -1
        self.ref[slots] = 0
        self.seq[slots] += 1
        self.commit()
        return n

    # ---- processes -------------------------------------------------------------------------------
    def _register(self) -> None:
        procs = self.header["procs"][0]
        procs[~_alive(procs)] = 0
        free = np.nonzero(procs[:, 0] == 0)[0]
        if not len(free):
            raise ValueError(f"the shared store {self.path} is mapped by {MAX_PROCS} processes, its limit")
        procs[free[0]] = (self._pid, _start_time(self._pid) or 0)

    def close(self) -> bool:
        """Unregister; the last process out removes the files. True when it did. Also run at interpreter
        exit for a store nobody closed (a process killed with SIGKILL cannot: the next one to open the
        store finds it registered to nobody alive, and reuses or rebuilds it)."""
        for name in list(self.parts) + ["header", "used", "age_at"]:
            self.__dict__.pop(name, None)
        return bool(self._finalizer())


def _release(mm: mmap.mmap, path: Path, lock_path: Path, pid: int, lock_fds: ProcessLocal) -> bool:
    """Unregister `pid` (only from the process that registered it: never from a forked child) and, when no
    registered process is alive any more, remove the store and its lock file; then unmap."""
    last = False
    if os.getpid() == pid and not lock_fds.forked:
        fd = lock_fds.get()
        with _FileLock(fd):
            procs = np.frombuffer(mm, dtype=HEADER, count=1)["procs"][0]
            procs[procs[:, 0] == pid] = 0
            last = not _any_alive(procs)
            del procs
            if last:
                path.unlink(missing_ok=True)
                lock_path.unlink(missing_ok=True)
        os.close(fd)
    try:
        mm.close()
    except BufferError:  # a gathered view still refers to the mapping: it goes with that view
        pass
    return last


class _FileLock:
    """flock on the store's lock file: exclusive among writers, released by the kernel if the holder dies.
    With wait=False, `with` yields whether it was taken (another holder: False at once)."""

    def __init__(self, fd: int, wait: bool = True) -> None:
        self.fd, self.wait, self.held = fd, wait, False

    def __enter__(self):
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
                self.held = True
                return self if self.wait else True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise

    def __exit__(self, *exc) -> None:
        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False
