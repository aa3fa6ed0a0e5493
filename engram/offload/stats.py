"""OffloadStats: where an OffloadedRows' rows came from and what waiting for them cost.

    s = rows.stats()          # a frozen snapshot of the counters since open (or reset_stats)
    s.hit_rate, s.to_dict()
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["OffloadStats"]


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """Counters of a working copy's cache (since open or `reset_stats()`).

    Row counts are distinct rows per call: a lookup's or step's rows are hits (in the cache, perhaps
    still being read by a prefetch: `late`) or misses (read by the call itself); hits + misses is
    every distinct row lookups and steps asked for.
    """

    lookups: int = 0            # lookup calls (one layer each)
    rows_requested: int = 0     # rows lookups asked for (B*T*H per lookup)
    hits: int = 0               # distinct rows of lookups and steps found in the cache
    misses: int = 0             # ... read from disk by the lookup or step itself
    late: int = 0               # hits whose prefetch was still reading them (the call waited)
    prefetches: int = 0         # prefetch calls
    prefetched: int = 0         # rows prefetches read into the cache
    rows_read: int = 0          # rows read from the working copy into the cache (by anyone)
    bytes_read: int = 0         # ... their bytes (records: row and moments)
    evictions: int = 0          # rows evicted from the cache
    rows_written: int = 0       # dirty rows written back (evicted, or at a flush)
    bytes_written: int = 0      # bytes written to the working copy (records in place and the undo log)
    flushes: int = 0            # flushes (snapshots flush too)
    wait_seconds: float = 0.0   # time lookups and steps spent waiting for rows (misses, late prefetches,
    #                             write-back backpressure)
    cache_rows: int = 0         # slots of the cache (rows it holds at most)

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses) (1.0 before any lookup)."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}
