"""Table: an open, read-only engram table and its lookups.

    table = engram.open(path, tier="mmap")
    e = table.lookup(token_ids, layer_id)     # [B, T] ids -> torch [B, T, E], heads concatenated

A lookup validates and compresses the ids, hashes them (NgramHasher), adds each head's row
offset while transposing the hasher's head-major [H, B, T] rows to [B, T, H], and gathers those
rows in one call (`Table._gather`, the single place every row read goes through: batch dedup,
the hot-row cache, then the tier; see `engram.serving.gather`). Small lookups (decode steps) do
all of it in one compiled call where numba is installed (`engram.serving.decode_step`).

Quantized tables ("int8", "float8_e4m3") dequantize on every read: lookups return float32 by
default (`Table.dtype`), or bfloat16 with `dtype=torch.bfloat16` (decoded straight into it, one
rounding); other float dtypes are converted from float32. `Table.stored_rows` returns the stored
values and scales unchanged.

    handle = table.prefetch(token_ids)        # the same lookup on the table's prefetch thread
    table.load_hot_rows("hot.npz", fraction=0.1)   # most-used rows kept in RAM, probed first
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from engram.addressing.hashing import NgramHasher
from engram.addressing.history import NgramHistory, prefetch_context
from engram.dtypes import storage_torch_dtype, torch_dtype
from engram.errors import InputError
from engram.serving.buffers import OutputPool, Scratch
from engram.serving.cache import HotRowCache, select_hot_rows
from engram.serving.decode_step import DecodeStep
from engram.serving.gather import DEDUP_TIERS, DecodingGatherer, RowGatherer
from engram.serving.hotrows import HotRowPlan
from engram.serving.lookup_args import check_dtype, check_out, check_row_indices, check_whole
from engram.serving.prefetch import CudaTransfer, Prefetch, Prefetcher
from engram.serving.stats import LookupStats, StatsCounter
from engram.serving.table_info import TableInfo
from engram.serving.tiers import Tier, open_tier
from engram.serving.usage import Usage
from engram.storage.chunks import verify_chunks
from engram.storage.format import TableMeta
from engram.storage.metadata import open_published
from engram.storage.quant import QuantizedRows
from engram.storage.tabledir import TableDir
from engram.tensors import check_ids_2d, is_torch, to_numpy_ids

__all__ = ["Table"]

class Table(TableInfo):
    """An open engram table: one row table per layer, read-only. Make one with `engram.open`.

    A Table is a context manager; it can be used from several threads at once, and it pickles
    by path and tier (the receiving process opens the table itself, nothing is copied).
    """

    def __init__(self, tdir: TableDir, meta: TableMeta, tier: str, prefault: bool, io_threads: int,
                 dedup: bool | None = None, rows: Tier | None = None, verify_reads: bool = True) -> None:
        # rows: an open tier serving the rows (default: open `tier` over the table's chunk files)
        self._tdir, self._path, self._meta, self._tier_name = tdir, tdir.path, meta, tier
        self._open_args = (prefault, io_threads, dedup, verify_reads)      # what a pickle reopens it with
        self._hasher = NgramHasher(meta.spec, meta.compression)
        self._offsets = {lid: np.asarray(meta.spec.head_offsets(lid), np.int64) for lid in meta.spec.layer_ids}
        self._dtype = torch_dtype(meta.spec.dtype)                  # what lookups return by default
        self._stored_dtype = storage_torch_dtype(meta.spec.dtype)    # what the tier gathers
        self._outputs = OutputPool()
        self._scratch = Scratch()
        where = os.fspath(tdir.path)
        self._usage = Usage(functools.partial(   # calls in flight
            InputError, f"table at {where!r} is closed: open it again with engram.open({where!r})"))
        self._tier = open_tier(tier, tdir, meta, prefault, io_threads, verify_reads) if rows is None else rows
        self._finalizer = weakref.finalize(self, _release, self._tier, tdir)
        self._stats = StatsCounter()
        self._engine = RowGatherer(self._tier, tier in DEDUP_TIERS if dedup is None else dedup, self._stats)
        self._decoder = DecodingGatherer(self._engine, meta.spec) if meta.spec.quantized else None
        self._prefetcher = Prefetcher()
        self._fast = DecodeStep.create(meta, self._tier, self._engine, self._decoder, self._stats, self._outputs,
                                       self._scratch, self._usage, self._dtype)      # small lookups, compiled

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"tier={self._tier_name!r}"
        part = "" if self.shard is None else f", shard={str(self.shard)!r}"
        return (f"Table(path={os.fspath(self._path)!r}, {state}, layer_ids={self.spec.layer_ids}, "
                f"dtype={self.spec.dtype!r}, rows={self.spec.total_rows}x{self.spec.head_dim}{part})")

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the rows (mapping, memory, files); waits for lookups in flight. Idempotent.

        Prefetches not started yet are cancelled (their `result()` raises
        concurrent.futures.CancelledError); a running one finishes first and keeps its rows.
        """
        self._usage.refuse()
        self._prefetcher.shutdown()
        self._usage.wait_idle()
        self._fast = None
        self._finalizer()
        self._outputs.clear()
        self._engine.cache = None
        self._engine.clear()
        if self._decoder is not None:
            self._decoder.clear()

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # By path and tier, never by content: the receiving process opens the table itself.
        return reopen_table, (os.path.abspath(self._path), self._tier_name, *self._open_args)

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, token_ids: Any, layer_id: int | None, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None, *, history: NgramHistory | None = None, mask: Any = None,
               doc_start: Any = None) -> torch.Tensor | dict[int, torch.Tensor]:
        """The rows that `token_ids` address in one layer, heads concatenated in hash order.

        Args:
            token_ids: raw token ids [B, T] (numpy or torch, any integer dtype and device).
            layer_id: one of `spec.layer_ids`, or None for every layer.
            out: optional contiguous CPU tensor [B, T, E] of the result dtype to write into.
            dtype: result dtype (default: `table.dtype`). Float tables convert their rows to it; quantized
                tables dequantize to it (as `engram.storage.quant.decode`: float8_e4m3 rows with one rounding to float32
                or bfloat16, int8 rows through their float32 product; other dtypes from the float32 rows).
            history, mask, doc_start: as for `NgramHasher.hash` (the ids continue an `NgramHistory`).

        Returns:
            A CPU tensor [B, T, E] (E = spec.embed_dim) whatever the ids' device, or
            {layer_id: tensor} for None. Without `out` the result is a tensor of its own: a later lookup
            recycles its memory only after every reference to it (views and autograd included) is gone.

        Example:
            >>> with engram.open("table.engram") as table:
            ...     e = table.lookup(np.array([[5, 17, 42]]), layer_id=1)   # [1, 3, E]
        """
        fast = self._fast                   # a decode step: one compiled call (engram.serving.decode_step)
        if fast is not None and mask is None and doc_start is None and out is None:
            rows = fast.lookup(token_ids, layer_id, dtype, history)
            if rows is not None:
                return rows
        with self._usage:
            x = self._ngrams(token_ids, history, mask, doc_start)        # N x [B, T] n-gram columns
            if layer_id is None:
                if out is not None:
                    raise InputError("out= needs one layer_id, got layer_id=None: pass a layer_id, "
                                     "or drop out= to get {layer_id: tensor}")
                return {lid: self._lookup_layer(x, lid, None, dtype) for lid in self.spec.layer_ids}
            return self._lookup_layer(x, self.spec.check_layer(layer_id), out, dtype)

    def _ngrams(self, token_ids: Any, history: NgramHistory | None, mask: Any, doc_start: Any) -> list[np.ndarray]:
        check_whole(self._path, self.shard)      # a part of a sharded table holds too few rows to look up
        torch_ids = is_torch(token_ids)
        if torch_ids:                       # the shape first: it names the problem before the dtype
            check_ids_2d(token_ids)
        ids = to_numpy_ids(token_ids)
        if not torch_ids:                   # a torch tensor's shape was checked above
            check_ids_2d(ids)
        self.compression.check_ids(ids)
        return self._hasher.context_grams(self.compression.lookup[ids], history, mask, doc_start)

    def _lookup_layer(self, x: list[np.ndarray] | dict[int, np.ndarray], layer_id: int, out: torch.Tensor | None,
                      dtype: torch.dtype | None) -> torch.Tensor:    # x: N x [B, T] grams, or rows [B, T, H] by layer
        B, T = x[layer_id].shape[:2] if isinstance(x, dict) else x[0].shape
        H, D = self.spec.heads_per_layer, self.spec.head_dim
        check_dtype(dtype)
        want = self._dtype if dtype is None else dtype
        if out is not None:
            check_out(out, (B, T, H * D), want)
        if isinstance(x, dict):
            rows = x[layer_id]
        else:
            heads_buf, rows = self._scratch.get(H, B, T)
            heads = self._hasher.hash_grams(x, layer_id, out=heads_buf)           # [B, T, H] view of [H, B, T]
            np.add(heads, self._offsets[layer_id], out=rows)                     # [B, T, H] global rows
        gathered = self.gathered_dtype(want)
        if out is not None and want == gathered:
            result = out
        else:
            result = self._outputs.take((B, T, H * D), gathered)
        self._gather(layer_id, rows.reshape(-1), result.view(B * T * H, D))      # [B*T*H, D]
        if want == gathered:
            return result
        return result.to(want) if out is None else out.copy_(result)

    def _gather(self, layer_id: int, rows: np.ndarray, out: torch.Tensor) -> None:
        """out[i] = row rows[i] of the layer's table (decoded, for quantized tables). Every row read
        of the table passes here, but the row copies of the compiled path of small lookups."""
        (self._engine if self._decoder is None else self._decoder).gather(layer_id, rows, out)

    def gather_local(self, layer_id: int, rows: np.ndarray, out: torch.Tensor) -> None:
        """Unchecked, for `engram.distributed`: out [n, D] (of `gathered_dtype`) = rows [n] of the
        layer's stored array (a part's rows by local index), through dedup, cache and counters."""
        with self._usage:
            self._gather(layer_id, rows, out)

    def rows(self, layer_id: int, row_indices: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows by global row index: [n] ints -> a new tensor [n, D].

        Args:
            layer_id: one of `spec.layer_ids`.
            row_indices: [n] global rows of the layer (0 <= row < spec.rows(layer_id); for a part
                of a sharded table, inside the part's range of the layer).
            dtype: result dtype (default: `table.dtype`); quantized tables dequantize to it, as in
                `lookup`. `stored_rows` gives the stored values and scales unchanged.

        Example:
            >>> table.rows(1, [0, table.spec.rows(1) - 1])     # first and last row of layer 1
        """
        with self._usage:
            layer_id, idx = self._row_indices(layer_id, row_indices)
            check_dtype(dtype)
            want = self._dtype if dtype is None else dtype
            gathered = self.gathered_dtype(want)
            out = torch.empty((idx.size, self.spec.head_dim), dtype=gathered)
            self._gather(layer_id, idx, out)
            return out if want == gathered else out.to(want)

    def stored_rows(self, layer_id: int, row_indices: Any) -> QuantizedRows:
        """The stored bytes of rows by global row index, undecoded: values and scales.

        Args:
            layer_id: one of `spec.layer_ids`.
            row_indices: [n] global rows of the layer.

        Returns:
            `engram.storage.quant.QuantizedRows` with numpy `values` [n, W] (`quant.STORAGE_DTYPES[dtype]`;
            W = D, or D * bits / 8 packed int4 / int2 codes) and `scales` [n, S] (`quant.SCALE_DTYPES`;
            None for float tables), with
            `block=spec.scale_block`: `quant.decode(q.values, q.scales, q.dtype, block=q.block)`
            equals `table.rows(layer_id, row_indices, dtype=torch.float32)`.

        Example:
            >>> q = table.stored_rows(1, [0, 1, 2])             # a float8_e4m3 table: uint8 [3, 256], [3, 8]
        """
        with self._usage:
            layer_id, idx = self._row_indices(layer_id, row_indices)
            spec = self.spec
            if self._decoder is not None:
                values, scales = self._decoder.gather_stored(layer_id, idx)
                return QuantizedRows(values.numpy().copy(), scales.numpy().copy(), spec.dtype, spec.scale_block)
            out = torch.empty((idx.size, spec.head_dim), dtype=self._stored_dtype)
            self._gather(layer_id, idx, out)
            if out.dtype == torch.bfloat16:
                out = out.view(torch.uint16)
            return QuantizedRows(out.numpy(), None, spec.dtype, spec.scale_block)

    def _row_indices(self, layer_id: int, row_indices: Any) -> tuple[int, np.ndarray]:
        """The checked layer and row indices of this table's arrays (contiguous int64 [n])."""
        return check_row_indices(self.spec, self.shard, layer_id, row_indices)

    # -- prefetch ---------------------------------------------------------------------------
    def prefetch(self, token_ids: Any, layer_ids: int | Sequence[int] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 history: NgramHistory | None = None, mask: Any = None, doc_start: Any = None) -> Prefetch:
        """Start the lookup of `token_ids` in the background; collect it with `handle.result()`.

        The ids are checked and copied now (errors in them raise here); hashing and gathering run
        on the table's prefetch thread while the caller computes. Prefetches run one at a time,
        in the order they were started.

        Args:
            token_ids: raw token ids [B, T] (numpy or torch, any integer dtype and device).
            layer_ids: the layers to look up (default: every layer), one id or a sequence.
            device: where the rows should land (default: CPU). With a CUDA device they are
                gathered into pinned host buffers and copied on a side stream without blocking;
                `result()` makes the caller's current stream wait for the copy.
            dtype: result dtype, as for `lookup` (default: `table.dtype`; quantized tables dequantize to it).
            history, mask, doc_start: as for `lookup`; the history is read now (append to it after).

        Returns:
            A Prefetch handle: `result()` == `table.lookup(token_ids, None)` restricted to
            `layer_ids`; `result(layer_id)` one [B, T, E] tensor; also done(), cancel().

        Example:
            >>> handle = table.prefetch(token_ids)            # before layer 0
            >>> ...                                           # layers 0 and 1 compute meanwhile
            >>> e = handle.result(2)                          # [B, T, E] at the Engram layer
        """
        with self._usage:
            rows = None if self._fast is None else self._fast.rows(token_ids, layer_ids, history, mask, doc_start)
            x = self._ngrams(token_ids, history, mask, doc_start) if rows is None else rows   # or N x [B, T] grams
            if layer_ids is None:
                layers = self.spec.layer_ids
            else:
                single = isinstance(layer_ids, (int, np.integer)) and not isinstance(layer_ids, bool)
                requested: Any = (layer_ids,) if single else layer_ids
                layers = tuple(self.spec.check_layer(i) for i in requested)
            check_dtype(dtype)
            target = self._prefetcher.target(device)
            work = functools.partial(self._prefetch_work, x, layers, dtype, target)
            now = rows is not None and target is None and self._fast.runs_now(rows)   # type: ignore[union-attr]
            with self._usage.lock:     # close() either sees this prefetch pending or refuses it here
                if self._usage.closed:
                    raise InputError(f"table at {os.fspath(self._path)!r} is closed: open it again")
                future = None if now else self._prefetcher.submit(work)
            future = future or Prefetcher.finished(work)    # a few rows from memory: less than a hand-off
            self._stats.add(prefetches=1)
            return Prefetch(future, layers, self._stats, self._path, prefetch_context(token_ids, history, mask))

    def _prefetch_work(self, x: list[np.ndarray] | dict[int, np.ndarray], layers: tuple[int, ...],
                       dtype: torch.dtype | None, target: torch.device | CudaTransfer | None) -> dict[int, Any]:
        """Runs on the prefetch thread: every layer's rows, on the device asked for."""
        if not self._usage.enter():
            raise concurrent.futures.CancelledError(f"table at {os.fspath(self._path)!r} was closed")
        try:
            out: dict[int, Any] = {}
            for layer_id in layers:
                if isinstance(target, CudaTransfer):                     # (device tensor, copy event)
                    fill = functools.partial(self._lookup_layer, x, layer_id, dtype=dtype)     # fill(host rows)
                    B, T = x[layer_id].shape[:2] if isinstance(x, dict) else x[0].shape
                    out[layer_id] = target.fill_and_copy((B, T, self.spec.embed_dim), dtype or self._dtype, fill)
                else:
                    rows = self._lookup_layer(x, layer_id, None, dtype)
                    out[layer_id] = rows if target is None else rows.to(target)
            return out
        finally:
            self._usage.exit()

    # -- hot-row cache and counters ---------------------------------------------------------
    def load_hot_rows(self, plan: HotRowPlan | str | os.PathLike[str], *, fraction: float | None = None,
                      rows: int | None = None, max_bytes: int | None = None) -> dict[int, int]:
        """Keep a hot-row plan's most-used rows in RAM; every later read probes them first.

        Pass exactly one of: `fraction` (of each layer's rows the plan's corpus touched, most
        used first), `rows` (per layer) or `max_bytes` (of row data over all layers, the rows
        with the most lookups first). Replaces any cache loaded before.

        Args:
            plan: a HotRowPlan or the path of one (`engram stats --hot-rows`,
                `engram.corpus_stats(...).hot_row_plan()`).

        Returns:
            {layer_id: rows cached}.

        Raises:
            SpecMismatchError: the plan was counted for another spec or compression.

        Example:
            >>> table.load_hot_rows("hot.npz", fraction=0.1)
            {1: 184345, 15: 184572}
        """
        with self._usage:
            chosen = select_hot_rows(plan, self.spec, self.compression, fraction, rows, max_bytes)
            if self.shard is not None:     # the hottest rows of the whole table that this part holds
                spans = self.shard.ranges
                chosen = {i: r[(r >= spans[i][0]) & (r < spans[i][1])] - spans[i][0] for i, r in chosen.items()}
            cache = HotRowCache.load(chosen, self.spec, self._stored_dtype, self._read_sorted)
            self._engine.cache = cache          # lookups in flight finish with the cache they began with
            return {layer_id: int(r.size) for layer_id, r in chosen.items()}

    def _read_sorted(self, layer_id: int, rows: np.ndarray, out: torch.Tensor) -> None:
        self._tier.gather(layer_id, rows, out, sorted_unique=True)       # not counted in stats()

    def clear_hot_rows(self) -> None:
        """Drop the hot-row cache (reads go to the tier again)."""
        self._engine.cache = None

    def stats(self) -> LookupStats:
        """A snapshot of the lookup counters since open or `reset_stats()` (see LookupStats)."""
        cache = self._engine.cache
        return self._stats.snapshot(cached_rows=0 if cache is None else cache.n_rows)

    def reset_stats(self) -> None:
        """Zero the lookup counters."""
        self._stats.reset()

    # -- integrity --------------------------------------------------------------------------
    def verify(self, progress: bool | None = None) -> None:
        """Check every chunk file on disk (scale arrays' too) against its recorded xxh3-64 checksum.

        Args:
            progress: show a progress bar (None: only on a terminal, after a second).

        Raises:
            CorruptTableError: naming the first bad chunk (layer, array for scales, chunk, file)
                and how many chunks are bad in all.
        """
        with self._usage:
            verify_chunks(self._tdir, self._meta, progress)


def _release(tier: Any, tdir: TableDir) -> None:
    tier.close()
    tdir.close()


def reopen_table(path: str, tier: str, prefault: bool, io_threads: int, dedup: bool | None = None,
                 verify_reads: bool = True) -> Table:
    """Open the table at `path` again: how a pickled Table is rebuilt in the receiving process."""
    return open_published(path, lambda tdir, meta: Table(tdir, meta, tier, prefault, io_threads, dedup,
                                                         verify_reads=verify_reads))
