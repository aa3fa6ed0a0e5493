"""Where a table's rows can live on this machine, and what a cold lookup costs: `engram inspect`.

    RAM          the rows (values and scales) fit in available memory with a quarter to spare:
                 tier "ram" (or "mmap" with prefault)
    /dev/shm     they fit in the shared-memory filesystem: a copy there serves "mmap" at RAM speed
                 to every process (a copy, so twice the bytes while it is made)
    page cache   they do not fit: tier "mmap" keeps the recently used pages; the rest fault in
    direct       tier "direct": every row not in the hot-row cache is one random read

The cold-read rate is measured, not assumed: `random_reads` times a few hundred random 4 KiB
reads of the row bytes themselves with O_DIRECT (so the page cache cannot answer), at one read in
flight and at `in_flight`; one token needs up to H * layers row reads (48 for DeepSeek-V4.1), less
after batch dedup and the hot-row cache.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import time
from typing import Any

import numpy as np

__all__ = ["memory_info", "random_reads", "placement"]

BLOCK = 4096
HEADROOM = 0.75          # rows "fit" in memory when they take at most this share of it


def memory_info() -> dict[str, int]:
    """Bytes of RAM (total, available, from /proc/meminfo) and free in /dev/shm (0 where absent)."""
    info = {"ram_total": 0, "ram_available": 0, "shm_free": 0}
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        info["ram_total"], info["ram_available"] = fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        st = os.statvfs("/dev/shm")
        info["shm_free"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    return info


def _reads(fd: int, offsets: list[int], buf: memoryview) -> None:
    for offset in offsets:
        os.preadv(fd, [buf], offset)


def random_reads(path: str | os.PathLike[str], offset: int, nbytes: int, reads: int = 256, in_flight: int = 32,
                 seed: int = 0) -> dict[str, Any]:
    """Random 4 KiB reads/s inside bytes [offset, offset + nbytes) of a file, at depth 1 and `in_flight`.

    Returns:
        {"o_direct": bool, "reads_per_s_qd1": float, "reads_per_s": float, "in_flight": int};
        without O_DIRECT (tmpfs, some network filesystems) the reads may come from the page cache.
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd, direct = os.open(path, flags), bool(getattr(os, "O_DIRECT", 0))
    except OSError:
        fd, direct = os.open(path, os.O_RDONLY), False
    try:
        first, last = -(-offset // BLOCK), (offset + nbytes) // BLOCK - 1
        rng = np.random.default_rng(seed)
        blocks = rng.integers(first, max(first, last) + 1, size=2 * reads) * BLOCK
        buffers = [memoryview(mmap.mmap(-1, BLOCK)) for _ in range(in_flight)]     # page-aligned
        try:
            os.preadv(fd, [buffers[0]], int(blocks[0]))
        except OSError:                       # O_DIRECT accepted at open but refused on read
            os.close(fd)
            fd, direct = os.open(path, os.O_RDONLY), False
        start = time.perf_counter()
        _reads(fd, blocks[:reads // 4].tolist(), buffers[0])
        qd1 = (reads // 4) / (time.perf_counter() - start)
        share = [blocks[reads + i::in_flight].tolist() for i in range(in_flight)]
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            start = time.perf_counter()
            list(pool.map(_reads, [fd] * in_flight, share, buffers))
            deep = reads / (time.perf_counter() - start)
    finally:
        os.close(fd)
    return {"o_direct": direct, "reads_per_s_qd1": qd1, "reads_per_s": deep, "in_flight": in_flight}


def placement(row_bytes: int, rows_per_token: int, memory: dict[str, int],
              reads: dict[str, Any] | None) -> dict[str, Any]:
    """Where `row_bytes` of rows can live given `memory_info()`, and cold tokens/s from `random_reads`."""
    fits_ram = row_bytes <= HEADROOM * memory["ram_available"]
    fits_shm = row_bytes <= memory["shm_free"]
    out: dict[str, Any] = {
        "bytes": row_bytes, "ram_available": memory["ram_available"], "shm_free": memory["shm_free"],
        "fits_in_ram": fits_ram, "fits_in_shm": fits_shm,
        "page_cache_share": min(1.0, memory["ram_available"] / row_bytes) if row_bytes else 1.0,
        "rows_per_token": rows_per_token,
        "suggested_tier": "ram" if fits_ram else "mmap" if fits_shm else "direct",
    }
    if reads is not None:
        out["cold_reads_per_s"] = reads["reads_per_s"]
        out["cold_tokens_per_s"] = reads["reads_per_s"] / rows_per_token
        out["o_direct"] = reads["o_direct"]
    return out
