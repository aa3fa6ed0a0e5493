"""ShardedRows: trainable table rows sharded over the ranks of a group, with their owners' Adam.

    rows = engram.distributed.ShardedRows(f"table-{rank}-of-{world}", lr=5 * lr)
    mem = engram.EngramMemory(rows.spec, rows.compression, layer_id=1, hidden_size=C, table=rows)
    loss = model(...); loss.backward()      # row gradients travel to the ranks that hold the rows
    rows.step(); rows.zero_grad()           # each owner updates the rows touched, and only those

Each rank keeps its part's rows in float32 memory with their Adam moments. A lookup is the
sharded lookup of `ShardedTable` (ids to owners, rows back, `engram.distributed.exchange`) and
is differentiable: backward sums each distinct row's gradient on the requesting rank, sends it to
the row's owner over the same routes, and the owner adds up what every rank sent. `step()`
then applies the paper's optimizer to the rows touched since the last step, lazily, exactly as
`torch.optim.SparseAdam` does (moments of untouched rows stay as they are; the step count, and
so the bias correction, advances once per step of each layer that had a backward), at the rows'
learning rate and without weight decay: the arithmetic of `engram.offload.adam`, which
`engram.OffloadedRows` shares.

With `offload=workdir`, the rank's rows and moments live on disk instead, in a working copy of its
part behind a cache of `cache_bytes` (`engram.offload.part`): made from the part on first use,
resumed from its last `flush()` afterwards. `flush()` and `snapshot(path)` then replace `save`.

The rows are neither parameters nor buffers of any module: DDP must not broadcast or average
them (each rank holds different rows), and the model's optimizer must not see them. A row's
gradient is summed over the ranks that used it (the gradient of the sum of the ranks' losses;
DDP averages dense gradients instead, a factor Adam ignores but for its eps). Save them
with `save` (every rank its part, atomically); `ShardedRows.load` reads a save made with any
number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher
from engram.addressing.history import NgramHistory
from engram.addressing.spec import TableSpec
from engram.distributed.agreement import agreed, describe_part
from engram.distributed.decode import context_grams
from engram.distributed.exchange import OP_GRAD, OP_LOOKUP, Routed, RowExchange
from engram.distributed.state import load_rows, save_rows
from engram.distributed.table import compressed_ids, new_group
from engram.errors import EngramError, InputError
from engram.offload.adam import AdamSettings, sparse_adam_, sum_by_row
from engram.offload.part import OffloadedPart
from engram.offload.stats import OffloadStats
from engram.opening import open as open_table
from engram.serving.lookup_args import check_dtype
from engram.storage.identity import new_table_id
from engram.storage.shards import ShardRange

__all__ = ["ShardedRows"]


class ShardedRows:
    """This rank's part of a table's rows, trainable; every rank looks up and steps together.

    Args:
        path: this rank's part of a table (`engram shard`, `engram build --shard`): its rows,
            read as float32, are the starting rows.
        group: the process group whose ranks hold the parts (None: every rank, over a new group).
        lr: the rows' learning rate (the paper: 5x the model's base rate, `engram.param_groups`).
        betas, eps: Adam's, as `torch.optim.SparseAdam`.
        wire_dedup, timeout: as `ShardedTable`'s (`wire_dedup`: each distinct row of a lookup,
            and its summed gradient, travels once).
        offload: a directory for this rank's working copy (one per rank), or None to hold the rows
            in memory. See the module doc; the step counts then resume from the working copy.
        cache_bytes, io_threads: with offload, the row cache (as for `engram.OffloadedRows`).

    Raises:
        ShardMismatchError: the parts opened on the ranks are not the parts of one table (on every rank).
    """

    table_id: str | None

    def __init__(self, path: str | os.PathLike[str], group: dist.ProcessGroup | None = None, *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, wire_dedup: bool = False,
                 timeout: datetime.timedelta | None = None, offload: str | os.PathLike[str] | None = None,
                 cache_bytes: int | None = None, io_threads: int = 4) -> None:
        self.set_optimizer(lr=lr, betas=betas, eps=eps)
        if offload is not None and cache_bytes is None:
            raise InputError(f"offload={os.fspath(offload)!r} needs cache_bytes= (bytes of the row cache, "
                             "e.g. 4 << 30)")
        group = new_group(group, timeout)
        opened: list[Any] = []

        def describe() -> dict[str, Any]:
            table = open_table(path)
            opened.append(table)
            return {**describe_part(table, path), "run_id": new_table_id()[:16]}

        try:
            parts, seen = agreed(group, describe)
            table = opened[0]
            part = parts[dist.get_rank(group)]
            if offload is None:
                rows = {lid: table.rows(lid, np.arange(*part.ranges[lid]), dtype=torch.float32) for lid in part.ranges}
                self._setup(group, parts, table.spec, table.compression, rows, wire_dedup)
        finally:
            for t in opened:
                t.close()
        if offload is not None:
            assert cache_bytes is not None
            store = OffloadedPart(path, offload, shard=part, spec=table.spec, compression=table.compression,
                                  cache_bytes=cache_bytes, io_threads=io_threads, settings=self._settings)
            self._setup(group, parts, table.spec, table.compression, {}, wire_dedup, store)
            self.steps = dict(store.steps)
        self.table_id, self.run_id = seen[0]["table_id"], seen[0]["run_id"]   # rank 0's: one per run, on every rank

    @classmethod
    def from_state(cls, group: dist.ProcessGroup, parts: list[ShardRange], spec: TableSpec, comp: Compression,
                   rows: dict[int, torch.Tensor], wire_dedup: bool = False) -> ShardedRows:
        """A ShardedRows of given rows (used by `load`); optimizer settings are set by the caller."""
        self = cls.__new__(cls)
        self._setup(group, parts, spec, comp, rows, wire_dedup)
        return self

    def _setup(self, group: dist.ProcessGroup, parts: list[ShardRange], spec: TableSpec, comp: Compression,
               rows: dict[int, torch.Tensor], wire_dedup: bool, store: OffloadedPart | None = None) -> None:
        self.group, self.parts, self.spec, self.compression = group, parts, spec, comp
        self.local = {lid: r.requires_grad_(True) for lid, r in rows.items()}   # {layer: float32 [n_local, D]}
        self.exp_avg = {lid: torch.zeros_like(r) for lid, r in rows.items()}
        self.exp_avg_sq = {lid: torch.zeros_like(r) for lid, r in rows.items()}
        self.steps = dict.fromkeys(spec.layer_ids, 0)
        self._offload = store                        # the rows on disk, or None (in `local`)
        self._lead = torch.zeros(0, requires_grad=True)   # makes offloaded lookups differentiable
        self._track = True                           # the lookup in progress keeps its rows for the step
        self._exchange = RowExchange(group, parts, wire_dedup)
        self._hasher = NgramHasher(spec, comp)
        self._offsets = {lid: np.asarray(spec.head_offsets(lid), np.int64) for lid in spec.layer_ids}
        self._grads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {lid: [] for lid in spec.layer_ids}
        self._touched: set[int] = set()
        self.table_id = None                 # the id of the table the rows came from (saved with them)
        self.run_id = ""                     # agreed by the ranks at open or load: names this run's saves
        self.saves = 0                       # saves made in this run (a save's id: "{run_id}-{saves}")

    def set_optimizer(self, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        """Set the rows' Adam settings (e.g. from a learning-rate schedule between steps)."""
        self._settings = AdamSettings.checked(lr, betas, eps)
        self.lr, self.betas, self.eps = self._settings.lr, self._settings.betas, self._settings.eps

    @property
    def shard(self) -> ShardRange:
        """The rows this rank holds."""
        return self.parts[self._exchange.rank]

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def wire_stats(self) -> dict[str, int]:
        """What this rank's exchanges moved (see `ShardedTable.wire_stats`)."""
        return self._exchange.counter.snapshot()

    def __repr__(self) -> str:
        return f"ShardedRows(rank={self._exchange.rank} of {self._exchange.world}, {self.shard})"

    # -- lookup and backward ----------------------------------------------------------------
    def lookup(self, token_ids: Any, layer_id: int, dtype: torch.dtype | None = None, *,
               history: NgramHistory | None = None, mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The rows `token_ids` [B, T] address in one layer, [B, T, E], differentiable; every rank
        calls together (its backward, too, runs on every rank together). `history`, `mask` and
        `doc_start` as for `ShardedTable.lookup` (each rank decodes its own sequences)."""
        problem: Exception | None = None
        try:
            x = compressed_ids(token_ids, self.compression)
            layer_id = self.spec.check_layer(layer_id)
            check_dtype(dtype)
            grams = context_grams(self._hasher, x, history, mask, doc_start)          # N x [B, T]
        except EngramError as exc:
            problem = exc
        if problem is not None:
            self._exchange.refuse(OP_LOOKUP)
            raise problem
        B, T = x.shape
        rows = self._hasher.hash_grams(grams, layer_id) + self._offsets[layer_id]      # [B, T, H] global rows
        lead = self._lead if self._offload is not None else self.local[layer_id]   # requires_grad for the Function
        self._track = torch.is_grad_enabled()
        out = _Lookup.apply(lead, self, layer_id, rows.reshape(-1))                     # [B*T*H, D]
        out = out.view(B, T, self.spec.embed_dim)                                       # [B, T, E]
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def _forward(self, layer_id: int, rows: np.ndarray) -> tuple[torch.Tensor, Routed]:
        routed = self._exchange.route(layer_id, rows, torch.float32, OP_LOOKUP)
        store, track = self._offload, self._track
        if store is None:
            local = self.local[layer_id]
            uniq = self._exchange.answer(routed, lambda idx: local[torch.from_numpy(idx)])   # [u, D]
        else:
            uniq = self._exchange.answer(routed, lambda idx: store.read(layer_id, idx, track))
        return (uniq if routed.inverse is None else uniq[routed.inverse]), routed           # [n, D]

    def _backward(self, layer_id: int, routed: Routed, grad: torch.Tensor) -> None:
        """Sum the gradient [n, D] per distinct row, send each to its owner, keep what arrives."""
        grad = grad.to(torch.float32)
        if routed.inverse is None:                                                       # sent as requested
            summed = grad
        else:
            summed = torch.zeros((routed.uniq.size, grad.shape[1]), dtype=torch.float32)
            summed.index_add_(0, routed.inverse, grad)                                   # [u, D]
        again = self._exchange.headers(routed.send_counts, layer_id, torch.float32, OP_GRAD)
        if again != routed.recv_counts:
            raise RuntimeError(f"layer {layer_id}: the backward exchange does not match its lookup")
        arrived = self._exchange.send_bytes(summed, routed.send_counts, routed.recv_counts)   # [m, D]
        self._grads[layer_id].append((torch.from_numpy(routed.recv_local), arrived))
        self._touched.add(layer_id)

    # -- optimizer --------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Drop the gradients gathered since the last step."""
        for pending in self._grads.values():
            pending.clear()
        self._touched.clear()
        if self._offload is not None:
            self._offload.advance()

    @torch.no_grad()
    def step(self) -> None:
        """Adam on the rows touched since the last step, as torch.optim.SparseAdam (see module doc)."""
        store = self._offload
        with contextlib.nullcontext() if store is None else store.stepping():
            for layer_id in sorted(self._touched):
                self.steps[layer_id] += 1
                pending = self._grads[layer_id]
                if not pending:
                    continue
                rows, grad = sum_by_row(torch.cat([i for i, _ in pending]), torch.cat([g for _, g in pending]))
                if store is not None:
                    store.adam(layer_id, rows, grad, self.steps[layer_id], self._settings)
                else:
                    sparse_adam_(self.local[layer_id], self.exp_avg[layer_id], self.exp_avg_sq[layer_id], rows, grad,
                                 self.steps[layer_id], self._settings)
        self.zero_grad()

    # -- save and load ----------------------------------------------------------------------
    def _offloaded(self, what: str) -> OffloadedPart:
        if self._offload is None:
            raise InputError(f"{what} is for rows offloaded to disk (ShardedRows(..., offload=workdir)); these rows "
                             "are in memory: save them with rows.save(prefix)")
        return self._offload

    def flush(self) -> None:
        """Offloaded rows: this rank's rows, moments and step counts durable in its working copy (see
        `engram.OffloadedRows.flush`). Each rank flushes its own part; call it on every rank at one step."""
        self._offloaded("flush()").flush(self.steps, self._settings)

    def snapshot(self, path: str | os.PathLike[str], *, dtype: str | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> str:
        """Offloaded rows: flush, then publish this rank's rows as its part of a sharded table at `path`
        (every rank calls, one path per rank; the parts share one new table id, so `ShardedTable`
        serves them together)."""
        part = self._offloaded("snapshot()")
        ids: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(ids, new_table_id(), group=self.group)
        return part.snapshot(path, dtype, overwrite, progress, self.steps, self._settings, ids[0])

    def offload_stats(self) -> OffloadStats:
        """Offloaded rows: the cache's counters (see `engram.OffloadedRows.stats`)."""
        return self._offloaded("offload_stats()").stats()

    def close(self, flush: bool = True) -> None:
        """Offloaded rows: flush (unless flush=False) and release the working copy; in memory: nothing to do."""
        if self._offload is not None:
            self._offload.close(self.steps, self._settings, flush)

    def save(self, prefix: str | os.PathLike[str]) -> str:
        """Write this rank's rows and optimizer state, then commit the save with the other ranks
        (every rank calls; see `engram.distributed.state`); returns this rank's file."""
        if self._offload is not None:
            raise InputError(f"these rows are offloaded to {self._offload.path!r}: they are saved there by "
                             "rows.flush() (and published by rows.snapshot(path)), not by save")
        return save_rows(self, prefix)

    @classmethod
    def load(cls, prefix: str | os.PathLike[str], group: dist.ProcessGroup | None = None, *,
             wire_dedup: bool = False, timeout: datetime.timedelta | None = None,
             fallback: bool = False) -> ShardedRows:
        """Rows and optimizer state of the last committed `save` (made with any number of ranks),
        split for this group; every rank calls.

        Raises:
            IncompleteSaveError: a later save was interrupted (unless `fallback=True`, which loads
                the last committed one), or the save's files are mixed; on every rank.
        """
        return load_rows(cls, prefix, new_group(group, timeout), wire_dedup, fallback)


class _Lookup(torch.autograd.Function):
    """Rows of the sharded table [n, D]; the gradient goes to the rows' owners (none to `lead`)."""

    @staticmethod
    def forward(ctx: Any, lead: torch.Tensor, owner: ShardedRows, layer_id: int, rows: np.ndarray) -> torch.Tensor:
        out, routed = owner._forward(layer_id, rows)
        ctx.owner, ctx.layer_id, ctx.routed = owner, layer_id, routed
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        ctx.owner._backward(ctx.layer_id, ctx.routed, grad.contiguous())
        return None, None, None, None
