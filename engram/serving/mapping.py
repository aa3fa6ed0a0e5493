"""Address-space plumbing: stitched read-only file mappings and hugepage-backed buffers.

Python's `mmap` module cannot place a mapping at a chosen address, so this module calls libc's
`mmap`, `munmap`, `madvise` and `mprotect` through ctypes (Linux and other POSIX systems).

Huge pages: reservations for file mappings are 2 MiB-aligned and each file is mapped where its
address and its file offset agree modulo 2 MiB, so the kernel can map every whole 2 MiB of a file
held in the page cache as one huge page (FilePmdMapped in /proc/self/smaps). It does so where the
mapping is advised MADV_HUGEPAGE (`hugepages=True`), and then a fault also reads the whole 2 MiB
around it; without, the mapping is advised MADV_RANDOM and a fault reads one 4 KiB page.
`hugepage_bytes` says how much of a range is mapped with huge pages.

A `Region` owns one range of address space. Numpy arrays made by `Region.array` keep the region
alive, and the range is unmapped only when the region and every array (and every torch tensor
made from one) are gone, so no view can ever outlive its pages.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["Region", "stitch_files", "anonymous", "HUGEPAGE", "hugepage_bytes", "MADV_WILLNEED"]

PROT_NONE, PROT_READ, PROT_WRITE = 0, mmap.PROT_READ, mmap.PROT_WRITE
MAP_SHARED, MAP_PRIVATE = mmap.MAP_SHARED, mmap.MAP_PRIVATE
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if os.uname().sysname == "Linux" else 0)
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
MADV_RANDOM = mmap.MADV_RANDOM
MADV_DONTNEED = mmap.MADV_DONTNEED
MADV_WILLNEED = mmap.MADV_WILLNEED
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if os.uname().sysname == "Linux" else None)  # 5.14
HUGEPAGE = 2 << 20  # transparent hugepage size on x86-64 and arm64 with 4 KiB pages

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _os_error(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(addr, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        raise _os_error(f"mmap(length={length}, fd={fd})")
    return result


def _unmap(addr: int, length: int) -> None:
    _libc.munmap(addr, length)


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise over [addr, addr+length); addr must be page-aligned."""
    if _libc.madvise(addr, length, advice) != 0:
        raise _os_error(f"madvise(advice={advice})")


class Region:
    """A range of address space owned by this process, unmapped when nothing refers to it.

    Args:
        length: bytes to reserve.
        prot, flags: as for mmap(2); the range is anonymous.
        align: the usable start (`addr`) is aligned to this many bytes (over-reserving).
    """

    def __init__(self, length: int, prot: int, flags: int, align: int = mmap.PAGESIZE) -> None:
        extra = align - mmap.PAGESIZE if align > mmap.PAGESIZE else 0
        base = _mmap(None, length + extra, prot, flags | MAP_ANONYMOUS, -1, 0)
        self.addr = base + (-base) % align
        self.length = length
        # Numpy arrays refer to this ctypes object; the range is unmapped when it is collected.
        self._buffer = (ctypes.c_ubyte * length).from_address(self.addr)
        finalizer = weakref.finalize(self._buffer, _unmap, base, length + extra)
        finalizer.atexit = False   # at exit the process releases its address space anyway

    def array(self, dtype: npt.DTypeLike, shape: Sequence[int], offset: int = 0, writable: bool = False) -> np.ndarray:
        """A numpy view of the region (read-only unless `writable`); it keeps the region alive."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        # numpy's stubs do not list ctypes arrays, which export the buffer protocol np.frombuffer reads
        arr = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset).reshape(shape)  # type: ignore[call-overload]
        arr.flags.writeable = writable
        return arr

    def advise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        madvise(self.addr + offset, self.length - offset if length is None else length, advice)

    def protect(self, prot: int) -> None:
        """Change the protection of the whole region (e.g. read-only once loaded)."""
        if _libc.mprotect(self.addr, self.length, prot) != 0:
            raise _os_error("mprotect")


def stitch_files(fds: Sequence[int], file_bytes: int, populate: bool = False, hugepages: bool = False) -> Region:
    """Map `len(fds)` files of `file_bytes` bytes each back to back into one read-only region.

    Reserves a 2 MiB-aligned PROT_NONE range, then maps each file at its offset with MAP_FIXED (so
    files of whole 2 MiB multiples start at 2 MiB boundaries), and advises the range: MADV_HUGEPAGE
    with `hugepages` (2 MiB pages, a fault reads 2 MiB), else MADV_RANDOM (no readahead).
    `populate` pre-faults every page. `file_bytes` must be a multiple of the page size.

    Example:
        >>> region = stitch_files([fd0, fd1], 1 << 20)       # 2 MiB of contiguous addresses
        >>> rows = region.array(np.float32, (n_rows, 64))     # read-only view over both files
    """
    if file_bytes % mmap.PAGESIZE:
        raise ValueError(f"file_bytes={file_bytes} is not a multiple of the page size {mmap.PAGESIZE}")
    region = Region(len(fds) * file_bytes, PROT_NONE, MAP_PRIVATE | MAP_NORESERVE, align=HUGEPAGE)
    for index, fd in enumerate(fds):
        _mmap(region.addr + index * file_bytes, file_bytes, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0)
    _advise_and_populate(region, 0, region.length, populate, hugepages)
    return region


def _advise_and_populate(region: Region, offset: int, length: int, populate: bool, hugepages: bool) -> None:
    """Advise MADV_HUGEPAGE (where the kernel has it) or MADV_RANDOM, then pre-fault if asked: after
    the advice, so that the faults already use 2 MiB pages."""
    advised = False
    if hugepages and MADV_HUGEPAGE is not None:
        try:
            region.advise(MADV_HUGEPAGE, offset, length)
            advised = True
        except OSError:       # no transparent huge pages in this kernel: plain pages
            pass
    if not advised:
        region.advise(MADV_RANDOM, offset, length)
    if not populate:
        return
    try:
        if MADV_POPULATE_READ is None:
            raise OSError("no MADV_POPULATE_READ")
        region.advise(MADV_POPULATE_READ, offset, length)
    except OSError:           # kernels before 5.14: touch one byte of every page
        region.array(np.uint8, (length,), offset=offset)[::mmap.PAGESIZE].sum()


def hugepage_bytes(addr: int, length: int) -> int:
    """Bytes backed by 2 MiB pages (file pages mapped whole, FilePmdMapped, and anonymous ones,
    AnonHugePages, from /proc/self/smaps) in this process's mappings that overlap [addr, addr +
    length), each counted whole; 0 where the system has no smaps."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 2)
                if "-" in head[0] and not head[0].endswith(":"):
                    start, _, stop = head[0].partition("-")
                    inside = int(start, 16) < addr + length and addr < int(stop, 16)
                elif inside and head[0] in ("FilePmdMapped:", "AnonHugePages:", "ShmemPmdMapped:"):
                    total += int(head[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def anonymous(length: int, hugepages: bool = True) -> Region:
    """A private read-write buffer; 2 MiB-aligned and marked MADV_HUGEPAGE when `hugepages`."""
    if not hugepages or MADV_HUGEPAGE is None:
        return Region(length, PROT_READ | PROT_WRITE, MAP_PRIVATE)
    region = Region(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, align=HUGEPAGE)
    try:
        region.advise(MADV_HUGEPAGE)
    except OSError:   # kernels without transparent hugepages: plain pages work the same
        pass
    return region


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages of a read-only shared file mapping under `arr` (data stays in the file).

    Used on np.memmap sources after their rows are copied, so reading a large file does not
    grow the process's resident set. Whole pages inside the array only; the caller guarantees
    `arr` is a C-contiguous view of a MAP_SHARED file mapping (MADV_DONTNEED on private memory
    would discard it).
    """
    if not arr.flags.c_contiguous:
        raise ValueError("release_pages needs a C-contiguous array")
    start = arr.ctypes.data
    first = start + (-start) % mmap.PAGESIZE
    last = (start + arr.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        madvise(first, last - first, MADV_DONTNEED)


def map_file_range(fd: int, offset: int, length: int, populate: bool = False,
                   hugepages: bool = False) -> tuple[Region, int]:
    """Map bytes [offset, offset + length) of a file read-only; returns (region, where they start in it).

    The mapping starts at the page holding `offset` (mmap offsets are page-aligned), placed so that
    its addresses and file offsets agree modulo 2 MiB (whole 2 MiB of the file can then be huge
    pages); the bytes begin at the returned offset into the region. The caller checks that the
    file holds the range: a page wholly past the end of the file would fault (SIGBUS) when touched.
    Advised as `stitch_files` does (MADV_HUGEPAGE with `hugepages`, else MADV_RANDOM); `populate`
    pre-faults every page.
    """
    start = offset - offset % mmap.PAGESIZE
    lead = start % HUGEPAGE                     # where the mapping starts past a 2 MiB boundary
    span = -(-(offset - start + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    region = Region(lead + max(span, mmap.PAGESIZE), PROT_NONE, MAP_PRIVATE | MAP_NORESERVE, align=HUGEPAGE)
    if span:
        _mmap(region.addr + lead, span, PROT_READ, MAP_SHARED | MAP_FIXED, fd, start)
        _advise_and_populate(region, lead, span, populate, hugepages)
    return region, lead + offset - start
