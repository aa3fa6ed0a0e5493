"""Reading a batch of extents into a staging buffer and checking their blocks: io_uring or threads.

`engram.serving.direct` plans which byte ranges (extents) of which chunk files a gather reads;
this module reads them and checks each 4 KiB block read against its recorded xxh3-64 digest
before any row of it is used. Two ways, the same extents and the same checks:

- `read_ring`: through an io_uring ring (`engram.serving.uring`): the batch's entries are
  submitted together, and each completion is checked as it is reaped;
- `read_pool`: through a thread pool, each thread issuing its share of the extents one `preadv`
  at a time and checking each while the other reads are still in flight.

A job is (chunk, file offset, length, staging offset, bytes the file holds there); both return
the first problem found, (chunk, bytes got, bytes wanted) for a short read or (chunk, block,
digest, recorded) for a bad block, or None, and raise OSError for a failed read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
from collections.abc import Callable

import numpy as np
import xxhash

from engram.serving.uring import Ring
from engram.storage.format import CHECKED_BLOCK

__all__ = ["Check", "Job", "read_ring", "read_pool", "check_blocks"]

BLOCK = CHECKED_BLOCK
Job = tuple[int, int, int, int, int]      # chunk, file offset, length, staging offset, bytes the file holds there
Check = tuple[memoryview, int]            # the recorded block digests (uint64, flat) and blocks per chunk file


def read_ring(ring: Ring, sqes: np.ndarray, jobs: list[Job], view: memoryview, check: Check | None, depth: int,
              path_of: Callable[[int], str]) -> tuple | None:
    """Run the read entries `sqes` (entry i reads job i into `view`) with at most `depth` in flight,
    checking each job as it completes. `path_of(chunk)` names the file in an OSError."""
    # closing(): the reads in flight are waited for before anything leaves (the staging buffer is reused)
    with contextlib.closing(ring.run(sqes, depth)) as batches:
        for done, results in batches:
            for i, got in zip(done.tolist(), results.tolist(), strict=True):
                chunk, start, length, stage, want = jobs[i]
                if got < 0:
                    raise OSError(-got, f"{os.strerror(-got)} (reading {length} bytes at byte {start})", path_of(chunk))
                if got < want:
                    return chunk, got, want
                if check is not None:
                    bad = check_blocks(view[stage: stage + length], chunk, start, check)
                    if bad is not None:
                        return bad
    return None


def read_pool(pool: concurrent.futures.ThreadPoolExecutor, threads: int, fds: list[int], jobs: list[Job],
              view: memoryview, check: Check | None) -> tuple | None:
    """Read the jobs with `threads` tasks of `pool` (exactly min(threads, jobs) reads outstanding
    until the last ones land), each checking the blocks it read."""
    n_tasks = min(threads, len(jobs))
    tasks = [pool.submit(_read_jobs, fds, jobs[t::n_tasks], view, check) for t in range(n_tasks)]
    concurrent.futures.wait(tasks)      # every read has landed (or failed) before we go on
    for task in tasks:
        bad = task.result()
        if bad is not None:
            return bad
    return None


def _read_jobs(fds: list[int], jobs: list[Job], view: memoryview, check: Check | None) -> tuple | None:
    preadv = os.preadv
    for chunk, start, length, stage, want in jobs:
        buf = view[stage: stage + length]
        got = preadv(fds[chunk], [buf], start)
        if got < want:
            return chunk, got, want
        if check is not None:
            bad = check_blocks(buf, chunk, start, check)
            if bad is not None:
                return bad
    return None


def check_blocks(buf: memoryview, chunk: int, start: int, check: Check) -> tuple | None:
    """The first block of `buf` (read from byte `start` of chunk file `chunk`) whose xxh3-64 is not
    the recorded one, as (chunk, block, digest, recorded); None if all match."""
    digest = xxhash.xxh3_64_intdigest
    recorded, per_chunk = check
    first = chunk * per_chunk + start // BLOCK
    if len(buf) == BLOCK:                  # the common case: one block, no slicing
        got = digest(buf)
        return None if got == recorded[first] else (chunk, start // BLOCK, got, recorded[first])
    for k in range(len(buf) // BLOCK):
        got = digest(buf[k * BLOCK: (k + 1) * BLOCK])
        if got != recorded[first + k]:
            return chunk, start // BLOCK + k, got, recorded[first + k]
    return None
