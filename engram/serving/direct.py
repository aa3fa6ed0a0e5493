"""Direct row reads: `pread` from a thread pool into aligned buffers, bypassing the page cache.

One gather of n rows: deduplicate and sort the rows (skipped when the caller passes them sorted
and distinct, as the table's gather engine does), which puts them in file-offset order; turn
them into block-aligned extents of their chunk files (rows sharing a 4 KiB block, or in blocks
at most GAP_BYTES apart, are read together: one read covers them and the gap; extents never
cross an `EXTENT_BYTES` boundary); read the extents with `io_threads` reads in flight; then copy
every row out of the staging buffer.

How the reads are issued (`DirectReader.io_engine`):
- "io_uring" where the kernel offers it (`engram.serving.uring`): the calling thread writes one
  submission entry per extent and one system call submits them and waits for them, so a decode
  step's few dozen reads cost one trip into the kernel, not a Python hand-off each; larger
  gathers keep `io_threads` in flight, refilling as reads complete. Each thread has its own ring.
- "threads" elsewhere (no io_uring, or refused by a seccomp profile or sysctl): a thread pool of
  `io_threads` threads, each issuing its share of the extents one `preadv` at a time (the GIL is
  released during each call).

Why read through gaps: on SSDs and virtual disks a small read costs about as much as a few
blocks (a fixed per-read cost dominates until reads grow large), so two blocks read apart cost
two read slots while one extent across a small gap costs one slightly larger read. Queue depth:
`engram.open(path, tier="direct", io_threads=32)` keeps exactly min(io_threads, extents) reads
outstanding per gather, since such disks serve random reads several times faster with many in
flight than one at a time. Concurrent gathers of one table share the pool, so io_threads also
bounds the table's reads in flight as a whole. The figures behind these choices are in
docs/performance.md ("Design measurements").

Files are opened with O_DIRECT where the filesystem allows it (reads go straight to the device;
buffers, offsets and lengths are 4 KiB-aligned). Elsewhere (tmpfs, some network filesystems)
they are read through the page cache with readahead off (POSIX_FADV_RANDOM), and the ranges
read are dropped from the cache again (POSIX_FADV_DONTNEED) so the tier never relies on it.
"""

from __future__ import annotations

import concurrent.futures
import errno
import math
import os
import threading
from collections.abc import Iterator

import numpy as np
import torch

from engram.serving.extent_reads import Job, read_pool, read_ring
from engram.serving.mapping import MAP_PRIVATE, PROT_READ, PROT_WRITE, Region
from engram.serving.uring import Ring
from engram.storage.chunks import block_error, chunk_error, fadvise, open_chunk
from engram.storage.format import CHECKED_BLOCK, LayerLayout
from engram.storage.tabledir import TableDir

__all__ = ["DirectReader", "BLOCK", "EXTENT_BYTES", "IO_ENGINES"]

BLOCK = CHECKED_BLOCK       # 4096: alignment of O_DIRECT offsets, lengths and buffers; one block digest each
EXTENT_BYTES = 128 << 10    # extents never cross a multiple of this (bounds one read)
GAP_BYTES = 8 << 10         # rows up to this far apart are read in one extent, gap included
STAGE_BYTES = 32 << 20      # staging buffer per window of extents (bounds memory per call)
SMALL_GATHER = 64           # gathers of at most this many rows are planned without numpy (`_gather_few`)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
IO_ENGINES = ("io_uring", "threads")


class DirectReader:
    """Reads rows of a table's layers straight from its chunk files.

    Args:
        tdir: the open table directory.
        layouts: the chunk layout of every layer.
        io_threads: reads kept in flight (the I/O thread pool's size; see the module notes).
        o_direct: True to require O_DIRECT, False to read through the page cache (dropping what
            was read), None to use O_DIRECT where the filesystem supports it.
    """

    def __init__(self, tdir: TableDir, layouts: dict[int, LayerLayout], io_threads: int = 32,
                 o_direct: bool | None = None) -> None:
        self._root = tdir.path
        self._layouts = layouts
        self._io_threads = io_threads
        self._fds: dict[int, list[int]] = {}
        self._fd_arrays: dict[int, np.ndarray] = {}     # the same, as int64 arrays (io_uring entries)
        self._local = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._pool_lock = threading.Lock()
        # Per layer, the recorded digest of every block of its chunk files (uint64 [n_chunks, blocks
        # per chunk]), filled by the tier; every block read is checked against them while `verify_blocks`.
        self.block_digests: dict[int, np.ndarray] = {}
        self.verify_blocks = True
        try:
            self.o_direct = self._open_all(tdir, o_direct)
        except BaseException:
            self.close()
            raise
        self._fd_arrays = {lid: np.array(fds, np.int64) for lid, fds in self._fds.items()}
        # "io_uring" where this process can have a ring, else "threads"; set it to "threads" to
        # compare the two (both read the same extents and check the same blocks).
        self.io_engine = "io_uring" if self._ring() is not None else "threads"

    # -- files ------------------------------------------------------------------------------
    def _open_all(self, tdir: TableDir, o_direct: bool | None) -> bool:
        use_direct = bool(_O_DIRECT) and o_direct is not False
        for layer_id, lay in self._layouts.items():
            fds = self._fds.setdefault(layer_id, [])
            for index in range(lay.n_chunks):
                fd = self._open_one(tdir, lay, index, use_direct)     # size checked
                if fd is None:          # the filesystem refuses O_DIRECT: read through the cache
                    if o_direct:
                        raise OSError(errno.EINVAL, "O_DIRECT is not supported for "
                                      f"{os.fspath(lay.chunk_path(tdir.path, index))!r}")
                    self._close_fds()
                    return self._open_all(tdir, False)
                fds.append(fd)
                if not use_direct:
                    fadvise(fd, "RANDOM")
        return use_direct

    @staticmethod
    def _open_one(tdir: TableDir, lay: LayerLayout, index: int, use_direct: bool) -> int | None:
        try:
            fd = open_chunk(tdir, lay, index, os.O_RDONLY | (_O_DIRECT if use_direct else 0))
        except OSError as exc:
            if use_direct and exc.errno == errno.EINVAL:
                return None
            raise
        if use_direct:   # some filesystems accept the flag but fail the first read
            probe = Region(BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE)
            try:
                os.preadv(fd, [probe.array(np.uint8, (BLOCK,), writable=True).data], 0)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EINVAL:
                    return None
                raise
        return fd

    def files(self) -> Iterator[tuple[LayerLayout, int, int]]:
        """(layout, chunk index, open file descriptor) of every chunk file read."""
        for layer_id, fds in self._fds.items():
            for index, fd in enumerate(fds):
                yield self._layouts[layer_id], index, fd

    def _close_fds(self) -> None:
        for fds in self._fds.values():
            for fd in fds:
                os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        """Close the files and stop the thread pool (callers make sure no gather is running)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._close_fds()
        self._local = threading.local()   # drops every thread's staging buffer and ring

    def _ring(self) -> Ring | None:
        """This thread's io_uring ring (made on first use, again after fork), None where refused."""
        ring = getattr(self._local, "ring", None)
        if ring is None or ring.pid != os.getpid():
            ring = self._local.ring = Ring.create(self._io_threads)
        return ring

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:   # threads do not survive fork: a forked child makes its own pool
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(self._io_threads, "engram-io")
                self._pool_pid = os.getpid()
            return self._pool

    def _staging(self, nbytes: int) -> np.ndarray:
        """A per-thread, page-aligned staging buffer of at least `nbytes` (reused across calls)."""
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.size < nbytes:
            buf = Region(nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE).array(np.uint8, (nbytes,), writable=True)
            self._local.staging = buf
        return buf

    # -- gather -----------------------------------------------------------------------------
    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor,
               sorted_unique: bool = False) -> tuple[int, int]:
        """out[i] = row rows[i] of the layer; `rows` int64 [n] in range, `out` [n, D] contiguous.

        `sorted_unique` says `rows` is already sorted and distinct (the rows are then read straight
        into `out`); otherwise they are deduplicated here first. Returns (bytes read, read calls).
        """
        lay = self._layouts[layer_id]
        if rows.size == 0:
            return 0, 0
        out_bytes = out.view(torch.uint8).view(rows.size, lay.row_bytes)          # [n, row_bytes]
        ring = self._ring() if self.io_engine == "io_uring" else None
        if ring is not None and rows.size <= SMALL_GATHER:
            return self._gather_few(ring, lay, rows.tolist(), out_bytes, sorted_unique)
        if sorted_unique:
            uniq, inverse, dest = rows, None, out_bytes
        else:
            found, inv = torch.unique(torch.from_numpy(rows), sorted=True, return_inverse=True)
            uniq, inverse = found.numpy(), inv
            dest = torch.empty((uniq.size, lay.row_bytes), dtype=torch.uint8)
        plan = _plan_extents(uniq, lay)
        for window in _windows(plan, STAGE_BYTES):
            self._read_window(ring, lay, plan, window, dest)
        if inverse is not None:   # expand the unique rows to the requested order, byte for byte
            torch.index_select(dest, 0, inverse, out=out_bytes)
        return int(plan["ext_len"].sum()), int(plan["ext_len"].size)

    def extent_ids(self, layer_id: int, uniq: np.ndarray) -> np.ndarray:
        """For sorted distinct rows `uniq` of a layer, the read extent each falls in (int64 [n],
        non-decreasing): rows with the same id are read by one call when read together."""
        return _plan_extents(uniq, self._layouts[layer_id])["row_ext"]

    def _read_window(self, ring: Ring | None, lay: LayerLayout, plan: dict[str, np.ndarray],
                     window: tuple[int, int, int, int], dest: torch.Tensor) -> None:
        first_ext, stop_ext, first_row, stop_row = window
        ext_start = plan["ext_start"][first_ext:stop_ext]
        ext_len = plan["ext_len"][first_ext:stop_ext]
        ext_chunk = plan["ext_chunk"][first_ext:stop_ext]
        stage_off = np.zeros(ext_len.size, np.int64)
        np.cumsum(ext_len[:-1], out=stage_off[1:])
        staging = self._staging(int(stage_off[-1] + ext_len[-1]))
        # The last block of a file may be partial: a read there returns only the bytes the file has.
        want = np.minimum(ext_len, lay.chunk_bytes - ext_start)
        jobs = list(zip(ext_chunk.tolist(), ext_start.tolist(), ext_len.tolist(), stage_off.tolist(), want.tolist(),
                        strict=True))
        sqes = None if ring is None else \
            Ring.reads(self._fd_arrays[lay.layer_id][ext_chunk], ext_start, ext_len, staging.ctypes.data + stage_off)
        self._read(ring, sqes, lay, jobs, staging)
        # Each row's bytes sit at stage_off[extent] + (its file offset - extent start).
        ext_of_row = plan["row_ext"][first_row:stop_row] - first_ext
        pos = stage_off[ext_of_row] + plan["row_byte"][first_row:stop_row] - ext_start[ext_of_row]
        rows_in, R = _rows_view(staging, lay)
        torch.index_select(rows_in, 0, torch.from_numpy(pos // R), out=dest[first_row:stop_row])

    def _gather_few(self, ring: Ring, lay: LayerLayout, rows: list[int], out_bytes: torch.Tensor,
                    sorted_unique: bool) -> tuple[int, int]:
        """`gather` of a few rows (a decode step's) planned with Python integers, where numpy's cost
        per call would exceed the work: the extents of `_plan_extents`, read with one submission."""
        R, B = lay.row_bytes, BLOCK
        extents: list[list[int]] = []              # [chunk, first byte, end byte]
        at: dict[int, tuple[int, int]] = {}        # row -> (its extent, its offset in the file)
        prev_chunk = prev_first = prev_last = -1
        for row in (rows if sorted_unique else sorted(set(rows))):
            chunk, r = divmod(row, lay.chunk_rows)
            byte = lay.file_offset + r * R
            first, last = byte - byte % B, -(-(byte + R) // B) * B
            if (chunk != prev_chunk or first > prev_last + GAP_BYTES
                    or first // EXTENT_BYTES != prev_first // EXTENT_BYTES):       # the rule of `_plan_extents`
                extents.append([chunk, first, last])
            extents[-1][2] = last
            at[row] = (len(extents) - 1, byte)
            prev_chunk, prev_first, prev_last = chunk, first, last
        jobs, stage = [], 0
        for chunk, first, last in extents:
            jobs.append((chunk, first, last - first, stage, min(last, lay.chunk_bytes) - first))
            stage += last - first
        staging = self._staging(stage)
        fds, base = self._fds[lay.layer_id], staging.ctypes.data
        sqes = np.array([Ring.entry(fds[c], start, n, base + to, i) for i, (c, start, n, to, _) in enumerate(jobs)],
                        np.int64)
        self._read(ring, sqes, lay, jobs, staging)
        rows_in, R = _rows_view(staging, lay)
        index = []
        for row in rows:
            ext, byte = at[row]
            index.append((jobs[ext][3] + byte - jobs[ext][1]) // R)
        torch.index_select(rows_in, 0, torch.tensor(index), out=out_bytes)
        return stage, len(jobs)

    def _read(self, ring: Ring | None, sqes: np.ndarray | None, lay: LayerLayout, jobs: list[Job],
              staging: np.ndarray) -> None:
        """Read the jobs into `staging` (through `ring` with its entries `sqes`, else the thread
        pool), checking every block against its recorded digest; raise on a short read or bad block."""
        digests = self.block_digests.get(lay.layer_id) if self.verify_blocks else None
        check = None if digests is None else (digests.reshape(-1).data.cast("B").cast("Q"), digests.shape[1])
        fds = self._fds[lay.layer_id]
        if ring is not None and sqes is not None:
            bad = read_ring(ring, sqes, jobs, staging.data, check, self._io_threads,
                            lambda chunk: os.fspath(lay.chunk_path(self._root, chunk)))
        else:
            bad = read_pool(self._executor(), self._io_threads, fds, jobs, staging.data, check)
        if bad is not None and len(bad) == 3:
            chunk, got, want = bad
            raise chunk_error(lay, chunk, lay.chunk_path(self._root, chunk),
                              f"returned {got} of {want} bytes (truncated after the table was opened?)")
        if bad is not None:
            chunk, block, got, recorded = bad
            raise block_error(lay, lay.chunk_path(self._root, chunk), chunk, block, got, recorded)
        if not self.o_direct:
            for chunk in sorted({job[0] for job in jobs}):
                fadvise(fds[chunk], "DONTNEED")


def _rows_view(staging: np.ndarray, lay: LayerLayout) -> tuple[torch.Tensor, int]:
    """A torch view of the staging buffer whose row i // step holds the row read at byte i, and step.

    Staging and file offsets of an extent agree modulo BLOCK, so when BLOCK is a multiple of
    row_bytes and the rows start at a multiple of it in the file, they start at one in the staging
    buffer: whole rows, step row_bytes. Rows at other offsets (a tensor inside a checkpoint shard)
    are gathered from a view whose row i is staging bytes [i, i + row_bytes): step 1.
    """
    R = lay.row_bytes
    if math.gcd(R, BLOCK, lay.file_offset) == R:
        return torch.from_numpy(staging[: staging.size // R * R]).view(-1, R), R               # [*, R]
    return torch.from_numpy(staging).as_strided((staging.size - R + 1, R), (1, 1)), 1          # [*, R]


def _plan_extents(uniq: np.ndarray, lay: LayerLayout) -> dict[str, np.ndarray]:
    """Block-aligned read extents covering the sorted unique rows `uniq` of one layer."""
    chunk = uniq // lay.chunk_rows
    row_byte = lay.file_offset + (uniq - chunk * lay.chunk_rows) * lay.row_bytes   # offset inside the chunk file
    first = row_byte // BLOCK * BLOCK
    last = -(-(row_byte + lay.row_bytes) // BLOCK) * BLOCK              # block-aligned end
    new = np.ones(uniq.size, bool)
    # A new extent starts at a new chunk file, after a gap of more than GAP_BYTES, or across an
    # EXTENT_BYTES boundary.
    new[1:] = ((chunk[1:] != chunk[:-1]) | (first[1:] > last[:-1] + GAP_BYTES)
               | (first[1:] // EXTENT_BYTES != first[:-1] // EXTENT_BYTES))
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], uniq.size) - 1        # the last row of each extent
    ext_start = first[starts]
    return {
        "ext_start": ext_start,
        "ext_len": last[ends] - ext_start,               # `last` never decreases inside an extent
        "ext_chunk": chunk[starts],
        "row_ext": np.cumsum(new) - 1,
        "row_byte": row_byte,
    }


def _windows(plan: dict[str, np.ndarray], budget: int) -> list[tuple[int, int, int, int]]:
    """Split the extents into runs of about `budget` staging bytes: (ext range, row range)."""
    ext_len = plan["ext_len"]
    if ext_len.size == 0:
        return []
    window_of_ext = np.cumsum(ext_len) // budget        # a window ends past each budget multiple
    bounds = np.flatnonzero(np.diff(window_of_ext)) + 1
    ext_edges = [0, *bounds.tolist(), ext_len.size]
    row_edges = np.searchsorted(plan["row_ext"], ext_edges).tolist()
    return [(ext_edges[i], ext_edges[i + 1], row_edges[i], row_edges[i + 1]) for i in range(len(ext_edges) - 1)]
