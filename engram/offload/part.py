"""OffloadedPart: one rank's part of a sharded table trained out of core, for engram.distributed.ShardedRows.

    rows = engram.distributed.ShardedRows(f"table-{rank}-of-{world}", lr=5 * lr,
                                          offload=f"work-{rank}", cache_bytes=4 << 30)

The rank's rows and moments live in a working copy of its part (`engram.offload.workdir`), made
from the part on first use and resumed afterwards, behind the same cache, write-back and undo log
as `engram.OffloadedRows`: a sharded run is then bounded by its hosts' disks, not their RAM.
ShardedRows keeps the routing and the gradients; this class reads rows by local index and applies
Adam to them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import torch

from engram.addressing.compression import Compression
from engram.addressing.spec import TableSpec
from engram.offload.adam import AdamSettings
from engram.offload.create import check_workdir_path, make_working_copy
from engram.offload.opened import OpenedCopy, check_cache_args
from engram.offload.snapshot import check_snapshot, write_snapshot
from engram.offload.stats import OffloadStats
from engram.offload.workdir import is_working_copy
from engram.serving.gather import unique_inverse
from engram.storage.shards import ShardRange

__all__ = ["OffloadedPart"]


class OffloadedPart:
    """The rows of `shard` (this rank's part, at `part_path`) in the working copy at `workdir`.

    Made from the part when `workdir` holds no working copy yet, else resumed from its last flush
    (step counts included: `steps`). Settings are the caller's.

    Raises:
        SpecMismatchError: `workdir` holds another table's rows, or another part.
        InputError, MissingFileError, CorruptTableError: as OffloadedRows.
    """

    def __init__(self, part_path: Any, workdir: Any, *, shard: ShardRange, spec: TableSpec, compression: Compression,
                 cache_bytes: int, io_threads: int, settings: AdamSettings) -> None:
        path = check_workdir_path(workdir)
        check_cache_args(cache_bytes, io_threads)
        if not is_working_copy(path):
            make_working_copy(part_path, path, dtype=None, settings=settings, overwrite=False, part=True)
        self._copy = OpenedCopy(path, cache_bytes, io_threads, spec, compression, shard)
        self._store = self._copy.store
        self._bases = {lid: self._copy.ident.bases[lid] for lid in spec.layer_ids}
        self.steps = dict(self._copy.state.steps)

    @property
    def path(self) -> str:
        return os.fspath(self._copy.workdir)

    def read(self, layer_id: int, local: np.ndarray, track: bool) -> torch.Tensor:
        """Rows [n, D] float32 at local rows `local` [n] of a layer; kept for the step when `track`."""
        uniq, inverse = unique_inverse(local + self._bases[layer_id])
        store = self._store
        slots = store.fetch(uniq, "lookup", step_pin=store.tick if track else 0)
        try:
            rows = store.rows(slots)
        finally:
            store.release(slots)
        store.count(lookups=1, rows_requested=local.size)
        return rows.index_select(0, inverse)

    def stepping(self) -> contextlib.AbstractContextManager[None]:
        return self._store.stepping()

    def adam(self, layer_id: int, local: torch.Tensor, grad: torch.Tensor, step: int, settings: AdamSettings) -> None:
        """Adam on local rows `local` [u] (distinct) of a layer, their summed gradient [u, D] (inside `stepping`)."""
        self._store.adam(local.numpy() + self._bases[layer_id], grad, step, settings)

    def advance(self) -> None:
        self._store.advance()

    def flush(self, steps: dict[int, int], settings: AdamSettings) -> None:
        self._store.flush(steps, settings)

    def snapshot(self, path: Any, dtype: str | None, overwrite: bool, progress: bool | None,
                 steps: dict[int, int], settings: AdamSettings, table_id: str) -> str:
        """Flush, then publish this part as a part of the sharded table `table_id` at `path`."""
        target, dtype = check_snapshot(path, dtype, overwrite, self._copy.ident)
        self.flush(steps, settings)
        write_snapshot(self._store.data, self._copy.ident, self._copy.compression, target, dtype, overwrite, progress,
                       table_id)
        return os.fspath(target)

    def stats(self) -> OffloadStats:
        return self._store.stats()

    def close(self, steps: dict[int, int], settings: AdamSettings, flush: bool) -> None:
        if self._copy.closed:
            return
        try:
            if flush:
                self.flush(steps, settings)
        finally:
            self._copy.close()
