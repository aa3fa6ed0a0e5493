"""Opening a working copy: read and check its files, take its lock, size the cache, replay the undo log.

Shared by `engram.OffloadedRows` (a whole table) and `engram.distributed.ShardedRows(offload=...)`
(one part), which differ only in how they address rows and what they expect to find.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.args import check_int
from engram.errors import InputError
from engram.offload.store import RowStore, cache_bytes_for, cache_rows
from engram.offload.workdir import check_expected, lock_workdir, read_workdir
from engram.storage.shards import ShardRange

__all__ = ["OpenedCopy", "check_cache_args"]


def check_cache_args(cache_bytes: Any, io_threads: Any) -> None:
    """InputError unless cache_bytes and io_threads are ints >= 1."""
    check_int("cache_bytes", cache_bytes, 1, " (bytes of the row cache, e.g. 4 << 30)")
    check_int("io_threads", io_threads, 1)


class OpenedCopy:
    """An open working copy: its identity, last commit, compression and store (the lock held until `close`).

    Args:
        workdir: the working copy.
        cache_bytes, io_threads: the cache (see engram.offload.store).
        spec, compression: what the caller expects the rows to be of (None: anything).
        shard: the part the caller expects (None: a whole table).

    Raises:
        MissingFileError, CorruptTableError: no working copy there, or a damaged one.
        SpecMismatchError: it holds rows of another table (or another part).
        InputError: it is open already, or cache_bytes holds no row.
    """

    def __init__(self, workdir: Path, cache_bytes: int, io_threads: int, spec: TableSpec | None = None,
                 compression: Compression | None = None, shard: ShardRange | None = None) -> None:
        ident, state, comp = read_workdir(workdir)
        check_expected(workdir, ident, comp, spec, compression, shard)
        if shard is None and ident.shard is not None:
            raise InputError(f"workdir={os.fspath(workdir)!r} holds {ident.shard} of a sharded table: open it "
                             "with engram.distributed.ShardedRows(part, offload=workdir, ...) on its rank")
        if cache_rows(cache_bytes, ident.layout) < 1:
            raise InputError(f"cache_bytes={cache_bytes} holds no row: a row of {ident.spec.head_dim} values with its "
                             f"moments needs cache_bytes >= {cache_bytes_for(1, ident.layout)}")
        lock = lock_workdir(workdir)
        try:
            store = RowStore(workdir, ident, state.generation, cache_bytes, io_threads)
        except BaseException:
            os.close(lock)
            raise
        self.workdir, self.ident, self.state, self.compression, self.store = workdir, ident, state, comp, store
        self._finalizer = weakref.finalize(self, _release, store, lock)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the threads, release the files and the lock (no flush). Idempotent."""
        self._finalizer()


def _release(store: RowStore, lock: int) -> None:
    store.close()
    os.close(lock)
