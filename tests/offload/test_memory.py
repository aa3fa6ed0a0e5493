"""Resident memory stays within the cache while a process trains a table 8 times its cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import engram
from tests.offload.common import cache_for, make_table

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def test_resident_memory_is_bounded_by_the_cache_not_the_table(tmp_path):
    table = make_table(tmp_path / "t.engram", D=64, base=6000)     # 48k rows: 36 MiB of rows and moments
    cache = cache_for(5000, table.spec)                            # about 4.5 MiB: the table is 8 times the rows
    with engram.OffloadedRows.create(table.path, tmp_path / "work", cache_bytes=cache, lr=0.01) as rows:
        work_bytes = (tmp_path / "work" / "rows.bin").stat().st_size
        assert table.spec.total_rows > 8 * rows.stats().cache_rows
    out = subprocess.run([sys.executable, "-m", "tests.offload.worker", "rss", str(tmp_path / "work"), str(cache),
                          "60"], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    stats = got["stats"]
    assert stats["rows_read"] * 768 > 2 * work_bytes          # the table went through the cache twice over
    assert stats["evictions"] > 5 * stats["cache_rows"]
    # once the cache is full (a quarter of the steps), streaming the table through it again and again adds
    # none of the process's own memory (RssAnon; holding the rows would add 36 MiB). Pages of the working
    # copy mapped while rows are read or written back count in VmRSS as RssFile (with the libraries'
    # code): page cache the kernel reclaims under pressure, not memory the process holds
    growth = {k: (got[f"end{k}"] - got[f"warm{k}"]) / MIB for k in ("", "_anon", "_file")}
    assert got["end_anon"] - got["warm_anon"] < 24 * MIB, growth
    # the cache, and a constant: threads and their allocator arenas, staging buffers, first-use imports
    assert got["flushed"] - got["before"] < cache + 80 * MIB, got
