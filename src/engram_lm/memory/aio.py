"""Many block reads in flight from one Python thread: Linux native AIO, else a thread pool.

`BlockReader(fd).read(offsets, lengths, into)` reads every (offset, length) extent of a
file into its place in one page-aligned buffer. Two engines, same contract:
- `aio`: Linux native asynchronous I/O (io_setup / io_submit / io_getevents, the kernel
  interface fio's `libaio` engine uses) called through ctypes. The request blocks are
  built as one NumPy array, so a batch of thousands of reads costs a few system calls and
  no per-read Python; up to `queue_depth` requests are in flight (default 128: on this
  machine's virtio disk, 4 KiB random reads measured 45k/s at depth 32 and 88k/s at 128,
  against fio's 68k/s at depth 32). Truly asynchronous only on an O_DIRECT descriptor
  (buffered reads complete inside io_submit: correct, not deep).
- `threads`: min(queue_depth, 32) threads, each a loop of `os.preadv` (which releases the
  GIL) over its share of the extents. On 2 cores Python's GIL hand-offs cap it near 20-40k
  reads/s (measured); the fallback where AIO is missing (non-Linux, seccomp).
Every read must return its whole length (a short read past the end of the file is
allowed only up to `file_bytes`); anything else raises OSError naming the file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import threading

import numpy as np

from engram_lm.memory.forksafe import ProcessLocal, ProcessLock

BLOCK = 4096
DEFAULT_QUEUE_DEPTH = 128
MAX_THREADS = 32

# struct iocb and struct io_event of <linux/aio_abi.h> (little-endian layout)
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])  # fmt: skip
IO_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
IOCB_CMD_PREAD = 0
_SYSCALLS = {  # io_setup, io_destroy, io_getevents, io_submit
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "arm64": (0, 1, 4, 2),
}
assert IOCB.itemsize == 64 and IO_EVENT.itemsize == 32


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous page-aligned memory, as O_DIRECT requires; private, so a forked child reads into
    its own copy (Python maps anonymous memory shared unless told)."""
    return mmap.mmap(-1, max(BLOCK, -(-nbytes // BLOCK) * BLOCK), flags=mmap.MAP_PRIVATE)


def buffer_address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class _Aio:
    """One kernel AIO context (`queue_depth` slots). Raises OSError where AIO is unavailable."""

    def __init__(self, queue_depth: int) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or not platform.system() == "Linux":
            raise OSError(errno.ENOSYS, f"native AIO is not wired for {platform.system()} {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self.queue_depth = queue_depth
        self.ctx = ctypes.c_ulong(0)
        self._call(self._setup, ctypes.c_long(queue_depth), ctypes.byref(self.ctx))
        self.events = np.zeros(queue_depth, dtype=IO_EVENT)

    def _call(self, number: int, *args) -> int:
        while True:
            ret = self._syscall(ctypes.c_long(number), *args)
            if ret >= 0:
                return ret
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, f"AIO system call {number}: {os.strerror(err)}")

    def submit(self, pointers: np.ndarray) -> int:
        return self._call(self._submit, self.ctx, ctypes.c_long(len(pointers)), ctypes.c_void_p(pointers.ctypes.data))

    def reap(self, at_least: int) -> np.ndarray:
        n = self._call(self._getevents, self.ctx, ctypes.c_long(at_least), ctypes.c_long(self.queue_depth),
                       ctypes.c_void_p(self.events.ctypes.data), ctypes.c_void_p(None))  # fmt: skip
        return self.events[:n].copy()

    def close(self) -> None:
        if self.ctx.value:
            self._syscall(ctypes.c_long(self._destroy), self.ctx)
            self.ctx = ctypes.c_ulong(0)


class BlockReader:
    """Reads extents of one file into one aligned buffer with `queue_depth` reads in flight."""

    def __init__(self, fd: int, path: str, file_bytes: int, *, queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 engine: str = "auto") -> None:  # fmt: skip
        if engine not in ("auto", "aio", "threads"):
            raise ValueError(f"engine must be 'auto', 'aio' or 'threads', got {engine!r}")
        self.fd, self.path, self.file_bytes, self.queue_depth = fd, path, file_bytes, queue_depth
        self.engine = engine
        # a kernel AIO context serves the process that made it: a forked child makes its own on first use
        self._contexts = ProcessLocal(self._new_context)
        self._lock = ProcessLock()  # one batch at a time per reader (the AIO context is shared)

    def _new_context(self) -> "_Aio | None":
        """This process's AIO context (None: the thread pool), deciding the engine the first time."""
        if self.engine in ("auto", "aio"):
            try:
                context = _Aio(self.queue_depth)
                self.engine = "aio"
                return context
            except OSError:
                if self.engine == "aio":
                    raise
        self.engine = "threads"
        return None

    @property
    def _aio(self) -> "_Aio | None":
        return self._contexts.get()

    def read(self, offsets: np.ndarray, lengths: np.ndarray, into: mmap.mmap, starts: np.ndarray) -> None:
        """Read extent i (file bytes offsets[i] : offsets[i] + lengths[i]) to into[starts[i]:]."""
        offsets, lengths, starts = (np.asarray(a, dtype=np.int64) for a in (offsets, lengths, starts))
        if len(offsets) == 0:
            return
        with self._lock:
            aio = self._aio
            if aio is not None:
                self._read_aio(aio, offsets, lengths, into, starts)
            else:
                self._read_threads(offsets, lengths, into, starts)

    def _want(self, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return np.minimum(lengths, self.file_bytes - offsets)

    def _short(self, got: int, want: int, offset: int) -> OSError:
        return OSError(f"short read from {self.path}: {got} of {want} bytes at offset {offset}")

    def _read_aio(self, aio: _Aio, offsets, lengths, into, starts) -> None:
        n = len(offsets)
        iocbs = np.zeros(n, dtype=IOCB)
        iocbs["data"] = np.arange(n)
        iocbs["opcode"] = IOCB_CMD_PREAD
        iocbs["fildes"] = self.fd
        iocbs["buf"] = buffer_address(into) + starts
        iocbs["nbytes"] = lengths
        iocbs["offset"] = offsets
        pointers = (iocbs.ctypes.data + np.arange(n, dtype=np.uint64) * IOCB.itemsize).astype(np.uint64)
        want = self._want(offsets, lengths)
        submitted = done = 0
        while done < n:
            room = min(aio.queue_depth - (submitted - done), n - submitted)
            if room > 0:
                submitted += aio.submit(pointers[submitted : submitted + room])
            events = aio.reap(1)
            idx = events["data"].astype(np.int64)
            bad = events["res"] < want[idx]
            if bad.any():
                k = int(np.nonzero(bad)[0][0])
                res, i = int(events["res"][k]), int(idx[k])
                self._drain(aio, submitted - done - len(events))  # the buffer outlives no request
                if res < 0:
                    raise OSError(-res, f"reading {self.path} at offset {int(offsets[i])}: {os.strerror(-res)}")
                raise self._short(res, int(want[i]), int(offsets[i]))
            done += len(events)

    def _drain(self, aio: _Aio, outstanding: int) -> None:
        """Wait for requests still in flight before their buffer can be released."""
        while outstanding > 0:
            outstanding -= len(aio.reap(1))

    def _read_threads(self, offsets, lengths, into, starts) -> None:
        view = memoryview(into)
        want = self._want(offsets, lengths)
        errors: list[BaseException] = []

        def worker(share: np.ndarray) -> None:
            try:
                for i in share.tolist():
                    a = int(starts[i])
                    got = os.preadv(self.fd, [view[a : a + int(lengths[i])]], int(offsets[i]))
                    if got < want[i]:
                        raise self._short(got, int(want[i]), int(offsets[i]))
            except BaseException as e:  # re-raised in the caller
                errors.append(e)

        order = np.arange(len(offsets))
        n_threads = min(self.queue_depth, MAX_THREADS, len(order))
        threads = [threading.Thread(target=worker, args=(order[t::n_threads],), daemon=True) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        view.release()
        if errors:
            raise errors[0]

    def close(self) -> None:
        context = None if self._contexts.forked else self._contexts.get()  # a child never destroys its parent's
        if context is not None:
            context.close()
        self._contexts = ProcessLocal(lambda: None)
