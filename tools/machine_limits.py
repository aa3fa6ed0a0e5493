"""What this machine allows, measured: the ceilings lookups are compared against.

- `gather_rate`: random rows/s a bare torch.index_select reaches over an in-RAM tensor with a
  reused output buffer (the memory-side limit of any lookup); the tensor sits in hugepage-backed
  memory, as the "ram" tier's rows do;
- `write_probe_file`: a file of real (random, non-sparse) bytes to measure reads on: reads of a
  sparse file's holes never reach the disk and would report the speed of memory instead;
- `random_read_iops`: random 4 KiB reads/s from a file with O_DIRECT at a given number of reads in
  flight (a thread pool of os.preadv calls; the disk-side limit of a cold lookup);
- `process_read_bytes`: bytes this process has read from storage so far (/proc/self/io), to
  measure what a cold lookup really read.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import time

import numpy as np
import torch

BLOCK = 4096
HUGEPAGE = 2 << 20


def gather_rate(table_bytes: int = 1 << 30, row_bytes: int = 256, rows_per_call: int = 1 << 19,
                repeats: int = 5, seed: int = 0) -> float:
    """Rows/s of torch.index_select(weight, 0, rows, out=buf) over random rows, one thread.

    `weight` [table_bytes // row_bytes, row_bytes // 4] float32 lives in an anonymous mapping marked
    MADV_HUGEPAGE (where the OS has it), every page faulted in before timing; best of `repeats`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = table_bytes // row_bytes
    nbytes = n * row_bytes
    region = mmap.mmap(-1, nbytes + HUGEPAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(region, dtype=torch.uint8)
        start = (-raw.data_ptr()) % HUGEPAGE                # 2 MiB-aligned start
        weight = raw[start: start + nbytes].view(torch.float32).view(n, row_bytes // 4)
        weight.fill_(1.0)                                   # fault every page in before timing
        rows = torch.from_numpy(np.random.default_rng(seed).integers(0, n, rows_per_call))
        out = torch.empty(rows_per_call, row_bytes // 4)
        torch.index_select(weight, 0, rows, out=out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.index_select(weight, 0, rows, out=out)
            best = min(best, time.perf_counter() - t0)
        del raw, weight
        return rows_per_call / best
    finally:
        torch.set_num_threads(threads)
        region.close()


def write_probe_file(path: str | os.PathLike[str], nbytes: int, seed: int = 0) -> None:
    """Write `nbytes` (rounded down to 1 MiB) of random bytes to `path` and fsync: every block real."""
    piece = np.random.default_rng(seed).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    left = nbytes // (1 << 20) * (1 << 20)
    with open(path, "wb") as f:
        while left > 0:
            f.write(piece[: min(left, len(piece))])
            left -= min(left, len(piece))
        f.flush()
        os.fsync(f.fileno())


def random_read_iops(path: str | os.PathLike[str], in_flight: int = 32, reads: int = 20000, seed: int = 0) -> float:
    """Random 4 KiB O_DIRECT reads/s over an existing file of at least a few MiB (not sparse)."""
    size = os.path.getsize(path) // BLOCK
    offsets = (np.random.default_rng(seed).integers(0, size, reads) * BLOCK).tolist()
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    fd = os.open(path, flags)
    try:
        def work(start: int) -> None:
            buf = mmap.mmap(-1, BLOCK)                      # page-aligned, as O_DIRECT needs
            for i in range(start, reads, in_flight):
                os.preadv(fd, [buf], offsets[i])

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(work, range(in_flight)))
        return reads / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def process_read_bytes() -> int:
    """Bytes this process caused to be read from storage (0 where /proc/self/io is missing)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return 0
