"""The row-gather engine behind `Table._gather`: batch dedup, hot-row cache, tier reads, counters.

One gather of n row ids (a layer's B*T*H rows, or `Table.rows`):
1. dedup (where on): `torch.unique(sorted=True, return_inverse=True)` gives the u distinct ids,
   sorted, i.e. in file-offset order for the "direct" tier;
2. cache probe (where a hot-row cache is loaded): each id's cache slot or -1;
3. hits are copied from the cache and misses read from the tier into a per-thread staging buffer
   [u, D], hits first;
4. one `index_select` scatters the staged rows back to the requested order in `out`.
Without dedup and cache the tier gathers straight into `out`.

Quantized rows (`DecodingGatherer`): the engine above gathers the stored values (int8 / E4M3
bytes, packed int4 / int2 codes) exactly as it gathers float rows, so the hot-row cache and dedup
staging hold encoded values (a quarter of float32's bytes, an eighth or a sixteenth for int4 /
int2: that many times the rows per byte of cache); the scales of the
requested rows are gathered from the tier's resident scale tensor, and one vectorized decode
(`engram.storage.quant.decode_into`: `decode` without its argument checks) writes the result dtype
straight into the lookup's output.

When dedup pays: `torch.unique` over a batch's ids costs about as much as gathering every row
from memory, and gathering only the unique rows then scattering them back costs as much or more
even when few rows are distinct (docs/performance.md, "Design measurements"). So dedup never pays where a
row read is a memory copy, and always where it is a disk read (microseconds):
DEDUP_TIERS = ("direct",) by default; `engram.open(..., dedup=True|False)` overrides.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from engram.addressing.spec import TableSpec
from engram.dtypes import storage_torch_dtype
from engram.serving.cache import HotRowCache
from engram.serving.stats import StatsCounter
from engram.serving.tiers import DirectTier
from engram.storage.quant import decode_into

if TYPE_CHECKING:
    from engram.serving.tiers import Tier

__all__ = ["DEDUP_TIERS", "RowGatherer", "DecodingGatherer", "unique_inverse"]

DEDUP_TIERS = ("direct",)


# Per-thread buffers up to this size are kept for the next gather (a fresh buffer costs page
# faults on every lookup); larger requests (e.g. `table.rows` over a whole layer) get a buffer of
# their own, so one big call does not pin its memory until the table closes.
KEEP_BUFFER_BYTES = 256 << 20


def _reused(local: threading.local, name: str, nbytes: int) -> torch.Tensor:
    """A uint8 buffer of at least `nbytes`: the thread's kept one, grown if needed and allowed."""
    buf = getattr(local, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        if nbytes <= KEEP_BUFFER_BYTES:
            setattr(local, name, buf)
    return buf


def unique_inverse(rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Sorted distinct ids of int64 `rows` [n] and, per id, its index among them (torch int64 [n])."""
    uniq, inverse = torch.unique(torch.from_numpy(rows), sorted=True, return_inverse=True)
    return uniq.numpy(), inverse


class RowGatherer:
    """Gathers rows of a tier through dedup and a hot-row cache, counting everything.

    Args:
        tier: the storage tier (answers `gather(layer_id, rows, out, sorted_unique=False)`,
            returning (bytes, reads) for disk tiers and None for memory ones).
        dedup: read each distinct row of a gather once.
        stats: where to count.
    """

    def __init__(self, tier: Tier, dedup: bool, stats: StatsCounter) -> None:
        self.tier, self.dedup, self.stats = tier, dedup, stats
        self.cache: HotRowCache | None = None     # replaced whole, never changed in place
        self._disk = tier.name == "direct"
        self._local = threading.local()

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor) -> None:
        """out[i] = row rows[i] of the layer (`rows` int64 [n] in range, `out` [n, D] contiguous)."""
        n = rows.size
        cache = self.cache
        layer_cache = None if cache is None else cache.layers.get(layer_id)
        if n == 0:
            self.stats.add(lookups=1)
            return
        if not self.dedup and layer_cache is None:
            self._count(n, n, 0, self.tier.gather(layer_id, rows, out))
            return
        keys, inverse = unique_inverse(rows) if self.dedup else (rows, None)
        u = keys.size
        slots = None if layer_cache is None else layer_cache.probe(keys)
        hit = np.empty(0, np.int64) if slots is None else np.flatnonzero(slots >= 0)
        if hit.size == 0 and inverse is None:     # nothing cached for this batch: read straight into out
            self._count(n, n, 0, self.tier.gather(layer_id, rows, out))
            return
        staged = self._staging(u, out)                                    # [u, D]: hits, then misses
        if hit.size == 0:
            read = self.tier.gather(layer_id, keys, staged, sorted_unique=True)
            assert inverse is not None, "a batch without cache hits reaches here only with dedup"
            index = inverse
        else:
            assert slots is not None and layer_cache is not None, "hits come from a layer cache"
            miss = np.flatnonzero(slots < 0)
            if self._disk and self.dedup and miss.size:
                hit, miss = self._read_through(layer_id, keys, slots >= 0)
            torch.index_select(layer_cache.data, 0, torch.from_numpy(slots[hit]), out=staged[: hit.size])
            read = None
            if miss.size:
                read = self.tier.gather(layer_id, keys[miss], staged[hit.size:], sorted_unique=self.dedup)
            place = np.empty(u, np.int64)                                 # staged position of each key
            place[hit] = np.arange(hit.size)
            place[miss] = np.arange(hit.size, u)
            index = torch.from_numpy(place)
            if inverse is not None:
                index = index[inverse]
        torch.index_select(staged, 0, index, out=out)
        self._count(n, u, int(hit.size), read)

    def _read_through(self, layer_id: int, keys: np.ndarray, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit, miss) positions in the sorted distinct `keys` once cached rows that lie between two
        misses of one read extent are read with them (they cost no extra read; leaving them out
        could split that read in two). The cache then never makes a gather issue more reads."""
        assert isinstance(self.tier, DirectTier), "reads through cached rows only on the direct tier"
        ext = self.tier.extent_ids(layer_id, keys)                            # [u] non-decreasing
        pos = np.arange(keys.size)
        before = np.maximum.accumulate(np.where(cached, -1, pos))            # last miss at or before i
        after = np.minimum.accumulate(np.where(cached, keys.size, pos)[::-1])[::-1]   # first miss at or after
        inside = (before >= 0) & (after < keys.size)
        inside[inside] &= (ext[before[inside]] == ext[pos[inside]]) & (ext[after[inside]] == ext[pos[inside]])
        read = ~cached | inside
        return np.flatnonzero(~read), np.flatnonzero(read)

    def _count(self, requested: int, unique: int, cached: int, read: tuple[int, int] | None) -> None:
        tier_rows = unique - cached
        if self._disk:
            nbytes, reads = read if read is not None else (0, 0)
            self.stats.add(lookups=1, rows_requested=requested, rows_unique=unique, rows_from_cache=cached,
                           rows_from_disk=tier_rows, bytes_from_disk=nbytes, disk_reads=reads)
        else:
            self.stats.add(lookups=1, rows_requested=requested, rows_unique=unique, rows_from_cache=cached,
                           rows_from_memory=tier_rows)

    def _staging(self, u: int, like: torch.Tensor) -> torch.Tensor:
        """A per-thread [u, D] buffer of `like`'s dtype, reused across gathers (never handed out)."""
        nbytes = u * like.shape[1] * like.element_size()
        return _reused(self._local, "buf", nbytes)[:nbytes].view(like.dtype).view(u, like.shape[1])

    def clear(self) -> None:
        """Drop every thread's staging buffer (the next gather makes a new one)."""
        self._local = threading.local()


class DecodingGatherer:
    """Gathers quantized rows and decodes them: out[i] = decoded row rows[i] of the layer.

    Args:
        engine: the RowGatherer of the table's stored values (dedup, cache, tier, counters).
        spec: the table's spec (a quantized dtype, scale_block).
    """

    def __init__(self, engine: RowGatherer, spec: TableSpec) -> None:
        self.engine = engine
        self.dtype, self.block, self.width = spec.dtype, spec.scale_block, spec.value_width
        self.value_dtype = storage_torch_dtype(spec.dtype)
        self._local = threading.local()

    def gather_stored(self, layer_id: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, W], scales [n, S]) of rows `rows`, in per-thread buffers reused by the next call
        (W = D, or D * bits / 8 packed bytes for "int4" / "int2")."""
        n = rows.size
        table = self.engine.tier.scales[layer_id]                          # [rows, S], resident
        W = self.width
        values = self._buffer("values", n * W * self.value_dtype.itemsize).view(self.value_dtype).view(n, W)
        self.engine.gather(layer_id, rows, values)
        checks = getattr(self.engine.tier, "scale_checks", {}).get(layer_id)   # "mmap": first-serve checks
        if checks is not None:
            checks.check(rows)
        S = table.shape[1]
        scales = self._buffer("scales", n * S * table.element_size()).view(table.dtype).view(n, S)
        torch.index_select(table, 0, torch.from_numpy(rows), out=scales)
        return values, scales

    def gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor) -> None:
        """out[i] = row rows[i] decoded (`out` [n, D] contiguous float32 or bfloat16)."""
        values, scales = self.gather_stored(layer_id, rows)
        if rows.size:
            decode_into(values, scales, self.dtype, self.block, out)     # checked once, at the table's boundary

    def _buffer(self, name: str, nbytes: int) -> torch.Tensor:
        return _reused(self._local, name, nbytes)[:nbytes]

    def clear(self) -> None:
        """Drop every thread's buffers."""
        self._local = threading.local()
