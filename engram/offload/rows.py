"""OffloadedRows: a table's rows trained with Adam while they and their moments live on disk.

    rows = engram.OffloadedRows.create("table.engram", "work/", cache_bytes=4 << 30, lr=5 * lr)
    mem = engram.EngramMemory(rows.spec, rows.compression, layer_id=1, hidden_size=C, table=rows)
    rows.prefetch(next_ids)                 # the next batch's rows and moments, read in the background
    loss = model(...); loss.backward()      # row gradients are kept by the rows, summed per row
    rows.step(); rows.zero_grad()           # lazy SparseAdam on the rows touched
    rows.flush()                            # durable: a crash from here on reopens to this state
    rows.snapshot("trained.engram")         # an ordinary table, for engram.open on any tier

The rows and both Adam moments of every row are in a working copy on disk (`engram.offload.workdir`:
12 bytes per value with float32 rows, 10 with bfloat16); a cache of `cache_bytes` holds the rows in
use in float32 (`engram.offload.store`). A lookup reads what the cache lacks; `prefetch` reads
the next batch's rows on a background thread while the current step computes (a row's address
depends only on the token ids, so it is known a step ahead); evicted rows that changed are
written back by another thread. The arithmetic is `torch.optim.SparseAdam`'s, as
`engram.distributed.ShardedRows` applies it (`engram.offload.adam`): per step, each distinct row's
gradient summed over the step's lookups, moments of untouched rows left alone, a step count per
layer advanced once per step with a backward, no weight decay. bfloat16 rows are rounded to
nearest-even after every update, so the cache always holds what the file will.

The rows are neither parameters nor buffers of any module: the model's optimizer must not see
them, and `EngramMemory(..., table=rows)` holds no `rows` parameter.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher
from engram.addressing.history import NgramHistory
from engram.addressing.spec import TableSpec
from engram.errors import InputError
from engram.offload.adam import AdamSettings, sum_by_row
from engram.offload.create import check_workdir_path, make_working_copy
from engram.offload.opened import OpenedCopy, check_cache_args
from engram.offload.snapshot import check_snapshot, write_snapshot
from engram.offload.stats import OffloadStats
from engram.serving.gather import unique_inverse
from engram.serving.lookup_args import check_dtype
from engram.serving.prefetch import Prefetcher
from engram.tensors import check_ids_2d, is_torch, to_numpy_ids

__all__ = ["OffloadedRows", "RowsPrefetch"]


class RowsPrefetch:
    """A prefetch in progress (`OffloadedRows.prefetch`): `result()` waits until its rows are in the cache."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> int:
        """Wait for the rows; returns how many distinct rows the batch has. Raises what the prefetch raised."""
        rows: int = self._future.result(timeout)
        return rows

    def __repr__(self) -> str:
        return f"RowsPrefetch({'done' if self._future.done() else 'pending'})"


class OffloadedRows:
    """A working copy of a table's rows, trainable, behind a bounded cache (see the module doc).

    Open an existing working copy with the constructor (it resumes rows, moments, step counts and
    Adam settings from its last flush); make one with `OffloadedRows.create`.

    Args:
        workdir: the working copy's directory.
        cache_bytes: memory for the cache: row slots (12 * D bytes of rows and moments plus about 100
            bytes of state each) and, a quarter of it, rows on their way to disk. It must hold the distinct
            rows of a step's lookups and of the prefetch for the next step.
        io_threads: threads reading a call's missing rows (reads from disk wait in parallel).
        spec, compression: if given, what the working copy must hold rows of (else SpecMismatchError).

    Raises:
        MissingFileError: no working copy at `workdir`.
        CorruptTableError: a file of the working copy is missing or damaged.
        SpecMismatchError: it holds another table's rows than `spec` / `compression`.
        InputError: bad arguments; the working copy is open elsewhere; it is a part of a sharded table.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, cache_bytes: int, io_threads: int = 4,
                 spec: TableSpec | None = None, compression: Compression | None = None) -> None:
        path = check_workdir_path(workdir)
        check_cache_args(cache_bytes, io_threads)
        self._copy = OpenedCopy(path, cache_bytes, io_threads, spec, compression)
        self._store = self._copy.store
        ident = self._copy.ident
        self._spec, self._comp = ident.spec, self._copy.compression
        self._steps = dict(self._copy.state.steps)
        self._settings = self._copy.state.settings
        self._hasher = NgramHasher(self._spec, self._comp)
        self._offsets = {lid: np.asarray(self._spec.head_offsets(lid), np.int64) + ident.bases[lid]
                         for lid in self._spec.layer_ids}     # head row -> record key
        self._grads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {lid: [] for lid in self._spec.layer_ids}
        self._touched: set[int] = set()
        self._lead = torch.zeros(0, requires_grad=True)       # makes lookups differentiable (gets no gradient)
        self._prefetcher = Prefetcher()
        self._prefetches: list[concurrent.futures.Future] = []

    @classmethod
    def create(cls, source: Any, workdir: str | os.PathLike[str], *, cache_bytes: int, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, dtype: str | None = None,
               overwrite: bool = False, io_threads: int = 4, progress: bool | None = None) -> OffloadedRows:
        """Make a working copy of `source`'s rows with zero Adam moments at `workdir`, and open it.

        Args:
            source: the table whose rows training starts from (a path or an open engram.Table; any row
                dtype: quantized rows are decoded to float32), or a DeepSeek-V4.1 release folder.
                Never written. One part of a sharded table is refused (see
                `engram.distributed.ShardedRows(..., offload=)`).
            workdir: a new or empty directory (made atomically: a killed create leaves nothing there).
            cache_bytes, io_threads: as for the constructor.
            lr, betas, eps: Adam's (the paper: 5x the model's base learning rate; `set_optimizer` changes them).
            dtype: the stored rows, "float32" or "bfloat16" (None: bfloat16 for a bfloat16 table, else
                float32). Moments are float32 either way.
            overwrite: replace a working copy already at `workdir`.
            progress: show a progress bar (None: only on a terminal, after a second).

        Raises:
            TableExistsError: something is at `workdir` (a working copy: reopen it, or pass overwrite=True).
            InputError: bad arguments, or a part of a sharded table.
            TableNotFoundError, CorruptTableError: no table at `source`, or a damaged one.

        Example:
            >>> rows = engram.OffloadedRows.create("table.engram", "work", cache_bytes=1 << 30, lr=5e-3)
        """
        path = check_workdir_path(workdir)
        settings = AdamSettings.checked(lr, betas, eps)
        check_cache_args(cache_bytes, io_threads)
        if not isinstance(overwrite, bool):
            raise InputError(f"overwrite={overwrite!r} is invalid: expected True or False")
        make_working_copy(source, path, dtype=dtype, settings=settings, overwrite=overwrite, progress=progress)
        return cls(path, cache_bytes=cache_bytes, io_threads=io_threads)

    # -- what it holds ----------------------------------------------------------------------
    @property
    def spec(self) -> TableSpec:
        """The spec of the table the rows came from."""
        return self._spec

    @property
    def compression(self) -> Compression:
        return self._comp

    @property
    def path(self) -> Path:
        """The working copy's directory."""
        return self._copy.workdir

    @property
    def dtype(self) -> torch.dtype:
        """What lookups return by default: float32."""
        return torch.float32

    @property
    def rows_dtype(self) -> str:
        """How the working copy stores rows: "float32" or "bfloat16"."""
        return self._copy.ident.dtype

    @property
    def steps(self) -> dict[int, int]:
        """Adam's step count of each layer."""
        return dict(self._steps)

    @property
    def settings(self) -> AdamSettings:
        """Adam's lr, betas and eps."""
        return self._settings

    @property
    def closed(self) -> bool:
        return self._copy.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"cache_rows={self._store.cache.slots}"
        return (f"OffloadedRows(path={os.fspath(self.path)!r}, rows={self._spec.total_rows}x{self._spec.head_dim}, "
                f"rows_dtype={self.rows_dtype!r}, {state})")

    def _usable(self) -> None:
        if self.closed:
            raise InputError(f"the working copy at {os.fspath(self.path)!r} is closed: open it again with "
                             f"engram.OffloadedRows({os.fspath(self.path)!r}, cache_bytes=...)")
        for future in [f for f in self._prefetches if f.done()]:
            self._prefetches.remove(future)
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()   # type: ignore[misc]

    # -- lookups -----------------------------------------------------------------------------
    def _grams(self, token_ids: Any, history: NgramHistory | None, mask: Any, doc_start: Any) -> list[np.ndarray]:
        """The n-gram columns of validated ids (as Table.lookup checks them)."""
        if is_torch(token_ids):
            check_ids_2d(token_ids)
        ids = to_numpy_ids(token_ids)
        check_ids_2d(ids)
        self._comp.check_ids(ids)
        return self._hasher.context_grams(self._comp.lookup[ids], history, mask, doc_start)

    def _keys(self, grams: list[np.ndarray], layer_id: int) -> np.ndarray:
        """Record keys [B, T, H] of a layer's rows for the n-grams `grams`."""
        return self._hasher.hash_grams(grams, layer_id) + self._offsets[layer_id]

    def lookup(self, token_ids: Any, layer_id: int, dtype: torch.dtype | None = None, *,
               history: NgramHistory | None = None, mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The rows `token_ids` [B, T] address in one layer, [B, T, E], differentiable (as Table.lookup otherwise).

        With gradients enabled, the rows stay in the cache until `step()` or `zero_grad()`, and their
        gradient is kept by this object when backward runs. `history`, `mask`, `doc_start` as for Table.lookup.

        Raises:
            InputError: bad ids or layer; the cache cannot hold the rows (it names the cache_bytes needed).
        """
        self._usable()
        layer_id = self._spec.check_layer(layer_id)
        check_dtype(dtype)
        grams = self._grams(token_ids, history, mask, doc_start)
        B, T = grams[0].shape
        keys = self._keys(grams, layer_id).reshape(-1)                                  # [B*T*H]
        out = _Lookup.apply(self._lead, self, layer_id, keys, torch.is_grad_enabled())  # [B*T*H, D]
        out = out.view(B, T, self._spec.embed_dim)                                      # [B, T, E]
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def _forward(self, keys: np.ndarray, track: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        uniq, inverse = unique_inverse(keys)                                            # [u], [n]
        store = self._store
        slots = store.fetch(uniq, "lookup", step_pin=store.tick if track else 0)
        try:
            rows = store.rows(slots)                                                    # [u, D]
        finally:
            store.release(slots)
        store.count(lookups=1, rows_requested=keys.size)
        return rows.index_select(0, inverse), uniq, inverse                             # [n, D]

    def _backward(self, layer_id: int, uniq: np.ndarray, inverse: torch.Tensor, grad: torch.Tensor) -> None:
        summed = torch.zeros((uniq.size, grad.shape[1]), dtype=torch.float32)
        summed.index_add_(0, inverse, grad.to(torch.float32))                          # [u, D] per distinct row
        self._grads[layer_id].append((torch.from_numpy(uniq), summed))
        self._touched.add(layer_id)

    def prefetch(self, token_ids: Any, *, mask: Any = None, doc_start: Any = None) -> RowsPrefetch:
        """Start reading the rows (of every layer) and moments that `token_ids` [B, T] address into the cache.

        Call it with the next step's ids while the current step computes; the rows stay in the cache
        through the next two prefetches. A lookup whose rows are still being read waits for them; one
        whose rows were not prefetched reads them itself. An error of the prefetch (e.g. a cache too
        small for two steps' rows) is raised by `result()` and by the next call of this object.
        """
        self._usable()
        grams = self._grams(token_ids, None, mask, doc_start)                           # checked now
        seq = self._store.next_prefetch()

        def work() -> int:
            keys = np.unique(np.concatenate([self._keys(grams, lid).reshape(-1) for lid in self._spec.layer_ids]))
            self._store.release(self._store.fetch(keys, "prefetch", prefetch_pin=seq))
            return int(keys.size)

        future = self._prefetcher.submit(work)
        self._prefetches.append(future)
        self._store.count(prefetches=1)
        return RowsPrefetch(future)

    # -- optimizer ---------------------------------------------------------------------------
    def set_optimizer(self, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Change Adam's settings (e.g. a learning-rate schedule, between steps); saved at the next flush."""
        self._settings = AdamSettings.checked(lr, betas, eps)

    def zero_grad(self) -> None:
        """Drop the gradients gathered since the last step (their rows may leave the cache again)."""
        for pending in self._grads.values():
            pending.clear()
        self._touched.clear()
        if not self.closed:
            self._store.advance()

    @torch.no_grad()
    def step(self) -> None:
        """Adam on the rows touched since the last step (see the module doc), then `zero_grad()`."""
        self._usable()
        with self._store.stepping():
            for layer_id in sorted(self._touched):
                self._steps[layer_id] += 1
                pending = self._grads[layer_id]
                rows, grad = sum_by_row(torch.cat([i for i, _ in pending]), torch.cat([g for _, g in pending]))
                self._store.adam(rows.numpy(), grad, self._steps[layer_id], self._settings)
        self.zero_grad()

    # -- durability --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every changed row and moment to disk and commit them with the step counts and settings.

        From its return until the next flush, a crash (kill -9, power loss) reopens to exactly this state.
        """
        self._usable()
        self._store.flush(self._steps, self._settings)

    def snapshot(self, path: str | os.PathLike[str], *, dtype: str | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> str:
        """Flush, then publish the rows as an ordinary table at `path` (atomically), for engram.open on any tier.

        Args:
            path: the new table's directory.
            dtype: its row dtype (any of engram's; None: the working copy's).
            overwrite: replace a table at `path`.
            progress: show a progress bar (None: only on a terminal, after a second).

        Returns:
            The path of the table.

        Raises:
            TableExistsError: something is at `path` and overwrite is False (or it is not a table).
        """
        self._usable()
        target, dtype = check_snapshot(path, dtype, overwrite, self._copy.ident)
        self.flush()
        write_snapshot(self._store.data, self._copy.ident, self._comp, target, dtype, overwrite, progress)
        return os.fspath(target)

    def stats(self) -> OffloadStats:
        """The cache's counters since open (or `reset_stats()`)."""
        return self._store.stats()

    def reset_stats(self) -> None:
        self._store.reset_stats()

    def close(self, flush: bool = True) -> None:
        """Flush (unless `flush=False`: changes since the last flush are then dropped), stop the threads,
        release the files. Idempotent."""
        if self.closed:
            return
        self._prefetcher.shutdown()
        try:
            if flush:
                self._store.flush(self._steps, self._settings)
        finally:
            self._copy.close()

    def __enter__(self) -> OffloadedRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lookup(torch.autograd.Function):
    """Rows [n, D] from the cache; their gradient goes to the OffloadedRows (none to `lead`)."""

    @staticmethod
    def forward(ctx: Any, lead: torch.Tensor, owner: OffloadedRows, layer_id: int, keys: np.ndarray,
                track: bool) -> torch.Tensor:
        out, uniq, inverse = owner._forward(keys, track)
        ctx.owner, ctx.layer_id, ctx.uniq, ctx.inverse = owner, layer_id, uniq, inverse
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None, None]:
        ctx.owner._backward(ctx.layer_id, ctx.uniq, ctx.inverse, grad.contiguous())
        return None, None, None, None, None
