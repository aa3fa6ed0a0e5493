"""Lookup counters: what a table's lookups asked for and where the rows came from.

    s = table.stats()            # a frozen LookupStats snapshot
    s.unique_fraction, s.cache_hit_rate, s.to_dict()
    table.reset_stats()

Counting takes one short lock per layer lookup (a few integer additions), so it stays on.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

__all__ = ["LookupStats", "StatsCounter"]


@dataclasses.dataclass(frozen=True)
class LookupStats:
    """A snapshot of a table's lookup counters (since open or the last `reset_stats()`).

    Row counts add up: rows_from_cache + rows_from_memory + rows_from_disk == rows_unique.
    """

    lookups: int = 0            # layer lookups served: one per layer of lookup()/prefetch(), one per rows()
    prefetches: int = 0         # table.prefetch() calls
    rows_requested: int = 0     # rows asked for (B*T*H per layer lookup, n per rows())
    rows_unique: int = 0        # rows left after batch dedup (equal to rows_requested where dedup is off)
    rows_from_cache: int = 0    # ... served by the hot-row cache
    rows_from_memory: int = 0   # ... read from the "ram" or "mmap" tier
    rows_from_disk: int = 0     # ... read from the "direct" tier
    bytes_from_disk: int = 0    # bytes the "direct" tier read (whole 4 KiB blocks)
    disk_reads: int = 0         # read calls the "direct" tier issued
    blocked_seconds: float = 0.0  # time spent waiting in Prefetch.result() for unfinished prefetches
    cached_rows: int = 0        # rows held by the hot-row cache now (not reset by reset_stats)

    @property
    def unique_fraction(self) -> float:
        """rows_unique / rows_requested (1.0 before any lookup)."""
        return self.rows_unique / self.rows_requested if self.rows_requested else 1.0

    @property
    def cache_misses(self) -> int:
        """Rows the hot-row cache did not hold (read from the tier): rows_unique - rows_from_cache."""
        return self.rows_unique - self.rows_from_cache

    @property
    def cache_hit_rate(self) -> float:
        """rows_from_cache / rows_unique (0.0 before any lookup).

        With batch dedup on (the `direct` tier's default) this is the share of each batch's
        distinct rows the cache served, which falls as batches grow (the repeated hot rows of a
        large batch are read once anyway); with dedup off it is the share of requested rows.
        """
        return self.rows_from_cache / self.rows_unique if self.rows_unique else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every counter, plus unique_fraction, cache_misses and cache_hit_rate."""
        return {**dataclasses.asdict(self), "unique_fraction": self.unique_fraction,
                "cache_misses": self.cache_misses, "cache_hit_rate": self.cache_hit_rate}


_COUNTERS = tuple(f.name for f in dataclasses.fields(LookupStats) if f.name != "cached_rows")


class StatsCounter:
    """Thread-safe running totals behind `Table.stats()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)     # ints, and blocked_seconds a float
        self._totals["blocked_seconds"] = 0.0

    def add(self, **counts: float) -> None:
        """Add to counters by name, e.g. add(lookups=1, rows_requested=n)."""
        with self._lock:
            totals = self._totals
            for name, value in counts.items():
                totals[name] += value

    def add_memory_gather(self, requested: int, unique: int, cached: int) -> None:
        """Count one layer lookup served from memory: `add(lookups=1, rows_requested=requested,
        rows_unique=unique, rows_from_cache=cached, rows_from_memory=unique - cached)`, at a
        fraction of the cost of keyword arguments (a decode step's lookup takes microseconds)."""
        with self._lock:
            totals = self._totals
            totals["lookups"] += 1
            totals["rows_requested"] += requested
            totals["rows_unique"] += unique
            totals["rows_from_cache"] += cached
            totals["rows_from_memory"] += unique - cached

    def snapshot(self, cached_rows: int = 0) -> LookupStats:
        with self._lock:
            return LookupStats(**self._totals, cached_rows=cached_rows)

    def reset(self) -> None:
        with self._lock:
            for name in self._totals:
                self._totals[name] = 0.0 if name == "blocked_seconds" else 0
