"""RowStore: a working copy's rows behind a bounded cache: fetch rows into slots, step them, flush.

Rows are named by key (their record in the rows file, `engram.offload.workdir.Identity.bases`).
`fetch` finds a batch's keys in the cache, takes slots for the others from the CLOCK hand
(handing evicted dirty rows to the write-back thread), then reads the missing records outside the
lock; a call that finds a row another call is still reading waits for it. Several threads fetch
at once: the caller's, a prefetch, the write-back thread's reads of old records.

Memory: `cache_bytes` covers the slots (float32 rows, both moments, per-slot state and the index;
12 * D + SLOT_OVERHEAD_BYTES bytes each) and, one part in WRITEBACK_SHARE, the records of evicted
rows on their way to disk (an eviction beyond that waits for the writes). Reads and writes go
through staging buffers of PIECE_BYTES per thread. Rows arriving from the file go through the
page cache, not this process's memory (engram.offload.datafile).

Durability: rows are written in place only after the records they replace are in the undo log
(engram.offload.undo); `flush` writes every dirty row that way, syncs the rows file, commits the
next generation (state.json) and empties the log. Opening replays what the log holds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.errors import InputError
from engram.offload.adam import AdamSettings, sparse_adam_
from engram.offload.cache import SLOT_OVERHEAD_BYTES, CacheFull, RowCache
from engram.offload.datafile import DataFile
from engram.offload.records import RecordLayout
from engram.offload.stats import OffloadStats
from engram.offload.undo import UndoLog
from engram.offload.workdir import ROWS, STATE, UNDO, Identity, State, write_json
from engram.offload.writeback import Batch, WriteBack

__all__ = ["RowStore", "cache_rows", "cache_bytes_for", "PIECE_BYTES", "WRITEBACK_SHARE"]

PIECE_BYTES = 1 << 20          # records read or written per piece (one staging buffer per thread)
WRITEBACK_SHARE = 4            # 1/4 of cache_bytes holds evicted records on their way to disk


def _slot_bytes(layout: RecordLayout) -> int:
    return 12 * layout.head_dim + SLOT_OVERHEAD_BYTES


def cache_rows(cache_bytes: int, layout: RecordLayout) -> int:
    """Rows a cache of `cache_bytes` holds."""
    return (cache_bytes - cache_bytes // WRITEBACK_SHARE) // _slot_bytes(layout)


def cache_bytes_for(rows: int, layout: RecordLayout) -> int:
    """The least cache_bytes that holds `rows` rows."""
    need = rows * _slot_bytes(layout)
    return -(-need * WRITEBACK_SHARE // (WRITEBACK_SHARE - 1)) + WRITEBACK_SHARE


class RowStore:
    """The rows of the working copy at `workdir` (identity `ident`, committed `generation`) behind a
    cache of `cache_bytes`; `io_threads` read misses in parallel. Replays the undo log first."""

    def __init__(self, workdir: Path, ident: Identity, generation: int, cache_bytes: int, io_threads: int) -> None:
        self.workdir, self.ident, self.layout = workdir, ident, ident.layout
        self.cache_bytes, self.generation = cache_bytes, generation
        rec = self.layout.record_bytes
        self.data = DataFile(workdir / ROWS, ident.total_rows, rec)
        try:
            self.undo = UndoLog(workdir / UNDO, rec)
            self._recover()
        except BaseException:
            self.data.close()
            raise
        self.cache = RowCache(cache_rows(cache_bytes, self.layout), self.layout.head_dim)
        self.cond = threading.Condition()
        self.writer = WriteBack(self.cond, self._write_batches)
        self.tick = 1                  # the step in progress (step pins); advanced when gradients are dropped
        self.prefetch_seq = 0          # the latest prefetch's number (prefetch pins)
        self._stepping = 0
        self._flushing = False
        self._closed = False
        self._counts: dict[str, float] = {}
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, "engram-offload-io") if io_threads > 1 else None
        self._piece = max(1, PIECE_BYTES // rec)

    # -- recovery -------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Undo every overwrite since the last flush (newest first), then empty the log."""
        batches = self.undo.intact(self.generation)
        for at, count in reversed(batches):
            keys, records = self.undo.read(at, count)
            self.data.write(keys, torch.from_numpy(records))
        if batches:
            self.data.sync()
            self.data.release()
        self.undo.reset()

    # -- counters -------------------------------------------------------------------------------
    def _count(self, **deltas: float) -> None:
        for name, value in deltas.items():
            self._counts[name] = self._counts.get(name, 0) + value

    def count(self, **deltas: float) -> None:
        """Add to the counters (see OffloadStats)."""
        with self.cond:
            self._count(**deltas)

    def stats(self) -> OffloadStats:
        with self.cond:
            counts: dict[str, Any] = {k: (v if k == "wait_seconds" else int(v)) for k, v in self._counts.items()}
            return OffloadStats(**counts, cache_rows=self.cache.slots)

    def reset_stats(self) -> None:
        with self.cond:
            self._counts.clear()

    # -- fetching -------------------------------------------------------------------------------
    def _usable(self) -> None:
        """Raise if closed or the write-back thread failed (called under the lock)."""
        if self._closed:
            raise InputError(f"the working copy at {str(self.workdir)!r} is closed: open it again with "
                             f"engram.OffloadedRows({str(self.workdir)!r}, cache_bytes=...)")
        if self.writer.error is not None:
            raise self.writer.error

    def fetch(self, keys: np.ndarray, kind: str, step_pin: int = 0,
              prefetch_pin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Slots holding rows `keys` [k] (distinct), each marked busy until `release`; kind: "lookup",
        "step" or "prefetch" (for the counters). Pins keep the rows for the step `step_pin`, or for a
        prefetch (its number, the last step it is for: `next_prefetch()`).

        Raises:
            InputError: the cache cannot hold the rows beside those held for the current and next step.
        """
        c = self.cache
        waited = 0.0
        with self.cond:
            self._usable()
            if self._flushing or self.writer.pending_bytes > self.cache_bytes // WRITEBACK_SHARE:
                start = time.perf_counter()
                self.cond.wait_for(lambda: self._closed or self.writer.error is not None or (
                    not self._flushing and self.writer.pending_bytes <= self.cache_bytes // WRITEBACK_SHARE))
                waited += time.perf_counter() - start
                self._usable()
            slots = c.index.find(keys)
            hit = slots >= 0
            held = slots[hit]
            c.busy[held] += 1
            try:
                new, read_keys, read_slots = self._admit(keys[~hit])
            except BaseException:
                c.busy[held] -= 1
                raise
            slots[~hit] = new
            c.busy[new] += 1
            c.ref[slots] = True
            if step_pin:
                c.step_pin[slots] = step_pin
            if prefetch_pin[0]:
                c.prefetch_pin[slots] = np.maximum(c.prefetch_pin[slots], prefetch_pin[0])
                c.prefetch_until[slots] = np.maximum(c.prefetch_until[slots], prefetch_pin[1])
            late = held[c.loading[held]]
        start = time.perf_counter()
        try:
            if read_keys.size:
                self._read(read_keys, read_slots)
        except BaseException:
            with self.cond:                         # the slots hold nothing: free them
                c.index.delete(read_keys)
                c.key[read_slots] = -1
                c.loading[read_slots] = False
                c.busy[slots] -= 1
                self.cond.notify_all()
            raise
        with self.cond:
            c.loading[read_slots] = False
            self.cond.notify_all()
            if late.size:
                self.cond.wait_for(lambda: not c.loading[late].any())
            waited += time.perf_counter() - start
            self._count(rows_read=read_keys.size, bytes_read=read_keys.size * self.layout.record_bytes)
            if kind == "prefetch":
                self._count(prefetched=read_keys.size)
            elif kind == "lookup":
                self._count(hits=held.size, misses=keys.size - held.size, late=late.size, wait_seconds=waited)
            else:
                self._count(wait_seconds=waited)
        return slots

    def release(self, slots: np.ndarray) -> None:
        """End a fetch's use of its slots."""
        with self.cond:
            self.cache.busy[slots] -= 1

    def _admit(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slots for keys [m] not in the cache (under the lock): (slots, keys to read, their slots).
        Rows in flight to disk are copied from their write-back batch here."""
        c, none = self.cache, np.zeros(0, np.int64)
        if not keys.size:
            return none, none, none
        try:
            slots = c.victims(keys.size, self.tick, self.prefetch_seq)
        except CacheFull as full:
            raise self._too_small(full) from None
        old = c.key[slots]
        if (old >= 0).any():
            c.index.delete(old[old >= 0])
            self._count(evictions=int(np.count_nonzero(old >= 0)))
        dirty = slots[c.dirty[slots]]
        if dirty.size:
            self._evict(dirty)
        c.key[slots] = keys
        c.index.insert(keys, slots)
        c.dirty[slots] = False
        c.loading[slots] = True
        from_disk = np.ones(keys.size, bool)
        for idx, batch, pos in self.writer.newest(keys):
            self.layout.unpack_into(batch.records.index_select(0, torch.from_numpy(pos)), c.rows, c.moments,
                                    torch.from_numpy(slots[idx]))
            from_disk[idx] = False
        c.loading[slots[~from_disk]] = False
        return slots, keys[from_disk], slots[from_disk]

    def _too_small(self, full: CacheFull) -> InputError:
        held = self.cache.slots - full.free
        need = cache_bytes_for(held + full.needed, self.layout)
        return InputError(
            f"cache_bytes={self.cache_bytes} holds {self.cache.slots} rows, but {full.needed} more are needed while "
            f"{held} are held (rows of the step in progress and of the last two prefetches): raise cache_bytes to "
            f"at least {need} ({need / 2**20:.1f} MiB), or use smaller batches")

    def _evict(self, slots: np.ndarray) -> None:
        """Hand the records of dirty `slots` to the write-back thread (under the lock)."""
        s = torch.from_numpy(slots)
        records = torch.empty((slots.size, self.layout.record_bytes), dtype=torch.uint8)
        self.layout.pack(self.cache.rows.index_select(0, s), self.cache.moments.index_select(0, s), records)
        self.writer.submit(self.cache.key[slots].copy(), records)

    def _staging(self, rows: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = torch.empty((self._piece, self.layout.record_bytes), dtype=torch.uint8)
        return buf[:rows]

    def _read(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Read the records of keys [k] (sorted) into `slots` (reserved, loading), piece by piece."""
        slots_t = torch.from_numpy(slots)

        def piece(a: int) -> None:
            b = min(a + self._piece, keys.size)
            buf = self.data.read(keys[a:b], self._staging(b - a))
            self.layout.unpack_into(buf, self.cache.rows, self.cache.moments, slots_t[a:b])

        starts = range(0, keys.size, self._piece)
        if self._pool is not None and len(starts) > 1:
            list(self._pool.map(piece, starts))
        else:
            for a in starts:
                piece(a)
        self.data.release()

    def rows(self, slots: np.ndarray) -> torch.Tensor:
        """The rows [k, D] float32 in `slots` (fetched, not yet released): a copy."""
        return self.cache.rows.index_select(0, torch.from_numpy(slots))

    # -- writing back -------------------------------------------------------------------------
    def _write_batches(self, batches: list[Batch]) -> None:
        """Write batches of records in place, in order, after logging the records they replace (one sync)."""
        written = rows = 0
        for batch in batches:
            for a in range(0, batch.keys.size, self._piece):
                b = min(a + self._piece, batch.keys.size)
                old = self.data.read(batch.keys[a:b], self._staging(b - a))
                written += self.undo.append(self.generation, batch.keys[a:b], old.numpy())
        self.undo.sync()
        for batch in batches:
            self.data.write(batch.keys, batch.records)
            written += batch.records.numel()
            rows += batch.keys.size
        self.data.release()
        self.count(rows_written=rows, bytes_written=written)

    # -- stepping and flushing ------------------------------------------------------------------
    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Keep flushes out while a step updates rows (a flush sees every layer before or after it)."""
        with self.cond:
            self._usable()
            self.cond.wait_for(lambda: not self._flushing)
            self._stepping += 1
        try:
            yield
        finally:
            with self.cond:
                self._stepping -= 1
                self.cond.notify_all()

    def adam(self, keys: np.ndarray, grad: torch.Tensor, step: int, settings: AdamSettings) -> None:
        """Adam on rows `keys` [u] (distinct) with their summed gradient [u, D] at `step` (inside `stepping`)."""
        slots = self.fetch(keys, "step", step_pin=self.tick)
        try:
            s = torch.from_numpy(slots)
            c = self.cache
            sparse_adam_(c.rows, c.exp_avg, c.exp_avg_sq, s, grad, step, settings)
            if self.layout.dtype != "float32":        # stored rounded: the cache holds what the file will
                c.rows.index_copy_(0, s, c.rows.index_select(0, s).to(self.layout.torch_dtype).to(torch.float32))
        finally:
            with self.cond:
                self.cache.dirty[slots] = True
                self.cache.busy[slots] -= 1

    def advance(self) -> None:
        """The step's gradients are gone: its rows may be evicted."""
        with self.cond:
            self.tick += 1

    def next_prefetch(self) -> tuple[int, int]:
        """The pin of a new prefetch: its number, and the last step it may be for (the next one). Its rows
        are held until that step is over or two later prefetches were made, whichever comes first."""
        with self.cond:
            self.prefetch_seq += 1
            return self.prefetch_seq, self.tick + 1

    def flush(self, steps: dict[int, int], settings: AdamSettings) -> None:
        """Every dirty row on disk, then commit generation + 1 with `steps` and `settings`."""
        c = self.cache
        with self.cond:
            self._usable()
            self._flushing = True
            try:
                self.cond.wait_for(lambda: self.writer.error is not None or (
                    not self._stepping and self.writer.idle() and not c.loading.any()))
                self._usable()
                dirty = np.flatnonzero(c.dirty)
                for a in range(0, dirty.size, self._piece):
                    part = dirty[a: a + self._piece]
                    s = torch.from_numpy(part)
                    records = torch.empty((part.size, self.layout.record_bytes), dtype=torch.uint8)
                    self.layout.pack(c.rows.index_select(0, s), c.moments.index_select(0, s), records)
                    self._write_batches([Batch(c.key[part], records)])
                c.dirty[dirty] = False
                self.data.sync()
                write_json(self.workdir / STATE, State(self.generation + 1, dict(steps), settings).to_dict())
                self.generation += 1
                self.undo.reset()
                self._count(flushes=1)
            finally:
                self._flushing = False
                self.cond.notify_all()

    def close(self) -> None:
        """Stop the threads and release the files (without flushing: the last flush is what stays)."""
        with self.cond:
            if self._closed:
                return
            self._closed = True
            self.cond.notify_all()
        self.writer.stop()
        if self._pool is not None:
            self._pool.shutdown()
        self.data.close()
        self.undo.close()
