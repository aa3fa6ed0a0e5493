"""ShardedTable: one table row-sharded over the ranks of a torch.distributed group.

    st = engram.distributed.ShardedTable("big-1-of-4", tier="mmap")   # on rank 1 of 4
    e = st.lookup(token_ids, layer_id)       # [B, T, E]: what the whole table returns for these ids
    e = st.lookup(new_ids, layer_id, history=hist)   # decoding: this rank's sequences continue `hist`

Each rank opens its own part (`engram shard`, `engram build --shard r/W`) and every rank calls
`lookup` / `prefetch` together with its own ids: the rows are hashed where the ids are, asked of
their owners and put back in order (`engram.distributed.exchange`). Every exchange of one
ShardedTable runs on its own thread in call order, so prefetches and lookups never interleave
their collectives; with `group=None` the table also gets a process group of its own, so the
model's collectives (DDP's all-reduce) never interleave with them either.

Decoding works as with a `Table`: each rank keeps the `NgramHistory` of its own sequences and
hashes its new ids against it where the ids are (`engram.distributed.decode`); only row ids and
rows travel. A history belongs to the rank that first decodes with it: another rank's is refused.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engram.addressing.compression import Compression
from engram.addressing.hashing import NgramHasher
from engram.addressing.history import NgramHistory, prefetch_context
from engram.addressing.spec import TableSpec
from engram.distributed.agreement import agree, describe_part
from engram.distributed.decode import context_grams
from engram.distributed.exchange import OP_LOOKUP, Routed, RowExchange
from engram.errors import EngramError, InputError
from engram.opening import open as open_table
from engram.serving.buffers import OutputPool, Scratch
from engram.serving.gather import KEEP_BUFFER_BYTES
from engram.serving.hotrows import HotRowPlan
from engram.serving.lookup_args import check_dtype
from engram.serving.prefetch import Prefetch
from engram.serving.stats import LookupStats, StatsCounter
from engram.serving.table import Table
from engram.storage.quant import decode
from engram.storage.shards import ShardRange
from engram.tensors import check_ids_2d, to_numpy_ids

__all__ = ["ShardedTable", "new_group", "compressed_ids"]


def new_group(group: dist.ProcessGroup | None, timeout: datetime.timedelta | None = None) -> dist.ProcessGroup:
    """The group a sharded object talks over: `group` itself, or for None a new group of every
    rank (a collective call of the default group) with `timeout` (None: torch's default for new
    groups, which is not the default group's), so its exchanges have a channel of their own."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                         "(backend 'gloo' on CPU, 'nccl' on GPUs) on every rank first")
    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            raise InputError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        return group
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        raise InputError(f"timeout={timeout!r} is invalid: expected a datetime.timedelta or None")
    return dist.new_group(timeout=timeout)


def compressed_ids(token_ids: Any, comp: Compression) -> np.ndarray:
    """Checked raw ids [B, T] -> compressed int64 ids [B, T] (a copy)."""
    ids = to_numpy_ids(token_ids)
    check_ids_2d(ids)
    comp.check_ids(ids)
    return comp.lookup[ids]


class ShardedTable:
    """One part of a row-sharded table, looked up together with the other ranks' parts.

    Args:
        path: this rank's part (a table written by `engram shard` or `engram build --shard`); in a
            group of one, a whole table.
        group: the process group whose ranks hold the parts (None: every rank, over a new group
            of its own). A group passed in should carry nothing else while prefetches run.
        timeout: for group=None, how long the new group's collectives wait for a rank that does
            not come (a `datetime.timedelta`; None: torch's default for new groups, 30 minutes).
        tier, prefault, io_threads, dedup, verify_reads: how this rank reads its part, as for
            `engram.open` (`dedup`: the owner reads each distinct row asked of it once).
        wire_dedup: send each distinct row of a lookup to its owner once (and get it back
            once): fewer bytes on the wire for a sort of the lookup's rows, which pays only on
            slow links (see docs/performance.md, "Sharded lookups"); off by default.

    Raises:
        ShardMismatchError: the parts opened on the ranks are not the parts of one table (other
            specs, compressions or table ids, other part counts, rows in no part or in two),
            raised on every rank alike.
        The error any rank met opening its part (e.g. TableNotFoundError), on every rank.

    Example:
        >>> dist.init_process_group("gloo")
        >>> st = ShardedTable(f"big-{dist.get_rank()}-of-{dist.get_world_size()}")
        >>> e = st.lookup(token_ids, layer_id=1)          # every rank, each with its own ids
    """

    def __init__(self, path: str | os.PathLike[str], group: dist.ProcessGroup | None = None, tier: str = "mmap", *,
                 prefault: bool = False, io_threads: int = 32, dedup: bool | None = None,
                 wire_dedup: bool = False, timeout: datetime.timedelta | None = None,
                 verify_reads: bool = True) -> None:
        self._group = new_group(group, timeout)
        opened: list[Table] = []

        def describe() -> dict[str, Any]:       # what this rank opened; its errors reach every rank
            if not isinstance(wire_dedup, bool):
                raise InputError(f"wire_dedup={wire_dedup!r} is invalid: expected True or False")
            table = open_table(path, tier, prefault=prefault, io_threads=io_threads, dedup=dedup,
                               verify_reads=verify_reads)
            opened.append(table)
            return describe_part(table, path)

        try:
            self.parts = agree(self._group, describe)
        except BaseException:
            for table in opened:
                table.close()
            raise
        self._table = opened[0]
        self._exchange = RowExchange(self._group, self.parts, wire_dedup)
        self._hasher = NgramHasher(self.spec, self.compression)
        self._offsets = {lid: np.asarray(self.spec.head_offsets(lid), np.int64) for lid in self.spec.layer_ids}
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-sharded")
        self._prefetch_stats = StatsCounter()
        self._outputs = OutputPool()
        self._scratch = Scratch()                   # hash buffers of the exchange thread, reused by shape
        self._closed = False
        self._buffers: dict[str, torch.Tensor] = {}      # reused by the exchange thread only

    # -- what it is -------------------------------------------------------------------------
    @property
    def spec(self) -> TableSpec:
        return self._table.spec

    @property
    def compression(self) -> Compression:
        return self._table.compression

    @property
    def path(self) -> Path:
        """This rank's part."""
        return self._table.path

    @property
    def tier(self) -> str:
        return self._table.tier

    @property
    def dtype(self) -> torch.dtype:
        """The dtype lookups return by default (as `Table.dtype`)."""
        return self._table.dtype

    @property
    def shard(self) -> ShardRange:
        """The rows this rank holds."""
        return self.parts[self._exchange.rank]

    @property
    def table(self) -> Table:
        """This rank's part, open (its `rows` take global rows inside `shard`)."""
        return self._table

    def __repr__(self) -> str:
        return (f"ShardedTable(path={os.fspath(self.path)!r}, rank={self._exchange.rank} of "
                f"{self._exchange.world}, {self.shard})")

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, token_ids: Any, layer_id: int, dtype: torch.dtype | None = None, *,
               history: NgramHistory | None = None, mask: Any = None, doc_start: Any = None) -> torch.Tensor:
        """The rows `token_ids` address in one layer of the whole table; every rank calls together.

        Args:
            token_ids: this rank's raw token ids [B, T] (any B and T, [0, 0] included: a rank
                with nothing to look up still calls).
            layer_id: one of `spec.layer_ids`, the same on every rank.
            dtype: result dtype (default `dtype`), the same on every rank; quantized rows are
                decoded by their owner.
            history, mask, doc_start: as for `Table.lookup`, each rank its own (the ids continue
                this rank's `NgramHistory`; it is only read). A history used on one rank is
                refused on another.

        Returns:
            A CPU tensor [B, T, E], equal to the whole table's `lookup(token_ids, layer_id, ...)`.

        Raises:
            InputError, TokenIdError, SpecMismatchError: this rank's arguments (then every other
                rank raises InputError naming this rank: nobody waits).
        """
        future, (layer,), _ = self._submit(token_ids, (layer_id,), dtype, history, mask, doc_start)
        return future.result()[layer]

    def prefetch(self, token_ids: Any, layer_ids: int | Sequence[int] | None = None,
                 dtype: torch.dtype | None = None, *, history: NgramHistory | None = None, mask: Any = None,
                 doc_start: Any = None) -> Prefetch:
        """Start the lookup of `token_ids` on the table's exchange thread; every rank calls together.

        `history`, `mask` and `doc_start` as for `lookup`; the history is read now (append to it after).

        Returns:
            A Prefetch handle: `result(layer_id)` == `lookup(token_ids, layer_id, ...)`.
        """
        future, layers, context = self._submit(token_ids, layer_ids, dtype, history, mask, doc_start)
        self._prefetch_stats.add(prefetches=1)
        return Prefetch(future, layers, self._prefetch_stats, self.path, context)

    def _submit(self, token_ids: Any, layer_ids: Any, dtype: torch.dtype | None, history: NgramHistory | None,
                mask: Any, doc_start: Any) -> tuple[concurrent.futures.Future, tuple[int, ...], Any]:
        """Check the arguments here; exchange on the thread (a refused call still takes part once)."""
        if self._closed:
            raise InputError(f"this ShardedTable ({os.fspath(self.path)!r}) is closed: open it again on every rank")
        problem: Exception | None = None
        try:
            x = compressed_ids(token_ids, self.compression)
            grams = context_grams(self._hasher, x, history, mask, doc_start)   # N x [B, T], read now
            context = prefetch_context(token_ids, history, mask)
            if layer_ids is None:
                layer_ids = self.spec.layer_ids
            elif isinstance(layer_ids, (int, np.integer)) or not isinstance(layer_ids, Sequence):
                layer_ids = (layer_ids,)
            layers = tuple(self.spec.check_layer(i) for i in layer_ids)
            check_dtype(dtype)
            want = self._table.gathered_dtype(self.dtype if dtype is None else dtype)
        except EngramError as exc:
            problem = exc
        if problem is not None:
            self._thread.submit(self._exchange.refuse, OP_LOOKUP)
            raise problem
        return self._thread.submit(self._work, grams, layers, dtype, want), layers, context

    def _work(self, grams: list[np.ndarray], layers: tuple[int, ...], dtype: torch.dtype | None,
              gathered: torch.dtype) -> dict[int, torch.Tensor]:
        """Runs on the exchange thread: every layer's rows of this rank's n-grams (N columns of [B, T])."""
        B, T = grams[0].shape
        H, D = self.spec.heads_per_layer, self.spec.head_dim
        want = self.dtype if dtype is None else dtype
        out = {}
        for layer_id in layers:
            heads_buf, rows = self._scratch.get(H, B, T)
            np.add(self._hasher.hash_grams(grams, layer_id, out=heads_buf), self._offsets[layer_id],
                   out=rows)                                                      # [B, T, H] global rows
            routed = self._exchange.route(layer_id, rows.reshape(-1), gathered, OP_LOOKUP)
            result = self._outputs.take((B, T, H * D), gathered)
            serve = lambda local, i=layer_id: self._serve(i, local, gathered)            # noqa: E731
            if self.spec.quantized:               # stored bytes travel; the requester decodes them
                got = self._stored(layer_id, routed, gathered)                            # [u, D]
                if routed.inverse is None:
                    result.view(B * T * H, D).copy_(got)
                else:
                    torch.index_select(got, 0, routed.inverse, out=result.view(B * T * H, D))
            elif routed.inverse is None:          # sent in request order: the rows land in place
                self._exchange.answer(routed, serve, out=result.view(B * T * H, D))
            else:
                got = self._buffer("received", (routed.uniq.size, D), gathered)           # [u, D]
                self._exchange.answer(routed, serve, out=got)
                torch.index_select(got, 0, routed.inverse, out=result.view(B * T * H, D))  # [B*T*H, D]
            out[layer_id] = result if want == gathered else result.to(want)
        return out

    def _stored(self, layer_id: int, routed: Routed, dtype: torch.dtype) -> torch.Tensor:
        """Quantized rows: owners send values and scales as stored (a quarter to a half of the
        decoded bytes); they are decoded here into `dtype`, as the whole table decodes them."""
        start = self.shard.start(layer_id)
        q = self._table.stored_rows(layer_id, routed.recv_local + start)                 # as stored, [m, *]
        values = self._exchange.send_bytes(torch.from_numpy(q.values), routed.recv_counts, routed.send_counts)
        scales = self._exchange.send_bytes(torch.from_numpy(q.scales), routed.recv_counts, routed.send_counts)
        out = self._buffer("received", (routed.uniq.size, self.spec.head_dim), dtype)     # [u, D]
        return decode(values, scales, self.spec.dtype, block=self.spec.scale_block, out=out) if out.numel() else out

    def _serve(self, layer_id: int, local: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """The rows other ranks asked of this one: local rows [m] -> [m, D] (dedup, cache, tier)."""
        out = self._buffer("served", (local.size, self.spec.head_dim), dtype)
        self._table.gather_local(layer_id, local, out)
        return out

    def _buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer of the exchange thread (a fresh one costs a page fault per 4 KiB)."""
        nbytes = shape[0] * shape[1] * dtype.itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            if nbytes <= KEEP_BUFFER_BYTES:
                self._buffers[name] = buf
        return buf[:nbytes].view(dtype).view(shape)

    # -- cache, counters, lifetime ----------------------------------------------------------
    def load_hot_rows(self, plan: HotRowPlan | str | os.PathLike[str], **amount: Any) -> dict[int, int]:
        """Keep the plan's hottest rows of the whole table that this rank holds in RAM (as
        `Table.load_hot_rows`, with the same `fraction` / `rows` / `max_bytes`); local to the rank."""
        return self._table.load_hot_rows(plan, **amount)

    def stats(self) -> LookupStats:
        """What this rank's part served (rows asked of it by every rank, itself included)."""
        return self._table.stats()

    def wire_stats(self) -> dict[str, int]:
        """What this rank's exchanges moved: rows requested / unique / remote, bytes sent / received
        to and from other ranks (ids and rows; self-sends excluded)."""
        return self._exchange.counter.snapshot()

    def reset_stats(self) -> None:
        """Zero this rank's counters: `stats()` and `wire_stats()`."""
        self._table.reset_stats()
        self._exchange.counter.reset()

    def close(self) -> None:
        """Wait for exchanges in flight, then close this rank's part. Idempotent."""
        self._closed = True
        self._thread.shutdown(wait=True)
        self._table.close()

    def __enter__(self) -> ShardedTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise TypeError("a ShardedTable belongs to its process group and cannot be pickled: open it on each rank")
