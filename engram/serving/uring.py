"""Batched file reads through io_uring, called by its system calls (Linux 5.6 and later).

The "direct" tier reads one decode step's rows, a few dozen scattered 4 KiB blocks, as one batch:
`Ring.read` writes a submission queue entry per read (numpy, all at once), hands them to the
kernel with one `io_uring_enter` that also waits for them, and yields the completions. Python runs
once per batch, not once per read, and the GIL is released while the kernel works.

Why system calls and not a binding: the kernel ABI (`io_uring_setup(2)`, `io_uring_enter(2)`,
<linux/io_uring.h>) is stable and small, and writing a whole batch of entries from numpy arrays
needs the ring's memory, which the Python bindings hide behind one call per entry. No library is
loaded: `Ring.create()` returns None where the kernel has no io_uring, refuses it (a container's
seccomp profile, the `kernel.io_uring_disabled` sysctl) or is older than 5.6, and the caller
reads another way.

A ring is used by one thread (it is created with IORING_SETUP_SINGLE_ISSUER where the kernel
has it) and one process: callers keep a ring per thread and make a new one after fork.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from collections.abc import Generator

import numpy as np

__all__ = ["Ring"]

_SYS_SETUP, _SYS_ENTER = 425, 426     # the same numbers on every architecture that has io_uring
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000
_ENTER_GETEVENTS = 1
_SETUP_CLAMP, _SETUP_SUBMIT_ALL, _SETUP_COOP_TASKRUN = 1 << 4, 1 << 7, 1 << 8
_SETUP_SINGLE_ISSUER, _SETUP_DEFER_TASKRUN = 1 << 12, 1 << 13
_FEAT_SINGLE_MMAP, _FEAT_NODROP, _FEAT_RW_CUR_POS = 1 << 0, 1 << 1, 1 << 3    # 5.4, 5.5, 5.6 (IORING_OP_READ)
_OP_READ = 22
# Newest flags first: each kernel takes the first set it knows (an unknown flag is EINVAL).
_SETUP_FLAGS = (_SETUP_CLAMP | _SETUP_SUBMIT_ALL | _SETUP_COOP_TASKRUN | _SETUP_SINGLE_ISSUER | _SETUP_DEFER_TASKRUN,
                _SETUP_CLAMP | _SETUP_SUBMIT_ALL | _SETUP_COOP_TASKRUN, _SETUP_CLAMP)

# struct io_uring_params: 10 u32 fields, then the SQ ring offsets and the CQ ring offsets (8 u32 + u64 each)
_PARAMS = np.dtype([("sq_entries", "<u4"), ("cq_entries", "<u4"), ("flags", "<u4"), ("sq_thread_cpu", "<u4"),
                    ("sq_thread_idle", "<u4"), ("features", "<u4"), ("wq_fd", "<u4"), ("resv", "<u4", 3),
                    ("sq_off", "<u4", 10), ("cq_off", "<u4", 10)])
_SQ_HEAD, _SQ_TAIL, _SQ_MASK, _SQ_ARRAY = 0, 1, 2, 6      # u32 indices into sq_off
_CQ_HEAD, _CQ_TAIL, _CQ_MASK, _CQ_CQES = 0, 1, 2, 5       # ... into cq_off
# struct io_uring_sqe (64 bytes; a read sets opcode (byte 0), fd (bytes 4-7), off, addr, len and
# user_data, each in its own 8-byte word) and struct io_uring_cqe (16 bytes)
_SQE = np.dtype([("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"), ("off", "<u8"), ("addr", "<u8"),
                 ("len", "<u4"), ("rw_flags", "<u4"), ("user_data", "<u8"), ("buf_index", "<u2"),
                 ("personality", "<u2"), ("splice_fd_in", "<i4"), ("addr3", "<u8"), ("pad", "<u8")])
_CQE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
assert _PARAMS.itemsize == 120 and _SQE.itemsize == 64 and _CQE.itemsize == 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                     ctypes.c_long]
# The ring's memory is mapped with libc's mmap: Python's mmap module would keep a duplicate of the
# ring's descriptor open per mapping.
_mmap, _munmap = _libc.mmap, _libc.munmap
_mmap.restype, _munmap.restype = ctypes.c_void_p, ctypes.c_int
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _setup(entries: int) -> tuple[int, np.ndarray]:
    """io_uring_setup with the newest flags this kernel accepts: (ring fd, its params)."""
    err = errno.EINVAL
    for flags in _SETUP_FLAGS:
        params = np.zeros(1, _PARAMS)
        params["flags"] = flags
        fd = _syscall(_SYS_SETUP, entries, params.ctypes.data, 0, 0, None, 0)
        if fd >= 0:
            return int(fd), params
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            break
    raise OSError(err, f"io_uring_setup: {os.strerror(err)}")


class Ring:
    """One io_uring instance of `entries` submission slots (see `create`)."""

    def __init__(self, fd: int, params: np.ndarray) -> None:
        p = params[0]
        self.fd, self.pid, self.entries = fd, os.getpid(), int(p["sq_entries"])
        sq_off, cq_off, cq_entries = p["sq_off"], p["cq_off"], int(p["cq_entries"])
        size = max(int(sq_off[_SQ_ARRAY]) + 4 * self.entries, int(cq_off[_CQ_CQES]) + _CQE.itemsize * cq_entries)
        self._maps: list[tuple[int, int]] = []          # (address, length) of each mapping
        self._finalizer = weakref.finalize(self, _close, fd, self._maps)     # it owns `fd` from here on
        try:
            ring = self._map(size, _OFF_SQ_RING)
            sqes = self._map(self.entries * _SQE.itemsize, _OFF_SQES)
        except BaseException:
            self._finalizer()
            raise

        def u32(at: int, count: int = 1) -> np.ndarray:
            return np.frombuffer(ring, "<u4", count, int(at))

        # The kernel moves the SQ head and the CQ tail; this side the SQ tail and the CQ head.
        self._sq_head, self._sq_tail = u32(sq_off[_SQ_HEAD]), u32(sq_off[_SQ_TAIL])
        self._cq_head, self._cq_tail = u32(cq_off[_CQ_HEAD]), u32(cq_off[_CQ_TAIL])
        u32(sq_off[_SQ_ARRAY], self.entries)[:] = np.arange(self.entries)      # slot i holds entry i
        # Entries as rows of 8 int64 words (a batch is written with one row copy) and completions
        # as their user_data (int64 word 0) and res (int32 word 2).
        self._sqes = np.frombuffer(sqes, "<i8", 8 * self.entries).reshape(self.entries, 8)
        at = int(cq_off[_CQ_CQES])
        self._cq_user = np.frombuffer(ring, "<i8", 2 * cq_entries, at)[0::2]
        self._cq_res = np.frombuffer(ring, "<i4", 4 * cq_entries, at)[2::4]

    def _map(self, length: int, offset: int) -> memoryview:
        """Map `length` bytes of the ring at `offset` (shared with the kernel, pre-faulted)."""
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        addr = _mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, self.fd, offset)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of an io_uring ring: {os.strerror(err)}")
        self._maps.append((addr, length))
        return memoryview((ctypes.c_ubyte * length).from_address(addr)).cast("B")

    @classmethod
    def create(cls, entries: int) -> Ring | None:
        """A ring of at least `entries` slots (a power of two, at most the kernel's limit), or None
        where this process cannot have one (no io_uring, refused, or a kernel older than 5.6)."""
        try:
            fd, params = _setup(max(1, entries))
        except OSError:
            return None
        needed = _FEAT_SINGLE_MMAP | _FEAT_NODROP | _FEAT_RW_CUR_POS
        if int(params[0]["features"]) & needed != needed:
            os.close(fd)
            return None
        try:
            return cls(fd, params)
        except OSError:
            return None

    @staticmethod
    def entry(fd: int, offset: int, length: int, addr: int, user: int) -> tuple[int, ...]:
        """One read's submission entry as 8 int64 words (a row of `reads`), from Python integers:
        for a few reads, cheaper than the numpy operations of `reads`."""
        return fd << 32 | _OP_READ, offset, addr, length, user, 0, 0, 0

    @staticmethod
    def reads(fds: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, addrs: np.ndarray) -> np.ndarray:
        """The submission entries of reads (int64 [n, 8]): job i reads `lengths[i]` bytes at
        `offsets[i]` of file `fds[i]` into memory at `addrs[i]`, and completes as user_data i."""
        n = fds.size
        sqes = np.zeros((n, 8), np.int64)
        sqes[:, 0] = np.left_shift(fds, 32) | _OP_READ         # opcode, flags 0, ioprio 0, fd
        sqes[:, 1], sqes[:, 2], sqes[:, 3], sqes[:, 4] = offsets, addrs, lengths, np.arange(n)
        return sqes

    def run(self, sqes: np.ndarray, depth: int) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Run the entries `sqes` (from `reads`) with at most `depth` in flight; yield (user_data,
        results) of the completions as they arrive (a result: bytes read, or -errno).

        With no more entries than `depth` (and the ring's slots), one system call submits them all
        and waits for every one. Otherwise the ring is refilled as reads complete. The memory read
        into must stay valid until the generator is finished; closed early, it first waits for the
        reads in flight.
        """
        n = sqes.shape[0]
        depth = max(1, min(depth, self.entries))
        submitted = in_flight = 0
        try:
            while submitted < n or in_flight:
                k = min(depth - in_flight, n - submitted)
                if k:
                    tail = int(self._sq_tail[0])
                    _put(self._sqes, tail & (self.entries - 1), sqes[submitted: submitted + k])
                    self._sq_tail[0] = (tail + k) & 0xFFFFFFFF
                    submitted += k
                    in_flight += k
                # Wait for all reads when none is left to submit, else for one, then refill.
                self._enter(in_flight if submitted == n else 1)
                user, res = self._reap()
                in_flight -= user.size
                yield user, res
        finally:
            while in_flight:          # never leave a read writing into memory the caller reuses
                self._enter(in_flight)
                in_flight -= self._reap()[0].size

    def _enter(self, wait: int) -> None:
        """Submit every entry not yet taken by the kernel, and wait for `wait` completions."""
        while True:
            pending = (int(self._sq_tail[0]) - int(self._sq_head[0])) & 0xFFFFFFFF
            ready = (int(self._cq_tail[0]) - int(self._cq_head[0])) & 0xFFFFFFFF
            if not pending and ready >= wait:
                return
            got = _syscall(_SYS_ENTER, self.fd, pending, max(0, wait - ready), _ENTER_GETEVENTS, None, 0)
            if got < 0:
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def _reap(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_data, result) of the completions posted so far (copies), marking them seen."""
        head, tail = int(self._cq_head[0]), int(self._cq_tail[0])
        first, count, size = head & (self._cq_user.size - 1), (tail - head) & 0xFFFFFFFF, self._cq_user.size
        if first + count <= size:
            user, res = self._cq_user[first: first + count].copy(), self._cq_res[first: first + count].astype(np.int64)
        else:
            slots = np.arange(first, first + count) & (size - 1)
            user, res = self._cq_user[slots], self._cq_res[slots].astype(np.int64)
        self._cq_head[0] = tail
        return user, res

    def close(self) -> None:
        """Release the ring (callers make sure no read is in flight)."""
        empty = np.empty(0, "<u4")          # drop the views of the ring's memory before it is unmapped
        self._sq_head = self._sq_tail = self._cq_head = self._cq_tail = empty
        self._sqes, self._cq_user, self._cq_res = np.empty((0, 8), np.int64), np.empty(0, np.int64), empty
        self._finalizer()


def _put(ring: np.ndarray, first: int, rows: np.ndarray) -> None:
    """Copy `rows` into the circular `ring` from slot `first` on (wrapping past its end)."""
    head = min(rows.shape[0], ring.shape[0] - first)
    ring[first: first + head] = rows[:head]
    if head < rows.shape[0]:
        ring[: rows.shape[0] - head] = rows[head:]


def _close(fd: int, maps: list[tuple[int, int]]) -> None:
    for addr, length in maps:
        _munmap(addr, length)
    os.close(fd)
